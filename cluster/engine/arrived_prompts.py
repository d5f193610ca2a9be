"""The prompt tokens of the requests a replica admitted since the controller last asked: what the
controller's proactive rebalancing predicts the coming expert load from (autoscaler/
proactive_rebalance.py). Bounded: past `capacity_tokens` the oldest prompts are dropped (the
newest say most about what comes)."""

import threading
from collections import deque

import numpy as np


class ArrivedPrompts:
    def __init__(self, capacity_tokens: int = 16384):
        self.capacity_tokens = capacity_tokens
        self._prompts: deque[np.ndarray] = deque()
        self._tokens = 0
        self._lock = threading.Lock()  # submitted on request threads, taken by the controller's call

    def add(self, prompt_token_ids) -> None:
        ids = np.asarray(prompt_token_ids, dtype=np.int64)
        with self._lock:
            self._prompts.append(ids)
            self._tokens += ids.size
            while self._tokens > self.capacity_tokens and len(self._prompts) > 1:
                self._tokens -= self._prompts.popleft().size

    def take(self) -> tuple[np.ndarray, int]:
        """(int64[N] every prompt token since the last take, in arrival order; how many requests)."""
        with self._lock:
            prompts, self._prompts, self._tokens = list(self._prompts), deque(), 0
        return (np.concatenate(prompts) if prompts else np.zeros(0, dtype=np.int64)), len(prompts)
