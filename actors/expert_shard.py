"""ExpertShard: owns the weights of a set of (layer, expert) slots on one device and computes
pre-reduced partial sums for the token rows routed to them. A plain class; a Ray shell is
applied where shards run remotely."""

import torch

from moefleet.kernels.expert_ffn import grouped_swiglu
from moefleet.kernels.linear import Linear


class ExpertShard:
    def __init__(self, shard_id: int, num_experts: int):
        self.shard_id = shard_id
        self.num_experts = num_experts
        self.experts: dict[int, list[tuple[Linear, Linear]]] = {}  # layer -> per local slot (gate_up, down)
        self.local_slot: dict[int, torch.Tensor] = {}  # layer -> [E] local slot of each logical expert, -1 if absent

    @classmethod
    def from_checkpoint(cls, shard_id: int, reader, experts_by_layer: dict[int, tuple[int, ...]]) -> "ExpertShard":
        """Load only this shard's experts (memory-mapped reads of just those tensors)."""
        shard = cls(shard_id, reader.spec.moe.num_experts)
        for layer, experts in experts_by_layer.items():
            pairs = [reader.expert(layer, e) for e in experts]
            shard.set_layer(layer, experts, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        return shard

    def set_layer(self, layer: int, experts: tuple[int, ...], w13: torch.Tensor, w2: torch.Tensor) -> None:
        """experts: logical ids of the slots; w13 [S, 2I, D], w2 [S, D, I] in checkpoint layout."""
        slots = torch.full((self.num_experts,), -1, dtype=torch.long)
        slots[list(experts)] = torch.arange(len(experts))
        self.local_slot[layer] = slots
        self.experts[layer] = [(Linear(w13[i]), Linear(w2[i])) for i in range(len(experts))]

    def compute(self, layer: int, rows: torch.Tensor, row_index: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows [R, D]; row_index, experts (logical ids), weights: [N] one per (token, expert)
        pair -> [R, D], each row's weighted sum over its pairs' experts."""
        slots = self.local_slot[layer][experts]
        if bool((slots < 0).any()):
            missing = sorted(set(experts[slots < 0].tolist()))
            raise KeyError(f"shard {self.shard_id} holds no copy of layer {layer} experts {missing}")
        return grouped_swiglu(rows, row_index, slots, weights, self.experts[layer], rows.shape[0])

    def nbytes(self) -> int:
        return sum(lin.nbytes for pairs in self.experts.values() for pair in pairs for lin in pair)
