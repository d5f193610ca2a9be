"""Placement: which shard holds which logical experts of each MoE layer (replicas allowed).

Plain frozen data so it can cross process boundaries and be stored; the planners that produce
placements are pure functions.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """shard_experts[layer][shard] is the tuple of logical experts that shard holds for that MoE
    layer, in the order of its physical slots."""

    epoch: int
    num_experts: int
    shard_experts: dict[int, tuple[tuple[int, ...], ...]]

    @property
    def num_shards(self) -> int:
        return len(next(iter(self.shard_experts.values()))) if self.shard_experts else 0

    def holders(self, layer: int, expert: int) -> list[int]:
        """Shards holding `expert` of `layer`."""
        return [s for s, experts in enumerate(self.shard_experts[layer]) if expert in experts]

    def experts_of_shard(self, shard: int) -> dict[int, tuple[int, ...]]:
        return {layer: per_shard[shard] for layer, per_shard in self.shard_experts.items()}

    def validate(self) -> None:
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
    return {"epoch": placement.epoch, "num_experts": placement.num_experts,
            "shard_experts": {str(layer): [list(x) for x in shards] for layer, shards in placement.shard_experts.items()}}


def placement_from_dict(data: dict) -> Placement:
    return Placement(epoch=int(data["epoch"]), num_experts=int(data["num_experts"]),
                     shard_experts={int(layer): tuple(tuple(x) for x in shards)
                                    for layer, shards in data["shard_experts"].items()})
