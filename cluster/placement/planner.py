"""Placement planning, pure functions over plain data (numpy only; no Ray, Redis or clock).

plan_placement(load, current, moe_layers, limits) -> Placement
    load: [L, E] tokens per expert per MoE layer over the load window (row i is moe_layers[i]).
    Without a current placement (or for a layer it lacks): balanced packing from scratch, heaviest
    copy first onto the least loaded shard; spare slots hold extra copies of the hottest experts.
    With one: a move-minimising repair of the current layout. Every shard touched costs control
    calls that steal CPU from serving, so the planner changes only what it must: it keeps the
    current layout (shards beyond the new shard count dropped, new shards empty), makes it
    feasible (every expert held, no shard above its slot limit, no expert above max_copies), then,
    while the most loaded shard is above (1 + tolerance) x the mean shard load, applies the single
    action that best lowers it (move, swap, add a copy, drop a copy). A feasible layer whose shards
    are all within tolerance is returned unchanged. When this local search stalls further than the
    tolerance from what packing afresh achieves (rare: a hot expert that only a copy plus several
    moves at once would split), that layer is packed afresh. Per-shard slot limits (memory) are
    always respected.
diff(old, new) -> list[ExpertMove]
    What must load where (from a peer that already holds the expert when one exists, else from
    the checkpoint) and what can be freed, to go from `old` to `new`.
"""

from dataclasses import dataclass

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.repair import Layout, improve, make_feasible


@dataclass(frozen=True)
class PlacementLimits:
    """slots_per_shard[s]: experts shard s can hold per MoE layer (its memory limit).
    tolerance: when planning from a current placement, a shard whose load is within
    (1 + tolerance) x the mean shard load is left alone, and only shards above it are relieved
    (when a layer has to be packed afresh, an expert stays on its current shard while that shard
    is within the same bound). max_copies: copies of one expert at most."""

    slots_per_shard: tuple[int, ...]
    tolerance: float = 0.1
    max_copies: int = 2


@dataclass(frozen=True)
class ExpertMove:
    layer: int
    expert: int
    shard: int
    action: str  # "load" or "free"
    source_shard: int | None = None  # for loads: a shard that already holds the weights (None: the checkpoint)


def _copies(load: np.ndarray, spare: int, max_copies: int, num_shards: int) -> np.ndarray:
    """Copies per expert: one each, then spare slots to whichever expert has the highest load per
    copy, while that is above the mean load per slot (replicating a cold expert buys nothing)."""
    copies = np.ones(len(load), dtype=np.int64)
    mean_per_slot = load.sum() / max(1, len(load) + spare)
    cap = min(max_copies, num_shards)
    for _ in range(spare):
        per_copy = np.where(copies < cap, load / copies, -1.0)
        hottest = int(np.argmax(per_copy))
        if per_copy[hottest] <= mean_per_slot:
            break
        copies[hottest] += 1
    return copies


def pack_layer(load: np.ndarray, current: tuple[tuple[int, ...], ...] | None, limits: PlacementLimits) -> tuple[tuple[int, ...], ...]:
    """One layer packed afresh: the plan without a current layout, and the repair's fallback
    (then `current` is given: an expert stays on a shard that holds it while it fits the target)."""
    slots = limits.slots_per_shard
    num_shards, num_experts = len(slots), len(load)
    copies = _copies(load.astype(np.float64), sum(slots) - num_experts, limits.max_copies, num_shards)
    # Copy list, heaviest first (stable on expert id for determinism).
    items = sorted(((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])), key=lambda x: (-x[0], x[1]))
    shard_load = np.zeros(num_shards)
    held: list[list[int]] = [[] for _ in range(num_shards)]
    target = load.sum() / num_shards * (1 + limits.tolerance)
    holders: dict[int, list[int]] = {}
    for s, experts in enumerate((current or ())[:num_shards]):
        for e in experts:
            holders.setdefault(e, []).append(s)
    # One pass, heaviest copy first: stay on a shard that already holds the expert while that
    # shard keeps within the target load; otherwise the least loaded shard with a free slot
    # (longest-processing-time packing). An extra copy never takes a slot that an expert with no
    # copy yet still needs, and is dropped when only shards already holding its expert have room
    # (greedy packing can end there): every expert always gets a slot.
    without_copy, free_slots = set(range(num_experts)), sum(slots)
    for weight, e in items:
        free = [s for s in range(num_shards) if len(held[s]) < slots[s] and e not in held[s]]
        if e not in without_copy and (not free or free_slots - 1 < len(without_copy)):
            continue
        if not free:
            raise ValueError(f"no shard has a free slot for expert {e}: slots {slots} for {num_experts} experts")
        without_copy.discard(e)
        free_slots -= 1
        staying = [s for s in holders.get(e, []) if s in free and shard_load[s] + weight <= target + 1e-9]
        s = staying[0] if staying else min(free, key=lambda c: (shard_load[c], len(held[c]), c))
        if s in holders.get(e, []):
            holders[e].remove(s)
        held[s].append(e)
        shard_load[s] += weight
    return tuple(tuple(sorted(h)) for h in held)


def _peak_load(load: np.ndarray, layer: tuple[tuple[int, ...], ...], slots: tuple[int, ...]) -> float:
    return max(Layout(load, layer, slots).shard_load)


def _repair_layer(load: np.ndarray, current: tuple[tuple[int, ...], ...], limits: PlacementLimits,
                  touched: set[int]) -> tuple[tuple[int, ...], ...]:
    """The current layout, changed only as far as the limits and the tolerance require; the
    shards it changes are added to `touched`. A shard whose experts did not change keeps its tuple
    as it was (same slot order, so it is not restaged).

    The repair is a local search: one action at a time, each lowering the most loaded shard. When
    it ends above the target and further than the tolerance from what a fresh packing achieves
    (a very hot expert that needs a copy and several moves at once to split it, say), the layer
    is packed afresh instead: warm (experts stay where the packing allows) when that is as good,
    else from scratch. So a layer is never worse than (1 + tolerance) x the fresh packing's peak,
    nor worse than the target."""
    slots = limits.slots_per_shard
    before = [set(current[s]) if s < len(current) else set() for s in range(len(slots))]
    layout = Layout(load, current, slots)
    make_feasible(layout, limits.max_copies)
    improve(layout, limits.tolerance, limits.max_copies,
            touched | {s for s, experts in enumerate(layout.held) if experts != before[s]})
    held = layout.held
    total = float(np.sum(load))
    eps = 1e-9 * max(1.0, total)
    if max(layout.shard_load) > total / len(slots) * (1 + limits.tolerance) + eps:
        fresh = pack_layer(load, None, limits)
        bar = (1 + limits.tolerance) * _peak_load(load, fresh, slots) + eps
        if max(layout.shard_load) > bar:
            warm = pack_layer(load, current[:len(slots)], limits)
            held = [set(experts) for experts in (warm if _peak_load(load, warm, slots) <= bar else fresh)]
    touched |= {s for s, experts in enumerate(held) if experts != before[s]}
    return tuple(tuple(current[s]) if s < len(current) and experts == before[s] else tuple(sorted(experts))
                 for s, experts in enumerate(held))


def plan_placement(load: np.ndarray, current: Placement | None, moe_layers: list[int], limits: PlacementLimits) -> Placement:
    """load: [L, E] with row i for moe_layers[i]. Returns the next epoch's placement: packed from
    scratch without `current`, else `current` repaired with as few changes as possible."""
    load = np.asarray(load, dtype=np.float64)
    num_experts = load.shape[1]
    if sum(limits.slots_per_shard) < num_experts:
        raise ValueError(f"{sum(limits.slots_per_shard)} slots in all (per shard {limits.slots_per_shard}) "
                         f"cannot hold {num_experts} experts")
    layout, touched = {}, set()
    for row, layer in enumerate(moe_layers):
        previous = current.shard_experts.get(layer) if current is not None else None
        if previous is None:
            layout[layer] = pack_layer(load[row], None, limits)
        else:
            layout[layer] = _repair_layer(load[row], previous, limits, touched)
    placement = Placement(epoch=(current.epoch + 1) if current is not None else 0, num_experts=num_experts,
                          shard_experts=layout)
    placement.validate()
    return placement


def scale_limits(num_experts: int, num_shards: int, spare_per_shard: int = 0) -> PlacementLimits:
    """Even slot limits for `num_shards` shards: room for every expert plus spare slots, which
    hold second copies of hot experts."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    spare = spare_per_shard if num_shards > 1 else 0
    return PlacementLimits(slots_per_shard=(-(-num_experts // num_shards) + spare,) * num_shards)


def diff(old: Placement, new: Placement) -> list[ExpertMove]:
    """Loads first (sources are shards of the old epoch that hold the expert), then frees."""
    loads, frees = [], []
    for layer, new_shards in new.shard_experts.items():
        old_shards = old.shard_experts.get(layer, ())
        for s, experts in enumerate(new_shards):
            before = set(old_shards[s]) if s < len(old_shards) else set()
            for e in sorted(set(experts) - before):
                source = next((o for o, held in enumerate(old_shards) if e in held), None)
                loads.append(ExpertMove(layer, e, s, "load", source))
        for s, experts in enumerate(old_shards):
            after = set(new_shards[s]) if s < len(new_shards) else set()
            for e in sorted(set(experts) - after):
                frees.append(ExpertMove(layer, e, s, "free"))
    return loads + frees


def imbalance(load: np.ndarray, placement: Placement, moe_layers: list[int]) -> float:
    """max / mean shard load (an expert's load split evenly over its copies), worst layer."""
    worst = 1.0
    for row, layer in enumerate(moe_layers):
        per_shard = np.zeros(placement.num_shards)
        for e in range(placement.num_experts):
            holders = placement.holders(layer, e)
            for s in holders:
                per_shard[s] += load[row, e] / len(holders)
        if per_shard.mean() > 0:
            worst = max(worst, float(per_shard.max() / per_shard.mean()))
    return worst
