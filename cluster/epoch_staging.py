"""Staging a placement epoch on shards while the current one serves: each shard of the new epoch
gets the experts it lacks — from a peer shard that holds them (handed over through Ray's object
store, never through the caller) or else from the checkpoint — and installs the new epoch's
slots. Experts a shard already holds stay where they are, untouched.

Shard indices are identities: index i of the new placement is the same shard as index i of the
old one unless it is listed in `lost` (then a fresh shard takes its place and it is no source).

A shard whose experts and slots do not change keeps the slot maps it has (`layout_epochs`), so
an epoch change calls only the shards it changes: on a busy machine every control call takes
CPU from serving."""

import time
from collections import defaultdict

from moefleet.actors.shard_host import control
from moefleet.cluster.placement import Placement
from moefleet.cluster.placement_planner import diff

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


def stage_remote(old_actors: list, new_actors: list, old: Placement | None, new: Placement, timeout_s: float,
                 lost: set[int] = frozenset(), from_peers: bool = True, pace_s: float = 0.0) -> list[dict]:
    """Stage `new` on the shard actors it changes (new_actors[i] serves index i; a shard whose
    layout epoch is older than new.epoch keeps its slot maps and is not called). Returns each
    staged shard's report (experts loaded from the checkpoint and from peers, seconds). Without
    `from_peers` every expert a shard lacks is read from the checkpoint. With `pace_s` > 0 the
    shards are staged one after another with that pause between them (see `paced`)."""
    import ray

    sources = peer_sources(old, new, lost) if from_peers else {}

    def stage(target: int):
        exports = [control(old_actors[source], "export").remote(keys)
                   for source, keys in sources.get(target, {}).items()]
        return control(new_actors[target], "stage").remote(new.epoch, new.experts_of_shard(target), *exports)

    return paced(stage, new.restaged_shards(), pace_s, timeout_s)


def paced(call, items: list, pace_s: float, timeout_s: float) -> list:
    """ray.get of call(item) for every item: all at once when pace_s is 0, else one after another
    with pace_s between them. A change's control calls take CPU from serving (on a busy machine,
    10-30 ms in the one engine step they land in); paced, each step loses a little instead of
    one step stalling, and the change takes longer."""
    import ray

    if pace_s <= 0:
        return ray.get([call(item) for item in items], timeout=timeout_s)
    results = []
    for n, item in enumerate(items):
        if n:
            time.sleep(pace_s)
        results.append(ray.get(call(item), timeout=timeout_s))
    return results


def stage_local(old_shards: list, new_shards: list, reader, old: Placement | None, new: Placement,
                lost: set[int] = frozenset()) -> None:
    """The in-process twin: a peer's expert is shared (same weight objects, no copy)."""
    for target, by_source in peer_sources(old, new, lost).items():
        for source, keys in by_source.items():
            for key in keys:
                new_shards[target].weights.setdefault(key, old_shards[source].weights[key])
    for target, shard in enumerate(new_shards):
        experts = new.experts_of_shard(target)
        shard.load_missing(reader, experts)
        shard.install_epoch(new.epoch, experts)
