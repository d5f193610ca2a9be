"""The pure half of staging a placement epoch: which expert each shard of the new epoch copies
from which peer (the rest come from the checkpoint), and which shards keep the slot maps they
have. Shard indices are identities: index i of the new placement is the same shard as index i of
the old one unless it is listed in `lost`. Plain data in, plain data out; the calls that carry
it out are in experts/staging.py."""

from collections import defaultdict

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.planner import diff

ExpertKey = tuple[int, int]


def without_shards(placement: Placement, shards: set[int]) -> Placement:
    """`placement` with the given shards emptied (their experts can no longer be copied from them)."""
    return Placement(placement.epoch, placement.num_experts,
                     {layer: tuple(() if s in shards else experts for s, experts in enumerate(per_shard))
                      for layer, per_shard in placement.shard_experts.items()})


def peer_sources(old: Placement | None, new: Placement, lost: set[int] = frozenset()) -> dict[int, dict[int, list[ExpertKey]]]:
    """target shard -> source shard -> (layer, expert) pairs to copy from that peer. Experts
    with no live holder in `old` are absent: the target reads them from the checkpoint."""
    if old is None:
        return {}
    out: dict[int, dict[int, list[ExpertKey]]] = defaultdict(lambda: defaultdict(list))
    base = without_shards(old, set(lost))
    for move in diff(base, new):
        if move.action == "load" and move.source_shard is not None and move.source_shard not in lost:
            out[move.shard][move.source_shard].append((move.layer, move.expert))
    return {t: dict(by_source) for t, by_source in out.items()}


def layout_epochs(old: Placement | None, old_names: list[str], new: Placement, new_names: list[str],
                  lost: set[int] = frozenset()) -> tuple[int, ...]:
    """Per shard of `new` (named new_names[i]): the epoch of the slot maps it serves `new` with.
    A shard that served `old` (same name, not lost) with the same experts in the same slots keeps
    its old layout epoch; any other shard must be staged, under new.epoch."""
    index_in_old = {name: i for i, name in enumerate(old_names)} if old is not None else {}
    epochs = []
    for shard, name in enumerate(new_names):
        before = index_in_old.get(name)
        unchanged = (before is not None and before not in lost
                     and old.experts_of_shard(before) == new.experts_of_shard(shard))
        epochs.append(old.layout_epoch(before) if unchanged else new.epoch)
    return tuple(epochs)
