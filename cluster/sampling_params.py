"""SamplingParams, mirroring vLLM's so users can switch. Validated on construction: a bad value
raises InvalidRequestError naming the field."""

import math
from dataclasses import dataclass, field

from moefleet.cluster.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # k: per generated token, the sampled token and the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(name, message):
            raise InvalidRequestError(name, f"{message}, got {getattr(self, name)!r}")

        if self.n != 1:
            bad("n", "only n=1 is supported")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1, 0 (off) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not (0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not (self.repetition_penalty > 0) or math.isinf(self.repetition_penalty):
            bad("repetition_penalty", "must be a finite number > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            bad("max_tokens", "must be a positive integer")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", "must be a non-negative integer")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            bad("stop_token_ids", "must be non-negative integers")
        object.__setattr__(self, "stop_strings", tuple(stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
