"""The move-minimising half of placement planning: repairing a layer's current layout with as
few changes as possible (pure, plain Python; cluster/placement_planner.py decides when, and falls
back to packing afresh when this local search stalls).

Every shard a change touches costs control calls that take CPU from serving, and every expert it
loads costs a read: so the repair keeps the layout, makes it feasible under new limits, then
relieves only shards above (1 + tolerance) x the mean load, one action at a time."""

from dataclasses import dataclass

import numpy as np


class Layout:
    """One layer's layout while it is being repaired: which shard holds which experts, and the
    shard loads that follow (an expert's load split evenly over its copies)."""

    def __init__(self, load: np.ndarray, current: tuple[tuple[int, ...], ...], slots: tuple[int, ...]):
        self.load = [float(x) for x in load]
        self.slots = slots
        self.tiny = 1e-12 * max(1.0, sum(self.load))  # a load change below this is rounding
        num_experts = len(self.load)
        # Shards beyond the new count disappear; new shards start empty. Unknown ids and repeats
        # (never produced by a planner) are ignored.
        self.held = [set(e for e in current[s] if 0 <= e < num_experts) if s < len(current) else set()
                     for s in range(len(slots))]
        self.refresh()

    def refresh(self) -> None:
        self.holders: list[list[int]] = [[] for _ in self.load]
        for s, experts in enumerate(self.held):
            for e in experts:
                self.holders[e].append(s)
        self.per_copy = [w / max(1, len(h)) for w, h in zip(self.load, self.holders)]
        self.shard_load = [sum(self.per_copy[e] for e in experts) for experts in self.held]

    def copies(self, e: int) -> int:
        return len(self.holders[e])

    def has_room(self, s: int) -> bool:
        return len(self.held[s]) < self.slots[s]

    def apply(self, removes: tuple[tuple[int, int], ...] = (), adds: tuple[tuple[int, int], ...] = ()) -> None:
        """Remove, then add, (expert, shard) pairs."""
        for e, s in removes:
            self.held[s].discard(e)
        for e, s in adds:
            self.held[s].add(e)
        self.refresh()

    def loads_after(self, removes: tuple[tuple[int, int], ...], adds: tuple[tuple[int, int], ...]) -> dict[int, float]:
        """The new load of each shard whose load the change changes (a changed expert's load per
        copy changes with its number of copies, so its other holders can change too)."""
        delta: dict[int, float] = {}
        for e in {e for e, _ in removes} | {e for e, _ in adds}:
            after = set(self.holders[e]) - {s for x, s in removes if x == e} | {s for x, s in adds if x == e}
            for s in self.holders[e]:
                delta[s] = delta.get(s, 0.0) - self.per_copy[e]
            for s in after:
                delta[s] = delta.get(s, 0.0) + self.load[e] / len(after)
        return {s: self.shard_load[s] + d for s, d in delta.items() if abs(d) > self.tiny}


def _least_useful_copy(layout: Layout, shards: list[int]) -> tuple[int, int] | None:
    """(expert, shard) of the extra copy on `shards` whose removal costs least: the lowest load per
    copy (it spreads the least load), on the most loaded of its holders. None: no extra copies."""
    extra = [(layout.per_copy[e], -layout.shard_load[s], e, s) for s in shards for e in layout.held[s]
             if layout.copies(e) > 1]
    if not extra:
        return None
    _, _, e, s = min(extra)
    return e, s


def make_feasible(layout: Layout, max_copies: int) -> None:
    """Repair what the new limits forbid, with as few changes as possible: copies above max_copies
    are dropped (from their most loaded holders); an over-full shard first drops extra copies, then
    moves single-copy experts to shards with a free slot; experts left without a copy (their shard
    is gone) go, heaviest first, to the least loaded shard with a free slot. When no shard has a
    free slot, the least useful extra copy anywhere makes room: there are at least as many slots as
    experts, so a full layout missing an expert always holds an extra copy."""
    everywhere = list(range(len(layout.held)))
    for e in range(len(layout.load)):
        while layout.copies(e) > max_copies:
            layout.apply(removes=((e, max(layout.holders[e], key=lambda s: (layout.shard_load[s], s))),))
    while True:
        over = [s for s in everywhere if len(layout.held[s]) > layout.slots[s]]
        if not over:
            break
        s = over[0]
        copy = _least_useful_copy(layout, [s])
        if copy is None and not any(layout.has_room(t) for t in everywhere):
            copy = _least_useful_copy(layout, everywhere)
        if copy is not None:
            layout.apply(removes=(copy,))
            continue
        # Move the single-copy expert whose move leaves the pair of shards least loaded.
        loads, per_copy = layout.shard_load, layout.per_copy
        options = [(max(loads[s] - per_copy[e], loads[t] + per_copy[e]), e, t)
                   for e in sorted(layout.held[s]) for t in everywhere if t != s and layout.has_room(t)]
        _, e, t = min(options)
        layout.apply(removes=((e, s),), adds=((e, t),))
    for e in sorted((e for e in range(len(layout.load)) if layout.copies(e) == 0), key=lambda e: (-layout.load[e], e)):
        if not any(layout.has_room(t) for t in everywhere):
            layout.apply(removes=(_least_useful_copy(layout, everywhere),))
        t = min((t for t in everywhere if layout.has_room(t)), key=lambda t: (layout.shard_load[t], len(layout.held[t]), t))
        layout.apply(adds=((e, t),))


@dataclass(frozen=True)
class _Action:
    """One change to a layout: remove, then add, (expert, shard) pairs. `loads`: expert weights to
    load; `touches`: shards whose expert sets change."""

    removes: tuple[tuple[int, int], ...]
    adds: tuple[tuple[int, int], ...]

    @property
    def loads(self) -> int:
        return len(self.adds)

    @property
    def touches(self) -> frozenset[int]:
        return frozenset(s for _, s in self.removes + self.adds)


def _simple_actions(layout: Layout, s: int, max_copies: int, mean_per_slot: float) -> list[_Action]:
    """The single changes that can take load off shard s: drop one of its extra copies (its other
    holders take the load; nothing is loaded), move one of its experts to a shard with a free slot,
    add a copy of one of its experts to a shard with a free slot (only for an expert whose load per
    copy is above the mean load per slot: replicating a cold expert buys nothing), or swap one of
    its experts with one another shard holds."""
    held, load, per_copy, actions = layout.held, layout.shard_load, layout.per_copy, []
    for a in sorted(held[s]):
        if layout.copies(a) > 1:
            actions.append(_Action(((a, s),), ()))
        replicable = layout.copies(a) < max_copies and per_copy[a] > mean_per_slot
        for t in range(len(held)):
            if t == s or a in held[t]:
                continue
            # Left out early: those that would load t up to s's load (they cannot help).
            if layout.has_room(t) and load[t] + per_copy[a] < load[s]:
                actions.append(_Action(((a, s),), ((a, t),)))
            if layout.has_room(t) and replicable and load[t] + layout.load[a] / (layout.copies(a) + 1) < load[s]:
                actions.append(_Action((), ((a, t),)))
            actions += [_Action(((a, s), (b, t)), ((a, t), (b, s))) for b in sorted(held[t] - held[s])
                        if per_copy[b] < per_copy[a] and load[t] + per_copy[a] - per_copy[b] < load[s]]
    return actions


def _room_making_actions(layout: Layout, s: int, max_copies: int, mean_per_slot: float) -> list[_Action]:
    """For when no simple action helps because the shards that could take load are full (one very
    hot expert alone on its shard, say): move or copy one of s's experts to a full shard t, which
    makes room by dropping one of its extra copies or by passing one of its experts to the least
    loaded other shard with a free slot, or, for a copy, to s itself (passing one to s while an
    expert leaves s is a swap, a simple action)."""
    held, actions = layout.held, []
    for t in range(len(held)):
        if t == s or layout.has_room(t):
            continue
        spare = [u for u in range(len(held)) if u not in (s, t) and layout.has_room(u)]
        room = [(((c, t),), ()) for c in sorted(held[t]) if layout.copies(c) > 1]
        for u in [min(spare, key=lambda u: (layout.shard_load[u], u))] if spare else []:
            room += [(((c, t),), ((c, u),)) for c in sorted(held[t] - held[u])]
        to_s = [(((c, t),), ((c, s),)) for c in sorted(held[t] - held[s])] if layout.has_room(s) else []
        for a in sorted(held[s] - held[t]):
            actions += [_Action(((a, s),) + removes, ((a, t),) + adds) for removes, adds in room]
            if layout.copies(a) < max_copies and layout.per_copy[a] > mean_per_slot:
                actions += [_Action(removes, ((a, t),) + adds) for removes, adds in room + to_s]
    return actions


def _moved_load(layout: Layout, action: _Action) -> float:
    """Load per copy of the copies an action adds or removes: between equally good actions, the
    one that leaves the hottest experts where they are."""
    return sum(layout.per_copy[e] for e, _ in action.removes + action.adds)


def improve(layout: Layout, tolerance: float, max_copies: int, touched: set[int]) -> None:
    """While the most loaded shard is above (1 + tolerance) x the mean shard load, apply the single
    action that lowers it most (simple actions first; ones that make room on a full shard only
    when no simple action helps); stop when none lowers it. Every action that ends under the
    target is as good as any other: among those, the one touching fewest shards not yet touched
    (in any layer: a shard's control calls cost the same whatever changed on it), then loading
    fewest experts, then the lowest peak, then moving the least load. Each action lowers the most
    loaded shard and leaves every shard whose load it changes below that shard's old load, so the
    sorted shard loads fall at each step: the loop ends (it is also capped)."""
    total = sum(layout.load)
    target = total / len(layout.held) * (1 + tolerance)
    mean_per_slot = total / max(1, sum(layout.slots))
    eps = 1e-9 * max(1.0, total)
    max_copies = min(max_copies, len(layout.held))
    for _ in range(4 * len(layout.load)):
        s = max(range(len(layout.held)), key=lambda x: (layout.shard_load[x], -x))
        if layout.shard_load[s] <= target + eps:
            return
        best = None
        for candidates in (_simple_actions, _room_making_actions):
            scored = []
            for action in candidates(layout, s, max_copies, mean_per_slot):
                after = layout.loads_after(action.removes, action.adds)
                # It must lower s; the shards it loads must stay below s's old load (those it
                # leaves alone, an equally loaded twin of s say, are for later steps).
                if s in after and max(after.values()) < layout.shard_load[s] - eps:
                    scored.append((max(after.values()), action))
            if scored:
                best = min(scored, key=lambda x: (max(x[0], target), len(x[1].touches - touched), x[1].loads, x[0],
                                                  _moved_load(layout, x[1])))[1]
                break
        if best is None:
            return
        layout.apply(best.removes, best.adds)
        touched |= best.touches
