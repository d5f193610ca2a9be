"""Placement: which shard holds which logical experts of each MoE layer (replicas allowed).

Plain frozen data so it can cross process boundaries and be stored; the planners that produce
placements are pure functions.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """shard_experts[layer][shard] is the tuple of logical experts that shard holds for that MoE
    layer, in the order of its physical slots. shard_epochs[shard], when given, is the epoch
    whose slot maps that shard serves this placement with: a shard whose experts did not change
    keeps the slot maps it already has, so an epoch change need not touch it (None: every shard
    uses `epoch`)."""

    epoch: int
    num_experts: int
    shard_experts: dict[int, tuple[tuple[int, ...], ...]]
    shard_epochs: tuple[int, ...] | None = None

    def layout_epoch(self, shard: int) -> int:
        """The epoch of the slot maps requests to `shard` name."""
        return self.epoch if self.shard_epochs is None else self.shard_epochs[shard]

    def restaged_shards(self) -> list[int]:
        """Shards whose slot maps are this epoch's own: staged for it, retired after it."""
        return [s for s in range(self.num_shards) if self.layout_epoch(s) == self.epoch]

    @property
    def num_shards(self) -> int:
        return len(next(iter(self.shard_experts.values()))) if self.shard_experts else 0

    def holders(self, layer: int, expert: int) -> list[int]:
        """Shards holding `expert` of `layer`."""
        return [s for s, experts in enumerate(self.shard_experts[layer]) if expert in experts]

    def holder_matrix(self, layers: list[int]) -> np.ndarray:
        """bool[L, E, S]: shard s holds expert e of MoE layer layers[l]."""
        held = np.zeros((len(layers), self.num_experts, self.num_shards), dtype=bool)
        for row, layer in enumerate(layers):
            for shard, experts in enumerate(self.shard_experts[layer]):
                held[row, list(experts), shard] = True
        return held

    def experts_of_shard(self, shard: int) -> dict[int, tuple[int, ...]]:
        return {layer: per_shard[shard] for layer, per_shard in self.shard_experts.items()}

    def validate(self) -> None:
        if self.shard_epochs is not None and (len(self.shard_epochs) != self.num_shards
                                              or any(e > self.epoch for e in self.shard_epochs)):
            raise ValueError(f"placement epoch {self.epoch}: shard_epochs {self.shard_epochs} must give each of "
                             f"{self.num_shards} shards an epoch <= {self.epoch}")
        for layer, per_shard in self.shard_experts.items():
            held = set().union(*map(set, per_shard))
            missing = set(range(self.num_experts)) - held
            if missing:
                raise ValueError(f"placement epoch {self.epoch}: layer {layer} has no shard for experts {sorted(missing)}")


def round_robin_placement(
    moe_layers: list[int], num_experts: int, num_shards: int, replicate: dict[int, list[int]] | None = None, epoch: int = 0
) -> Placement:
    """Expert e on shard e % num_shards; `replicate[layer]` lists experts also copied onto the
    next shard (a simple way to exercise replicated experts)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    replicate = replicate or {}
    layout = {}
    for layer in moe_layers:
        per_shard = [[e for e in range(num_experts) if e % num_shards == s] for s in range(num_shards)]
        for e in replicate.get(layer, []):
            extra = (e % num_shards + 1) % num_shards
            if e not in per_shard[extra]:
                per_shard[extra].append(e)
        layout[layer] = tuple(tuple(x) for x in per_shard)
    placement = Placement(epoch=epoch, num_experts=num_experts, shard_experts=layout)
    placement.validate()
    return placement


def placement_to_dict(placement: Placement) -> dict:
    """Plain JSON-able form (layer keys become strings in JSON)."""
    data = {"epoch": placement.epoch, "num_experts": placement.num_experts,
            "shard_experts": {str(layer): [list(x) for x in shards] for layer, shards in placement.shard_experts.items()}}
    if placement.shard_epochs is not None:
        data["shard_epochs"] = list(placement.shard_epochs)
    return data


def placement_from_dict(data: dict) -> Placement:
    return Placement(epoch=int(data["epoch"]), num_experts=int(data["num_experts"]),
                     shard_experts={int(layer): tuple(tuple(x) for x in shards)
                                    for layer, shards in data["shard_experts"].items()},
                     shard_epochs=tuple(int(e) for e in data["shard_epochs"]) if data.get("shard_epochs") else None)
