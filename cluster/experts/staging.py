"""Staging a placement epoch on shards while the current one serves: each shard of the new epoch
gets the experts it lacks — from a peer shard that holds them (handed over through Ray's object
store, never through the caller) or else from the checkpoint — and installs the new epoch's
slots. Experts a shard already holds stay where they are, untouched. What moves from where is
planned, purely, in placement/staging_plan.py; this module carries it out.

A shard whose experts and slots do not change keeps the slot maps it has (`layout_epochs`), so
an epoch change calls only the shards it changes: on a busy machine every control call takes
CPU from serving."""

import time

from moefleet.cluster.experts.wire import control
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.staging_plan import peer_sources


def stage_remote(old_actors: list, new_actors: list, old: Placement | None, new: Placement, timeout_s: float,
                 lost: set[int] = frozenset(), from_peers: bool = True, pace_s: float = 0.0) -> list[dict]:
    """Stage `new` on the shard actors it changes (new_actors[i] serves index i; a shard whose
    layout epoch is older than new.epoch keeps its slot maps and is not called). Returns each
    staged shard's report (experts loaded from the checkpoint and from peers, seconds). Without
    `from_peers` every expert a shard lacks is read from the checkpoint. With `pace_s` > 0 the
    shards are staged one after another with that pause between them (see `paced`)."""

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
