"""The dispatcher: groups a layer's (token, expert) pairs by the shard that holds each chosen
expert under the current placement, makes one round trip per shard through the transport,
and sums the returned partial outputs."""

from dataclasses import dataclass
from typing import Protocol

import torch

from moefleet.cluster.experts.transport import ShardWork, Transport
from moefleet.cluster.placement.placement import Placement


@dataclass
class PendingCombine:
    """A layer's expert work in flight: finish with Dispatcher.finish."""

    handle: object
    tokens: list[torch.Tensor | None]  # per sent work item: the token rows it answers (None: all rows)
    like: torch.Tensor


class RoutingObserver(Protocol):
    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: int64[T, K], the router's choice for every token row at `layer` this step."""
        ...


class Dispatcher:
    def __init__(self, placement: Placement, transport: Transport, observers: tuple[RoutingObserver, ...] = ()):
        """`observers` see every layer's routing before it is dispatched (the load window, the
        routing recorder)."""
        self.transport, self.observers = transport, observers
        self.set_placement(placement)
        # fanout[n]: tokens (per MoE layer visit) whose experts lay on n distinct shards.
        self.fanout = [0] * (self.placement.num_experts + 1)
        self._pair_tokens, self._pair_tokens_k = torch.empty(0, dtype=torch.long), 0  # see _token_of_pairs

    def set_placement(self, placement: Placement) -> None:
        placement.validate()
        self.placement = placement
        self.num_shards = placement.num_shards
        # owner[layer][e]: the shard of an expert held once, -1 for replicated experts.
        self.owner: dict[int, torch.Tensor] = {}
        self.replicas: dict[int, dict[int, list[int]]] = {}
        for layer in placement.shard_experts:
            owner = torch.empty(placement.num_experts, dtype=torch.long)
            replicas = {}
            for e in range(placement.num_experts):
                holders = placement.holders(layer, e)
                owner[e] = holders[0] if len(holders) == 1 else -1
                if len(holders) > 1:
                    replicas[e] = holders
            self.owner[layer], self.replicas[layer] = owner, replicas

    def _choose_replicas(self, layer: int, ids: torch.Tensor, pair_shard: torch.Tensor) -> None:
        """Fill in the shard of pairs whose expert has several copies: per token the copy on a
        shard the token already visits (fewest distinct shards), else the least loaded one."""
        top_k = ids.shape[1]
        load = torch.bincount(pair_shard[pair_shard >= 0], minlength=self.num_shards).tolist()
        flat_ids = ids.flatten().tolist()
        shards = pair_shard.tolist()
        for pair in (pair_shard < 0).nonzero().flatten().tolist():
            token_pairs = range(pair - pair % top_k, pair - pair % top_k + top_k)
            visited = {shards[p] for p in token_pairs if shards[p] >= 0}
            holders = self.replicas[layer][flat_ids[pair]]
            best = min(holders, key=lambda s: (s not in visited, load[s]))
            shards[pair] = best
            load[best] += 1
        pair_shard.copy_(torch.tensor(shards))

    def _token_of_pairs(self, num_tokens: int, top_k: int) -> torch.Tensor:
        """[num_tokens * top_k]: the token of each (token, expert) pair, 0 0 1 1 2 2 ... A prefix
        of one kept tensor (grown when a step has more tokens): two ops fewer per layer."""
        if self._pair_tokens_k != top_k or self._pair_tokens.numel() < num_tokens * top_k:
            self._pair_tokens = torch.arange(max(num_tokens, 256)).repeat_interleave(top_k)
            self._pair_tokens_k = top_k
        return self._pair_tokens[: num_tokens * top_k]

    def start(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> PendingCombine:
        """hidden [T, D], weights/ids [T, K]: send every shard its pairs; returns at once."""
        for observer in self.observers:
            observer.record(layer, ids)
        num_tokens, top_k = ids.shape
        token_index = self._token_of_pairs(num_tokens, top_k)
        flat_ids, flat_weights = ids.flatten(), weights.flatten()
        if self.num_shards == 1:
            self.fanout[1] += num_tokens
            work = [ShardWork(0, layer, hidden, token_index, flat_ids, flat_weights, self.placement.layout_epoch(0))]
            return PendingCombine(self.transport.send(work), [None], hidden)
        pair_shard = self.owner[layer][flat_ids]
        if self.replicas[layer]:
            self._choose_replicas(layer, ids, pair_shard)
        self._count_fanout(pair_shard.view(num_tokens, top_k))
        work, tokens = [], []
        for shard in range(self.num_shards):
            mask = pair_shard == shard
            if not bool(mask.any()):
                continue
            unique_tokens, row_index = torch.unique(token_index[mask], return_inverse=True)
            work.append(ShardWork(shard, layer, hidden[unique_tokens], row_index, flat_ids[mask], flat_weights[mask],
                                  self.placement.layout_epoch(shard)))
            tokens.append(unique_tokens)
        return PendingCombine(self.transport.send(work), tokens, hidden)

    def _count_fanout(self, token_shards: torch.Tensor) -> None:
        ordered = token_shards.sort(dim=1).values
        distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
        for n, count in enumerate(torch.bincount(distinct).tolist()):
            if count:
                self.fanout[n] += count

    def finish(self, pending: PendingCombine) -> torch.Tensor:
        """Wait for the shards and sum their partial outputs -> [T, D]."""
        partials = self.transport.receive(pending.handle)
        if pending.tokens == [None]:
            return partials[0]
        out = torch.zeros_like(pending.like)
        for tokens, partial in zip(pending.tokens, partials):
            out.index_add_(0, tokens, partial)
        return out

    def combine(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], weights/ids [T, K] -> [T, D] routed-expert output."""
        return self.finish(self.start(layer, hidden, weights, ids))
