"""The messages between the gateway, the replicas and the controller: plain frozen dataclasses
that cross processes (Ray pickles them) and carry no behaviour beyond their own consistency.

- `GenerateRequest`: gateway -> replica, one generation request.
- `OutputDelta`: replica -> gateway, what a request gained since its previous delta;
  `join_deltas` makes the whole completion of one request out of its deltas. `RequestFailed`:
  a request that ended with an error instead.
- `ReplicaState`: a replica's load and status (the controller's monitor, the Admin API).
- `ReplicaSnapshot`: that state with the replica's placement epoch, shards and expert load
  (the Admin API's GetClusterState)."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One request: a prompt as text or as token ids (exactly one), how to sample, and, when it
    resumes on this replica after another was lost, the tokens the caller already has."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""  # empty: the replica makes one
    resume_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.prompt is None and self.prompt_token_ids is None:
            raise InvalidRequestError("prompt", "a request needs a prompt or prompt_token_ids")
        if self.prompt is not None and self.prompt_token_ids is not None:
            raise InvalidRequestError("prompt", "a request takes a prompt or prompt_token_ids, not both")


@dataclass(frozen=True)
class OutputDelta:
    """What a request gained since its previous delta; the last one has a finish reason."""

    request_id: str
    token_ids: list[int]
    text_delta: str
    logprobs: list[dict[int, float]] | None = None  # per new token: {token id: logprob}
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class RequestFailed:
    """replica -> gateway: a request ended with `error` instead of a last delta."""

    request_id: str
    error: BaseException


def join_deltas(deltas: Sequence[OutputDelta]) -> OutputDelta:
    """The deltas of one request, in order, as one delta: every token, its text and logprobs,
    with the finish reason and usage of the last."""
    last = deltas[-1]
    with_logprobs = [d.logprobs for d in deltas if d.logprobs is not None]
    return OutputDelta(
        request_id=last.request_id, token_ids=[t for d in deltas for t in d.token_ids],
        text_delta="".join(d.text_delta for d in deltas),
        logprobs=[entry for entries in with_logprobs for entry in entries] if with_logprobs else None,
        finish_reason=last.finish_reason, stop_reason=last.stop_reason, prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens, cached_prompt_tokens=last.cached_prompt_tokens)


@dataclass(frozen=True)
class ReplicaState:
    """A replica's status and load. `requests` counts those admitted or about to be;
    `outstanding_tokens` what they still have to prefill or generate."""

    replica_id: str
    status: str  # "serving" or "draining"
    running: int
    waiting: int
    requests: int
    outstanding_tokens: int
    node_id: str = "local"  # the Ray node it runs on ("local": not inside Ray)
    kv_cache_usage: float = 0.0  # share of its KV-cache blocks in use
    # Cumulative requests per bucket of serving_stats' TTFT and inter-token-latency bounds (the
    # histograms of its /metrics): the autoscaler takes percentiles over a window from their deltas.
    ttft_counts: tuple[int, ...] = ()
    itl_counts: tuple[int, ...] = ()
    shard_compute_s: tuple[float, ...] = ()  # cumulative expert compute per shard index, for this replica


@dataclass(frozen=True)
class ShardState:
    """One expert shard a replica uses (names as in the Admin API's ShardState)."""

    shard: int
    node_id: str  # "local": in the replica's own process
    weight_bytes: int
    transport: str


@dataclass(frozen=True)
class ExpertLoad:
    """Tokens routed to each expert of one MoE layer over the load window."""

    layer: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class ReplicaSnapshot:
    """A replica's state with the placement it serves: what GetClusterState shows of it."""

    state: ReplicaState
    placement_epoch: int
    shards: tuple[ShardState, ...]
    expert_load: tuple[ExpertLoad, ...]
