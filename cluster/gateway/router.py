"""Choosing a replica for a request: least outstanding tokens, prefix affinity while the
replicas are balanced, and a hook for an expert-locality score (speculative scheduling).
Pure over plain data: `choose_replica(candidates, prefix_key, locality) -> index`, with what
routing reads off a request: its prefix key and its cost."""

import hashlib
from collections.abc import Callable
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


def choose_replica(candidates: list[ReplicaLoad], key: str, balance_slack: int = 256,
                   locality: Callable[[str], float] | None = None) -> int:
    """Index of the chosen replica among those not draining (-1 if none).

    The prefix's home replica (rendezvous hashing, stable as replicas come and go) wins while
    its outstanding tokens are within `balance_slack` of the least loaded; otherwise the least
    loaded wins. `locality(replica_id)` in [0, 1] breaks ties toward replicas where the
    request's predicted experts live (a hook for speculative scheduling)."""
    live = [i for i, c in enumerate(candidates) if not c.draining]
    if not live:
        return -1
    least = min(candidates[i].outstanding_tokens for i in live)
    home = max(live, key=lambda i: hashlib.blake2b(f"{key}|{candidates[i].replica_id}".encode(), digest_size=8).digest())
    if candidates[home].outstanding_tokens <= least + balance_slack:
        return home
    score = (lambda i: locality(candidates[i].replica_id)) if locality else (lambda i: 0.0)
    return min(live, key=lambda i: (candidates[i].outstanding_tokens, -score(i)))
