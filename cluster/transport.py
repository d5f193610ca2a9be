"""The seam between the dispatcher and the expert shards: one interface, several
implementations (in-process now; Ray actor calls and compiled-graph channels later). The
dispatcher never knows which one it talks to."""

from typing import Protocol

import torch

from moefleet.actors.expert_shard import ExpertShard


class Transport(Protocol):
    def compute(self, shard: int, layer: int, rows: torch.Tensor, row_index: torch.Tensor,
                experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One round trip to `shard`: rows [R, D] and per-pair (row_index, expert, weight) [N]
        in; one pre-reduced partial sum per row [R, D] out."""
        ...


class InProcessTransport:
    """Shards are objects in the replica's own process: zero copy, no serialisation."""

    def __init__(self, shards: list[ExpertShard]):
        self.shards = shards

    def compute(self, shard, layer, rows, row_index, experts, weights):
        return self.shards[shard].compute(layer, rows, row_index, experts, weights)
