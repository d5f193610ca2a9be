"""RoutingRecorder: which experts the router chose for a sample of the tokens an engine runs, at
every MoE layer: what the affinity model (cluster/routing/affinity.py) learns from and what
`moefleet routing record` writes as a trace.

Sampling is systematic over the engine's token stream (every `stride`-th token run, prompt and
output alike), decided once per step, so a sampled token is recorded at every layer (a whole
path: what layer-to-layer statistics need) and a step with no sampled token costs one comparison
per layer. Recorded tokens wait in a bounded buffer until someone takes them; when nobody does,
the oldest are dropped and counted.

Steps split into two overlapped micro-batches (remote shards with `overlap`) are not sampled:
their layers interleave two row spaces."""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moefleet.cluster.engine.scheduler import ScheduledChunk
from moefleet.cluster.routing.trace import RoutingEvent


@dataclass(frozen=True)
class RecordedTokens:
    """The sampled tokens of one step: request_ids[i], positions[i] (int64[N]) and tokens[i]
    (int64[N]) name token i; experts int64[N, L, K] its chosen experts at each MoE layer (L: MoE
    layers counted from 0, -1 where a layer was not reached)."""

    request_ids: tuple[str, ...]
    positions: np.ndarray
    tokens: np.ndarray
    experts: np.ndarray

    def events(self, seq_of: Callable[[str], str | int] = str) -> list[RoutingEvent]:
        """The routing trace's events (cluster/routing/trace.py), one per token and layer reached;
        `seq_of(request_id)` names the sequence."""
        return [RoutingEvent(seq_of(rid), int(pos), int(token), layer, tuple(int(e) for e in experts if e >= 0))
                for rid, pos, token, path in zip(self.request_ids, self.positions, self.tokens, self.experts)
                for layer, experts in enumerate(path) if (experts >= 0).any()]

    @staticmethod
    def concatenate(batches: "list[RecordedTokens]") -> "RecordedTokens":
        """Several steps' samples as one, in order: the controller learns from one array per
        replica and monitor round rather than one per step (per-call numpy overhead dominated)."""
        return RecordedTokens(tuple(rid for b in batches for rid in b.request_ids),
                              np.concatenate([b.positions for b in batches]),
                              np.concatenate([b.tokens for b in batches]),
                              np.concatenate([b.experts for b in batches]))


class RoutingRecorder:
    def __init__(self, moe_layers: list[int], top_k: int, sample_rate: float, capacity_tokens: int = 65536):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.ordinal = {layer: i for i, layer in enumerate(moe_layers)}
        self.top_k, self.capacity_tokens = top_k, capacity_tokens
        self.stride = round(1 / sample_rate) if sample_rate > 0 else 0
        self._offset = 0  # tokens run since the last sampled one, modulo the stride
        self._rows: torch.Tensor | None = None  # this step's sampled rows
        self._names: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None
        self._experts: list[torch.Tensor | None] = []
        self._buffer: deque[RecordedTokens] = deque()
        self._buffered = 0
        self._lock = threading.Lock()  # the engine thread fills the buffer, a caller's thread takes it
        self.dropped_tokens = 0

    def begin_step(self, chunks: list[ScheduledChunk], sampled: bool = True) -> None:
        """Pick this step's sampled rows (rows follow chunk order, as ModelRunner.prepare lays
        them out); `sampled=False` skips the step (its token count still advances the stride)."""
        self._rows = None
        if not self.stride:
            return
        total = sum(c.num_tokens for c in chunks)
        first = (self.stride - self._offset) % self.stride
        self._offset = (self._offset + total) % self.stride
        if not sampled or first >= total:
            return
        rows, request_ids, positions, tokens = [], [], [], []
        chunk_start, chunk_index = 0, 0
        for row in range(first, total, self.stride):
            while row >= chunk_start + chunks[chunk_index].num_tokens:
                chunk_start += chunks[chunk_index].num_tokens
                chunk_index += 1
            seq = chunks[chunk_index].seq
            position = seq.num_computed_tokens + row - chunk_start
            rows.append(row)
            request_ids.append(seq.request_id)
            positions.append(position)
            tokens.append(seq.token_ids[position])
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._names = (tuple(request_ids), np.array(positions, dtype=np.int64), np.array(tokens, dtype=np.int64))
        self._experts = [None] * len(self.ordinal)

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: int64[T, K], the router's choice for every row of this step at `layer`."""
        if self._rows is not None:
            self._experts[self.ordinal[layer]] = expert_ids.index_select(0, self._rows)

    def discard_step(self) -> None:
        """The step failed (it will be retried): forget what it recorded."""
        self._rows = None

    def end_step(self) -> None:
        if self._rows is None:
            return
        request_ids, positions, tokens = self._names
        experts = np.full((len(request_ids), len(self.ordinal), self.top_k), -1, dtype=np.int64)
        for ordinal, chosen in enumerate(self._experts):
            if chosen is not None:
                experts[:, ordinal, :chosen.shape[1]] = chosen.numpy()
        self._rows = None
        with self._lock:
            self._buffer.append(RecordedTokens(request_ids, positions, tokens, experts))
            self._buffered += len(request_ids)
            while self._buffered > self.capacity_tokens and len(self._buffer) > 1:
                old = self._buffer.popleft()
                self._buffered -= len(old.request_ids)
                self.dropped_tokens += len(old.request_ids)

    def take(self) -> list[RecordedTokens]:
        """Every recorded step not taken yet, oldest first (any thread)."""
        with self._lock:
            taken, self._buffer, self._buffered = list(self._buffer), deque(), 0
        return taken
