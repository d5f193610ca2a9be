"""A sequence: one request's tokens, its KV blocks, and its progress through the engine."""

import enum
import itertools

from moefleet.cluster.engine.detokenizer import Detokenizer
from moefleet.cluster.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


class Sequence:
    """`resumed_token_ids`: outputs this request already produced on a replica that was lost. They
    count as outputs (max_tokens, stop checks, repetition penalty, the seed's draw number) and are
    prefilled with the prompt; only the tokens after them are new. `detokenizer`: the output's
    text, fed by the engine with each token (the engine makes one for every sequence it runs)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 resumed_token_ids: list[int] = (), detokenizer: Detokenizer | None = None):
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.detokenizer = detokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_resumed = len(resumed_token_ids)
        self.output_token_ids: list[int] = list(resumed_token_ids)
        self.token_ids = self.prompt_token_ids + self.output_token_ids  # prompt + output
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        self.num_cached_prompt_tokens = 0  # served from the prefix cache at first admission
        self.arrival = next(_arrival)
        # Resumed tokens' logprobs were delivered by the lost replica: placeholders keep positions aligned.
        self.logprobs: list[dict[int, float]] | None = [{}] * self.num_resumed if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    def append(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
