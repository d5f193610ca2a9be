"""Choosing a replica for a request: least outstanding tokens, prefix affinity while the
replicas are balanced, and the request's expert locality per replica when speculative scheduling
predicts it (request shuffling). Pure over plain data: `choose_replica(candidates, prefix_key,
locality) -> index`, with what routing reads off a request: its prefix key and its cost."""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from moefleet.cluster.messages import GenerateRequest


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    outstanding_tokens: int
    draining: bool = False


def prefix_key(request: GenerateRequest, chars: int = 256, tokens: int = 64) -> str:
    """A stable key of the prompt's start: requests sharing it hit the same prefix cache."""
    if request.prompt_token_ids is not None:
        head = ",".join(map(str, request.prompt_token_ids[:tokens]))
    else:
        head = request.prompt[:chars]
    return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()


def request_cost(request: GenerateRequest) -> int:
    """Tokens a request will cost its replica, roughly (prompt + max tokens; about 3 characters
    a token for text): what the pool holds against the replica while the request runs."""
    prompt = len(request.prompt_token_ids) if request.prompt_token_ids is not None else len(request.prompt) // 3 + 1
    return prompt + (request.sampling_params.max_tokens or 16)


PREFIX_HOME_BONUS = 0.25  # locality a prefix-cache hit is worth: a shared prefix skips its prefill


def choose_replica(candidates: list[ReplicaLoad], key: str, balance_slack: int = 256,
                   locality: Mapping[str, float] | None = None) -> int:
    """Index of the chosen replica among those not draining (-1 if none).

    Only replicas whose outstanding tokens are within `balance_slack` of the least loaded are
    eligible, so no replica is overloaded for locality or for a prefix. Among them, without
    `locality`: the prefix's home replica (rendezvous hashing, stable as replicas come and go) if
    eligible, else the least loaded. With `locality` (replica id -> the share in [0, 1] of the
    request's predicted expert activations its node holds): the highest share, the home replica
    counted PREFIX_HOME_BONUS higher, ties to the less loaded."""
    live = [i for i, c in enumerate(candidates) if not c.draining]
    if not live:
        return -1
    least = min(candidates[i].outstanding_tokens for i in live)
    home = max(live, key=lambda i: hashlib.blake2b(f"{key}|{candidates[i].replica_id}".encode(), digest_size=8).digest())
    eligible = [i for i in live if candidates[i].outstanding_tokens <= least + balance_slack]
    if locality:
        return max(eligible, key=lambda i: (locality.get(candidates[i].replica_id, 0.0)
                                            + (PREFIX_HOME_BONUS if i == home else 0.0),
                                            -candidates[i].outstanding_tokens))
    if home in eligible:
        return home
    return min(live, key=lambda i: candidates[i].outstanding_tokens)
