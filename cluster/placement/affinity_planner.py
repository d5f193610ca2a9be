"""Expert grouping: a placement that keeps each token's experts on few shards and each request's
experts on one node, at balanced shard load (pure: numpy and the standard library).

plan_affinity_placement(stats, current, shard_nodes, limits, objective) -> Placement

What it maximises, per plan (every term counted over the routing in `stats`):
  - sends                       what the token-layers' sends cost, counted token by token on the
                                stats' token sample (sampled_sends.py): 1 per distinct shard a
                                token sends to on its own node, cross_node_weight per one on
                                another, a token as likely on any node (request shuffling comes
                                from the plan, so it is not known yet)
  + (cross_node_weight - 1) x   node co-use: sum over nodes of ||sum of co_use_factors of the
                                (layer, expert) items the node holds||^2, which approximates the
                                activations each request finds on one node (routing_stats.py):
                                what request shuffling can add to the sends above, where requests
                                differ in the experts they use
  - move_cost x (mean activations per expert of the layer) per expert copy loaded that `current`
                                did not hold (and per extra copy, without one)
subject to: slot limits (never exceeded), every expert held, at most max_copies copies, and per
layer the most loaded shard (an expert's load split evenly over its copies, as `imbalance`
counts it) within (1 + balance_tolerance) x the mean shard load. Where that is not achievable,
the layer is kept no worse than the load-only planner's packing (`pack_layer`), or than the
balance-repaired current layout.

How, and why so. Request co-use across layers is what decides nodes, and for a large model
(58 layers x 256 experts) the dense item x item table is too big; the planner works on its
rank-D sketch instead, where a node's co-use is the squared norm of one D-vector, so a change
is scored in O(D). Clustering the requests into one group per node and giving each node its
group's experts would need the request profiles at plan time (memory growing with the trace)
or the node count when counting; the sketch holds the same structure in L x E x D numbers,
whatever the trace and the topology, and lets grouping and balance be decided together. Three
steps:
1. Nodes: a balanced k-means over the (layer, expert) items in that space. Seed one direction
   per node (the strongest item, then each next the strongest item least like those chosen),
   then alternate: give each layer's expert copies to nodes, heaviest first, each to the node
   whose direction it matches best among those with load and slot room (copies of one expert on
   different nodes where possible: a copy per node removes that expert's cross-node sends), and
   recompute each node's direction from what it holds. Copies per expert are `pack_layer`'s
   (what balance needs).
2. Shards: each node's copies go to its shards heaviest first, to the least loaded one
   (longest-processing-time packing); where a node ended above its share, the load-only repair
   (`plan_placement` from this layout) relieves it with few changes.
3. A local search polishes the whole objective, layer by layer: every change of one expert copy
   (move it to a shard with a free slot, swap it with a copy on another shard, add a copy in a
   spare slot, drop it) is scored at once in numpy (the sends of a change to one expert's copies
   exactly, from per-layer tables of the sample; a swap's as its two moves' less the tokens that
   chose both), each copy's best is applied best first if it still gains when rescored exactly
   (the sends on the sampled tokens it touches), and rounds repeat until no change gains more
   than it costs. Swaps keep every shard's count, so they regroup experts even when all slots
   are full; the search adds copies where they save sends and drops those that do not pay for
   their slot, always within the balance cap.
   The search runs from two starts, and the plan is the better by the objective: the layout of
   step 2, and the same first polished with pairs of experts chosen by one token-layer that share
   a shard in place of the sends (what this planner counted before the sends). Sends alone can
   stall where routing has strong groups: while a token's experts are spread over many shards,
   moving one of them saves nothing until the last leaves a shard, where every pair brought
   together already counts. On synthetic topic routing (tests' topic_routing, 12 layers x 256
   experts top-8, 32 shards on 4 nodes, requests to nodes in turn) cross-node sends per token:
   pairs alone 17.2, sends alone 19.9, both starts 16.9 (the offline traces: docs/benchmarks.md,
   benchmarks/speculative.py).
Measured on 58 x 256 top-8, 1M token occurrences, 32 shards on 4 nodes, on 2 shared cores: a
plan in about 83 s, from it 89 s, from a load-only placement 153 s (tests/unit/test_affinity_planner.py,
the timing test; the pairs-only planner took 13, 12 and 23 s, for 20.3 cross-node sends per token
where this one gives 18.1).

Moves against `current`: the plan is the better, by the objective with its move cost, of two
searches that both pay move_cost for each copy loaded, so an expert stays unless moving it
gains more: (a) from the current layout itself, each layer that is infeasible or above the
target (or above the fresh plan's peak, where the target is out of reach) first repaired by
`plan_placement` (which changes only what it must); (b) from the fresh plan with its nodes and
shards renamed to overlap the current layout most. Then the winner is checked the way planning
again from it would: the fresh plan renamed to it and polished against it replaces it while
that gains more than its own moves cost (which makes it better against `current` too). So a
plan given back as `current` with the same stats comes back unchanged: nothing pays any more.

Deterministic throughout: ties go to the lower index, the sketch's random test matrix and the
token sample are seeded.
"""

from dataclasses import dataclass, replace

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.planner import PlacementLimits, pack_layer, plan_placement
from moefleet.cluster.placement.routing_stats import RoutingStats
from moefleet.cluster.placement.sampled_sends import SampledSends

_NODE_ROUNDS = 12  # rounds of the node k-means at most (it settles in about five)
_SEARCH_SWEEPS = 60  # local-search sweeps over all layers at most (it settles in under ten)
_CHALLENGES = 3  # rounds of checking a warm plan against the fresh one at most (one, nearly always)


@dataclass(frozen=True)
class AffinityObjective:
    """balance_tolerance: per layer, the most loaded shard stays within (1 + this) x the mean
    shard load wherever that is achievable. cross_node_weight: cost of a cross-node send relative
    to a same-node one (>= 1). move_cost: what loading one expert copy costs, in activations of
    an average expert of its layer over the routing in the stats: a change pays only when it
    saves more sends than that."""

    balance_tolerance: float = 0.15
    cross_node_weight: float = 4.0
    move_cost: float = 0.1

    def __post_init__(self) -> None:
        if not self.balance_tolerance >= 0:
            raise ValueError(f"balance_tolerance must be >= 0, got {self.balance_tolerance}")
        if not self.cross_node_weight >= 1:
            raise ValueError(f"cross_node_weight must be >= 1 (a cross-node send costs at least a local one), "
                             f"got {self.cross_node_weight}")
        if not self.move_cost >= 0:
            raise ValueError(f"move_cost must be >= 0, got {self.move_cost}")


def plan_affinity_placement(stats: RoutingStats, current: Placement | None, shard_nodes: tuple[int, ...],
                            limits: PlacementLimits, objective: AffinityObjective = AffinityObjective()) -> Placement:
    """The next epoch's placement for MoE layers 0..L-1 of `stats`: grouped from scratch without
    `current`, else moved from it only where a move pays. shard_nodes[s]: the node of shard s
    (one per entry of limits.slots_per_shard)."""
    if current is not None and current.num_experts != stats.num_experts:
        raise ValueError(f"current placement has {current.num_experts} experts per layer, "
                         f"the stats {stats.num_experts}")
    problem = _Problem(stats, tuple(shard_nodes), limits, objective)
    fresh = problem.fresh_plan()
    if current is None:
        return problem.placement(fresh, None)
    reference = problem.held_of(current)
    renamed_start = problem.renamed_like(fresh, reference)
    kept = _Search(problem, problem.kept_start(current, reference, renamed_start, fresh), reference)
    kept.descend()
    renamed = _Search(problem, renamed_start, reference)
    renamed.descend()
    held = (renamed if renamed.score() > kept.score() + problem.tiny else kept).held
    # What planning again from this plan would weigh: the fresh plan renamed to it and polished
    # against it. Where that beats it, it is better against `current` too (it gains more than its
    # own moves cost), and it is taken; so the plan given back comes back unchanged.
    for _ in range(_CHALLENGES):
        challenger = _Search(problem, problem.renamed_like(fresh, held), held)
        challenger.descend()
        if challenger.score() <= _Search(problem, held, held).score() + problem.tiny:
            break
        held = challenger.held
    return problem.placement(held, current)


class _Problem:
    """The fixed inputs of one plan, checked, in the shapes the search uses (S shards, M nodes)."""

    def __init__(self, stats: RoutingStats, shard_nodes: tuple[int, ...], limits: PlacementLimits,
                 objective: AffinityObjective):
        if stats.num_layers == 0:
            raise ValueError("stats hold no MoE layer to place")
        slots = tuple(limits.slots_per_shard)
        if len(shard_nodes) != len(slots):
            raise ValueError(f"shard_nodes names {len(shard_nodes)} shards, limits.slots_per_shard {len(slots)}")
        if not slots or min(slots) < 0:
            raise ValueError(f"limits.slots_per_shard must give each shard >= 0 slots, got {slots}")
        if sum(slots) < stats.num_experts:
            raise ValueError(f"{sum(slots)} slots in all (per shard {slots}) cannot hold {stats.num_experts} experts")
        if limits.max_copies < 1:
            raise ValueError(f"limits.max_copies must be >= 1, got {limits.max_copies}")
        self.limits = replace(limits, tolerance=objective.balance_tolerance)  # what the load-only repair keeps to
        self.load = stats.load.astype(np.float64)                       # [L, E]
        self.coactivation = stats.coactivation.astype(np.float64)       # [L, E, E]
        self.factors = stats.co_use_factors.astype(np.float64)          # [L, E, D]
        self.norms = np.einsum("led,led->le", self.factors, self.factors)  # [L, E]
        self.slots = np.array(slots, dtype=np.int64)                    # [S]
        node_ids = sorted(set(shard_nodes))
        self.node_of_shard = np.array([node_ids.index(n) for n in shard_nodes])  # [S]
        self.num_nodes = len(node_ids)
        self.node_onehot = np.eye(self.num_nodes, dtype=np.int64)[self.node_of_shard]  # [S, M]
        self.shards_of_node = [np.flatnonzero(self.node_of_shard == n) for n in range(self.num_nodes)]
        self.max_copies = min(limits.max_copies, len(slots))
        totals = self.load.sum(axis=1)
        self.target = totals / len(slots) * (1 + objective.balance_tolerance)  # [L]
        self.node_tolerance = objective.balance_tolerance / 2  # room left for packing each node's shards
        self.node_weight = objective.cross_node_weight - 1
        self.move_cost = objective.move_cost * totals / max(1, stats.num_experts)  # [L]
        self.sends = SampledSends(stats.sample, stats.tokens_per_sample, self.node_of_shard,
                                  objective.cross_node_weight, stats.num_experts)
        self.tiny = 1e-9 * max(1.0, float(totals.sum()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, E, S)"""
        return (*self.load.shape, len(self.slots))

    def held_of(self, placement: Placement) -> np.ndarray:
        """bool[L, E, S]: which shard holds which expert, for the layers and shards both know."""
        held = np.zeros(self.shape, dtype=bool)
        for layer, per_shard in placement.shard_experts.items():
            if 0 <= layer < self.shape[0]:
                held[layer] = self.held_of_layer(per_shard)
        return held

    def held_of_layer(self, per_shard: tuple[tuple[int, ...], ...]) -> np.ndarray:
        """bool[E, S] from one layer's experts per shard (shards and ids beyond ours ignored)."""
        experts, shards = self.shape[1:]
        held = np.zeros((experts, shards), dtype=bool)
        for s, held_experts in enumerate(per_shard[:shards]):
            held[[e for e in held_experts if 0 <= e < experts], s] = True
        return held

    def placement(self, held: np.ndarray, current: Placement | None) -> Placement:
        """held: bool[L, E, S]. A shard whose experts did not change keeps its slot order."""
        layout = {}
        for layer in range(held.shape[0]):
            before = current.shard_experts.get(layer, ()) if current is not None else ()
            per_shard = []
            for s in range(held.shape[2]):
                experts = tuple(int(e) for e in np.flatnonzero(held[layer, :, s]))
                per_shard.append(before[s] if s < len(before) and set(before[s]) == set(experts) else experts)
            layout[layer] = tuple(per_shard)
        placement = Placement(epoch=current.epoch + 1 if current is not None else 0, num_experts=held.shape[1],
                              shard_experts=layout)
        placement.validate()
        return placement

    def feasible(self, held: np.ndarray) -> bool:
        """held: bool[E, S]: every expert held, at most max_copies copies, no shard over its slots."""
        copies = held.sum(axis=1)
        return bool(copies.min() >= 1 and copies.max() <= self.max_copies and np.all(held.sum(axis=0) <= self.slots))

    def kept_start(self, current: Placement, reference: np.ndarray, renamed: np.ndarray,
                   fresh: np.ndarray) -> np.ndarray:
        """bool[L, E, S]: where the search that keeps the current layout starts. A layer that is
        feasible and no more loaded than the fresh plan allows (the target, or the fresh plan's
        peak where that is above it) stays as it is; one that is not is repaired by the load-only
        planner (as few changes as its limits and tolerance need); where even that stays above,
        the layer starts from the renamed fresh plan, so the plan meets the target wherever the
        fresh one does."""
        layers = self.shape[0]
        bar = [max(self.target[layer], _peak(self.load[layer], fresh[layer])) + self.tiny for layer in range(layers)]
        start = reference.copy()
        needs_repair = [layer for layer in range(layers) if not self.feasible(start[layer])
                        or _peak(self.load[layer], start[layer]) > bar[layer]]
        if needs_repair:
            repaired = self.held_of(plan_placement(self.load, current, list(range(layers)), self.limits))
            for layer in needs_repair:
                good = _peak(self.load[layer], repaired[layer]) <= bar[layer]
                start[layer] = repaired[layer] if good else renamed[layer]
        return start

    # The fresh plan: copies from the load-only packing, nodes by k-means, shards by packing.

    def fresh_plan(self) -> np.ndarray:
        """bool[L, E, S]: grouped, balanced, polished by the local search."""
        layers = self.shape[0]
        packed = np.stack([self.held_of_layer(pack_layer(self.load[layer], None, self.limits))
                           for layer in range(layers)])
        nodes = self._group_nodes(packed.sum(axis=2))
        grouped = np.stack([self._pack_shards(layer, nodes[layer]) for layer in range(layers)])
        # Grouping by affinity can leave a node, and so its shards, above the target: the
        # load-only repair relieves them with few changes, and where even that stays above what
        # the load-only packing achieves, the layer starts from that packing.
        held = self.held_of(plan_placement(self.load, self.placement(grouped, None), list(range(layers)), self.limits))
        for layer in range(layers):
            if _peak(self.load[layer], held[layer]) > max(self.target[layer], _peak(self.load[layer], packed[layer])) \
                    + self.tiny:
                held[layer] = packed[layer]
        # Two starts, and the better by the objective is the plan (step 3 of the module docstring):
        # this layout, and this layout first grouped by pairs of co-chosen experts on a shard in
        # place of the sends.
        by_pairs = _Search(self, held, np.zeros(self.shape, dtype=bool), pairs_weight=1.0, sends_weight=0.0)
        by_pairs.descend()
        searches = [_Search(self, start, np.zeros(self.shape, dtype=bool)) for start in (held, by_pairs.held)]
        for search in searches:
            search.descend()
        return max(searches, key=lambda search: search.score()).held

    def _group_nodes(self, copies: np.ndarray) -> list[list[tuple[int, int]]]:
        """copies: int[L, E]. Per layer, (expert, node) for each copy: the balanced k-means."""
        layers, experts, _ = self.shape
        flat = self.factors.reshape(layers * experts, -1)
        directions = self._seed_directions(flat)
        assignment = None
        for _ in range(_NODE_ROUNDS):
            new = [self._assign_layer(layer, directions, copies[layer]) for layer in range(layers)]
            if new == assignment:
                break
            assignment = new
            holds = np.zeros((layers, experts, self.num_nodes), dtype=bool)
            for layer, pairs in enumerate(assignment):
                for e, n in pairs:
                    holds[layer, e, n] = True
            directions = np.einsum("lem,led->md", holds, self.factors)
        return assignment

    def _seed_directions(self, flat: np.ndarray) -> np.ndarray:
        """flat: float64[N, D] item factors -> float64[M, D]: the strongest item, then each next
        the strongest item least like (by cosine) those chosen (deterministic k-means seeding)."""
        strength = np.linalg.norm(flat, axis=1)
        unit = flat / np.maximum(strength, 1e-300)[:, None]
        chosen = [int(np.argmax(strength))]
        unlike = np.full(len(flat), np.inf)
        while len(chosen) < self.num_nodes:
            unlike = np.minimum(unlike, 1 - unit @ unit[chosen[-1]])
            chosen.append(int(np.argmax(strength * unlike)))
        return flat[chosen]

    def _assign_layer(self, layer: int, directions: np.ndarray, copies: np.ndarray) -> list[tuple[int, int]]:
        """One layer's copies to nodes, heaviest first, each to the best-matching node with load
        and slot room (a node not holding the expert yet first); with no load room anywhere, the
        node least loaded for its share. (Plain Python: M is small, and numpy's overhead per
        call would dominate.)"""
        load = self.load[layer]
        unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-300)
        match = (self.factors[layer] @ unit.T).tolist()  # [E][M]
        shares = [len(shards) for shards in self.shards_of_node]
        room = [int(self.slots[shards].sum()) for shards in self.shards_of_node]
        mean = float(load.sum()) / len(self.slots)
        load_room = [mean * share * (1 + self.node_tolerance) + self.tiny for share in shares]
        # Counts stay near each node's share of the slots as the copies go out heaviest first,
        # so that every node gets its share of heavy and of light copies (a node that filled its
        # slots with cold experts early would leave the rest too much load).
        capacity = list(room)
        count_share = [r / sum(capacity) for r in capacity]
        count_slack = [2 + 0.05 * r for r in capacity]
        node_load, pairs = [0.0] * self.num_nodes, []
        for e in np.lexsort((np.arange(len(load)), -load)).tolist():
            weight, on_node = float(load[e]) / copies[e], [0] * self.num_nodes
            for _ in range(copies[e]):
                can = [n for n in range(self.num_nodes) if room[n] > 0 and on_node[n] < shares[n]]
                paced = [n for n in can if capacity[n] - room[n] < count_share[n] * (len(pairs) + 1) + count_slack[n]]
                can = paced or can
                if not can:
                    break  # an extra copy with nowhere left to go: dropped
                fits = [n for n in can if node_load[n] + weight <= load_room[n]]
                pool = [n for n in fits if on_node[n] == 0] or fits
                if pool:
                    n = max(pool, key=lambda n: (match[e][n], -n))
                else:
                    pool = [n for n in can if on_node[n] == 0] or can
                    n = min(pool, key=lambda n: ((node_load[n] + weight) / shares[n], n))
                node_load[n] += weight
                room[n] -= 1
                on_node[n] += 1
                pairs.append((e, n))
        return pairs

    def _pack_shards(self, layer: int, pairs: list[tuple[int, int]]) -> np.ndarray:
        """One layer's (expert, node) copies to shards: heaviest first, each to the least loaded
        shard of its node with a free slot (else of any node), longest-processing-time packing.
        Which experts share a shard is left to the local search: its swaps keep every shard's
        count, so they improve grouping even when all slots are full, where packing by affinity
        first strands heavy copies on the last free slots. Returns bool[E, S]."""
        load = self.load[layer]
        experts, shards = self.shape[1:]
        copies = np.bincount([e for e, _ in pairs], minlength=experts)
        held = np.zeros((experts, shards), dtype=bool)
        shard_load, used = np.zeros(shards), np.zeros(shards, dtype=np.int64)
        for e, n in sorted(pairs, key=lambda x: (-load[x[0]] / copies[x[0]], x[0], x[1])):
            free = (used < self.slots) & ~held[e]
            own = free & (self.node_of_shard == n)
            if not free.any():
                if held[e].any():
                    continue  # an extra copy with no shard left: dropped
                raise ValueError(f"layer {layer}: no shard has a free slot for expert {e} (slots {tuple(self.slots)})")
            pool = own if own.any() else free
            s = int(np.lexsort((np.arange(shards), used, np.where(pool, shard_load, np.inf)))[0])
            held[e, s] = True
            shard_load[s] += load[e] / copies[e]
            used[s] += 1
        return held

    # Renaming a fresh plan to overlap the current one.

    def renamed_like(self, held: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """held, reference: bool[L, E, S]. The same plan with nodes (of equal shard slots) and,
        per layer, shards of a node (of equal slots) renamed, greedily, to overlap the reference
        most: renaming changes neither balance nor affinity, only what must move."""
        node_held = (held.astype(np.int64) @ self.node_onehot) > 0  # [L, E, M]
        node_reference = (reference.astype(np.int64) @ self.node_onehot) > 0
        overlap = np.einsum("lef,lec->fc", node_held.astype(np.int64), node_reference.astype(np.int64))
        signature = [tuple(sorted(self.slots[s])) for s in self.shards_of_node]
        node_map = _greedy_match(overlap, lambda f, c: signature[f] == signature[c])
        renamed = np.zeros_like(held)
        for f, c in node_map.items():
            mine, theirs = self.shards_of_node[f], self.shards_of_node[c]
            for layer in range(held.shape[0]):
                shard_overlap = held[layer][:, mine].T.astype(np.int64) @ reference[layer][:, theirs]
                shard_map = _greedy_match(shard_overlap, lambda a, b: self.slots[mine[a]] == self.slots[theirs[b]])
                for a, b in shard_map.items():
                    renamed[layer, :, theirs[b]] = held[layer, :, mine[a]]
        return renamed


def _greedy_match(overlap: np.ndarray, allowed) -> dict[int, int]:
    """overlap: int[N, N] -> {row: column}, a one-to-one matching of allowed pairs taken by
    overlap, largest first (ties by index). Every row is matched when `allowed` groups rows and
    columns into classes of equal size (as equal slot signatures do)."""
    pairs = sorted(((-int(overlap[a, b]), a, b) for a in range(overlap.shape[0]) for b in range(overlap.shape[1])
                    if allowed(a, b)))
    rows, columns, matching = set(), set(), {}
    for _, a, b in pairs:
        if a not in rows and b not in columns:
            matching[a] = b
            rows.add(a)
            columns.add(b)
    return matching


def _peak(load: np.ndarray, held: np.ndarray) -> float:
    """load: float64[E], held: bool[E, S] -> the most loaded shard's load."""
    per_copy = load / np.maximum(held.sum(axis=1), 1)
    return float((per_copy @ held).max()) if held.size else 0.0


class _Search:
    """A layout being polished: held[l, e, s] and what follows from it, kept current change by
    change. Reference: bool[L, E, S], the copies that cost nothing to keep (the current layout;
    none for a fresh plan).

    The objective is the module docstring's with its sends times sends_weight, plus pairs_weight
    per pair of experts chosen by one token-layer that share a shard (both as the docstring's but
    for fresh_plan's start grouped by pairs: 0 and 1); every change kept gains more than `tiny`, so the
    search ends, and where it ends no single change gains: a start that is already such a point
    comes back unchanged."""

    def __init__(self, problem: _Problem, held: np.ndarray, reference: np.ndarray, pairs_weight: float = 0.0,
                 sends_weight: float = 1.0):
        self.problem = problem
        self.pairs_weight = pairs_weight
        self.sends_weight = sends_weight
        self.held = held.copy()
        self.costly = ~reference                      # [L, E, S]: holding it means loading it
        layers = held.shape[0]
        self.copies = self.held.sum(axis=2)           # [L, E]
        self.used = self.held.sum(axis=1)             # [L, S]
        self.shard_load = np.stack([self._shard_load(layer) for layer in range(layers)])  # [L, S]
        self.node_count = self.held.astype(np.int64) @ problem.node_onehot  # [L, E, M]
        self.node_sum = np.einsum("lem,led->md", self.node_count > 0, problem.factors)  # [M, D]
        self.server = problem.sends.servers(self.held)  # [L, E, M]: which copy serves a token on each node
        self.affinity = problem.coactivation @ self.held  # [L, E, S]: co-chosen events with each shard's experts
        # Never above the target, nor above a start that could not meet it.
        self.cap = np.maximum(problem.target, self.shard_load.max(axis=1, initial=0.0)) + problem.tiny

    def _shard_load(self, layer: int) -> np.ndarray:
        per_copy = self.problem.load[layer] / np.maximum(self.copies[layer], 1)
        return per_copy @ self.held[layer]

    def score(self) -> float:
        """The objective (module docstring) of this layout against its reference."""
        problem = self.problem
        sends = sum(problem.sends.cost(layer, self.server[layer]) for layer in range(problem.shape[0]))
        co_use = float(np.einsum("md,md->", self.node_sum, self.node_sum))
        loads = float(np.einsum("les,l->", self.held & self.costly, problem.move_cost))
        pairs = 0.5 * float(np.einsum("les,les->", self.held, self.affinity))
        return self.pairs_weight * pairs - self.sends_weight * sends + problem.node_weight * co_use - loads

    def descend(self) -> None:
        """Rounds over every layer until one changes nothing (or the sweep cap): then no single
        change gains."""
        for _ in range(_SEARCH_SWEEPS):
            if not any([self._improve_layer(layer) for layer in range(self.problem.shape[0])]):
                return

    def _improve_layer(self, layer: int) -> bool:
        """Rounds over one layer until none changes anything; True when one did. A round scores
        every change at once, keeps each copy's best, and applies them best first, each
        rescored against the layout as it is by then (earlier changes of the round may have
        made it worse, or impossible)."""
        changed_any = False
        for _ in range(4 * self.problem.shape[1]):  # a cap far above what a layer needs
            changed = False
            for _, _, removes, adds in sorted(self._candidates(layer), key=lambda c: (-c[0], c[1])):
                if self._gain(layer, removes, adds) > self.problem.tiny:
                    self._apply(layer, removes, adds)
                    changed = True
            if not changed:
                return changed_any
            changed_any = True
        return changed_any

    def _candidates(self, layer: int) -> list[tuple[float, int, tuple, tuple]]:
        """Each expert copy's best change, where it gains: (gain, copy index, removed (expert,
        shard) pairs, added pairs)."""
        problem = self.problem
        load, coactivation = problem.load[layer], problem.coactivation[layer]
        factors, norms, node = problem.factors[layer], problem.norms[layer], problem.node_of_shard
        held, count, sends = self.held[layer], self.node_count[layer], problem.sends
        affinity, pw = self.affinity[layer], self.pairs_weight
        copies, costly = self.copies[layer], self.costly[layer].astype(np.float64)
        shard_load, cap = self.shard_load[layer], self.cap[layer]
        cost, weight = problem.move_cost[layer], problem.node_weight
        match = factors @ self.node_sum.T  # [E, M]: each expert's co-use with each node's items
        ci, ca = np.nonzero(held)  # the copies: expert i on shard a
        na, per_copy = node[ca], load[ci] / copies[ci]
        loses = count[ci, na] == 1  # [C]: the copy is its expert's only one on its node
        lose = np.where(loses, norms[ci] - 2 * match[ci, na], 0.0)  # [C]: node term when it leaves the node
        join = np.where(count[:, node] == 0, 2 * match[:, node] + norms[:, None], 0.0)  # [E, S]: joining b's node
        room = self.used[layer] < problem.slots
        own_costly = costly[ci, ca]
        options = []  # (gain per copy [C], what per copy)
        # Sends saved by each change of one expert's copies (sampled_sends.py), with what is left
        # of each copy's expert without it: bool[C, S]; and the co-chosen pairs it makes on its
        # shard (affinity), at pairs_weight.
        sw = self.sends_weight
        tables = sends.tables(layer, self.server[layer]) if sw else None
        rows, shards = np.arange(len(ci)), np.eye(len(problem.slots), dtype=bool)
        without = held[ci]
        without[rows, ca] = False

        def sends_saved(experts: np.ndarray, holders: np.ndarray) -> np.ndarray | float:
            """sends_weight x the sends saved where `experts`' copies become `holders` (bool[..., S]); 0, and
            nothing counted, for a search without the sends (fresh_plan's start grouped by pairs)."""
            return sw * sends.change_gain(tables, experts, sends.servers(holders)) if sw else 0.0

        # Moves [C, S]: copy c to shard b.
        ok = ~held[ci] & room[None] & (shard_load[None] + per_copy[:, None] <= cap)
        node_gain = np.where(node[None] != na[:, None], join[ci] + lose[:, None], 0.0)
        saved = sends_saved(ci[:, None], without[:, None] | shards[None]) \
            + pw * (affinity[ci] - affinity[ci, ca][:, None])
        gain = saved + weight * node_gain - cost * (costly[ci] - own_costly[:, None])
        gain = np.where(ok, gain, -np.inf)
        b = np.argmax(gain, axis=1)
        options.append((gain[rows, b], [(((i, a),), ((i, s),)) for i, a, s in zip(ci, ca, b)]))

        # Swaps [C, C]: copy c1 = (i, a) with copy c2 = (j, b); symmetric. Its sends: the two
        # moves' less, at most, a send each for the tokens that chose both (neither shard frees).
        toward = saved[:, ca]  # [c1, c2]: i's move to b
        loading = costly[ci][:, ca] - own_costly[:, None]
        gains_j = (count[ci][:, na] == 0).T  # [c1, c2]: j is not on a's node yet
        together = factors[ci] @ factors[ci].T  # [c1, c2]: co-use of the two experts
        at_a = gains_j * (2 * match[ci][:, na].T + norms[ci][None, :] - 2 * loses[:, None] * together) \
            + lose[:, None]  # [c1, c2]: node term change at a's node
        node_gain = np.where(na[:, None] != na[None, :], at_a + at_a.T, 0.0)
        gain = toward + toward.T - 2 * (sw * sends.mean_send_cost + pw) * coactivation[ci][:, ci] + weight * node_gain \
            - cost * (loading + loading.T)
        free_for_i = ~held[ci][:, ca]  # [c1, c2]: b does not hold i
        shift = per_copy[None, :] - per_copy[:, None]  # [c1, c2]: what a gains
        fits = (shard_load[ca][:, None] + shift <= cap) | (shift <= 0)
        ok = free_for_i & free_for_i.T & fits & fits.T & (ci[:, None] != ci[None, :])
        gain = np.where(ok, gain, -np.inf)
        k = np.argmax(gain, axis=1)
        options.append((gain[rows, k],
                        [(((i, a), (ci[c], ca[c])), ((i, ca[c]), (ci[c], a))) for i, a, c in zip(ci, ca, k)]))

        # Drops [C]: copy c goes, its expert's other holders take its load.
        others = held[ci] & (np.arange(len(problem.slots))[None] != ca[:, None])
        taken = load[ci] / np.maximum(copies[ci] - 1, 1) - per_copy  # [C]: what each other holder takes on
        after = np.where(others, shard_load[None] + taken[:, None], -np.inf)
        ok = (copies[ci] > 1) & (after.max(axis=1, initial=-np.inf) <= cap)
        dropped = sends_saved(ci, without) - pw * affinity[ci, ca]
        options.append((np.where(ok, dropped + weight * lose + cost * own_costly, -np.inf),
                        [(((i, a),), ()) for i, a in zip(ci, ca)]))

        # Added copies [E, S], offered through each expert's first copy.
        ok = (copies < problem.max_copies)[:, None] & ~held & room[None] \
            & (shard_load[None] + (load / (copies + 1))[:, None] <= cap)
        added = sends_saved(np.arange(len(load))[:, None], held[:, None] | shards[None]) + pw * affinity  # on b too
        gain = np.where(ok, added + weight * join - cost * costly, -np.inf)
        b = np.argmax(gain, axis=1)
        first = np.r_[True, ci[1:] != ci[:-1]]
        options.append((np.where(first, gain[ci, b[ci]], -np.inf), [((), ((i, b[i]),)) for i in ci]))

        gains = np.stack([g for g, _ in options])  # [kinds, C]
        kind = np.argmax(gains, axis=0)
        return [(float(gains[kind[c], c]), c, *_as_ints(options[kind[c]][1][c]))
                for c in np.flatnonzero(gains.max(axis=0) > problem.tiny)]

    def _gain(self, layer: int, removes: tuple, adds: tuple) -> float:
        """The objective's change from a change (removed, then added, (expert, shard) pairs of
        one layer), against the layout as it is; -inf when it is not possible (a copy gone, a
        slot, max_copies or the balance cap exceeded, an expert left without a copy)."""
        problem = self.problem
        held, copies, load = self.held[layer], self.copies[layer], problem.load[layer]
        if any(not held[e, s] for e, s in removes) or any(held[e, s] for e, s in adds):
            return -np.inf
        experts = sorted({e for e, _ in removes + adds})
        after = {e: copies[e] - sum(x == e for x, _ in removes) + sum(x == e for x, _ in adds) for e in experts}
        if min(after.values()) < 1 or max(after.values()) > problem.max_copies:
            return -np.inf
        rise: dict[int, float] = {}
        for e in experts:
            for s in np.flatnonzero(held[e]):
                rise[s] = rise.get(s, 0.0) - load[e] / copies[e]
            for s in set(np.flatnonzero(held[e])) - {s for x, s in removes if x == e} | {s for x, s in adds if x == e}:
                rise[s] = rise.get(s, 0.0) + load[e] / after[e]
        filled = {s: sum(t == s for _, t in adds) - sum(t == s for _, t in removes) for _, s in adds}
        if any(self.used[layer, s] + n > problem.slots[s] for s, n in filled.items()) \
                or any(d > 0 and self.shard_load[layer, s] + d > self.cap[layer] for s, d in rise.items()):
            return -np.inf
        # Sends, counted on the sampled tokens that chose an expert the change touches; pairs on
        # each shard: its copies h lose r and gain a; with C zero on the diagonal,
        # (h - r + a)C(h - r + a)/2 - hCh/2 = aCh - rCh - aCr + rCr/2 + aCa/2.
        saved = self.sends_weight * self._sends_saved(layer, experts, removes, adds) if self.sends_weight else 0.0
        affinity, coactivation = self.affinity[layer], problem.coactivation[layer]
        pairs = sum(affinity[e, s] for e, s in adds) - sum(affinity[e, s] for e, s in removes)
        pairs -= sum(coactivation[x, y] for x, s in adds for y, t in removes if s == t)
        pairs += sum(coactivation[x, y] for x, s in removes for y, t in removes if s == t) / 2
        pairs += sum(coactivation[x, y] for x, s in adds for y, t in adds if s == t) / 2
        saved += self.pairs_weight * pairs
        costly = self.costly[layer]
        loads = sum(costly[e, s] for e, s in adds) - sum(costly[e, s] for e, s in removes)
        return saved + problem.node_weight * self._node_gain(layer, removes, adds) - problem.move_cost[layer] * loads

    def _sends_saved(self, layer: int, experts: list[int], removes: tuple, adds: tuple) -> float:
        """The sends a change saves, counted on the sampled tokens that chose one of `experts` (those it touches)."""
        sends, held = self.problem.sends, self.held[layer]
        tokens = sends.tokens_of(layer, experts)
        after_held = held.copy()
        for e, s in removes:
            after_held[e, s] = False
        for e, s in adds:
            after_held[e, s] = True
        after_server = self.server[layer].copy()
        after_server[experts] = sends.servers(after_held[experts])
        return sends.cost(layer, self.server[layer], tokens) - sends.cost(layer, after_server, tokens)

    def _joined(self, layer: int, removes: tuple, adds: tuple) -> tuple[list[int], np.ndarray]:
        """The experts a change touches, and int[those, M]: +1 where one joins a node, -1 where
        one leaves it."""
        changed = sorted({e for e, _ in removes + adds})
        before = self.node_count[layer, changed]
        after = before.copy()
        for e, s in removes:
            after[changed.index(e), self.problem.node_of_shard[s]] -= 1
        for e, s in adds:
            after[changed.index(e), self.problem.node_of_shard[s]] += 1
        return changed, (after > 0).astype(np.int64) - (before > 0)

    def _node_gain(self, layer: int, removes: tuple, adds: tuple) -> float:
        """The node co-use term's change from a change, at the node sums as they are."""
        changed, joined = self._joined(layer, removes, adds)
        shift = joined.T @ self.problem.factors[layer, changed]  # [M, D]
        return float(np.sum(shift * (2 * self.node_sum + shift)))

    def _apply(self, layer: int, removes: tuple, adds: tuple) -> None:
        problem = self.problem
        changed, joined = self._joined(layer, removes, adds)
        for e, s in removes:
            self.held[layer, e, s] = False
            self.affinity[layer, :, s] -= problem.coactivation[layer, :, e]
        for e, s in adds:
            self.held[layer, e, s] = True
            self.affinity[layer, :, s] += problem.coactivation[layer, :, e]
        self.copies[layer, changed] = self.held[layer, changed].sum(axis=1)
        self.server[layer, changed] = problem.sends.servers(self.held[layer, changed])
        self.used[layer] = self.held[layer].sum(axis=0)
        self.shard_load[layer] = self._shard_load(layer)
        self.node_count[layer, changed] = self.held[layer, changed].astype(np.int64) @ problem.node_onehot
        self.node_sum += joined.T @ problem.factors[layer, changed]


def _as_ints(change: tuple) -> tuple:
    """((removed pairs), (added pairs)) with numpy integers made plain ints."""
    return tuple(tuple((int(e), int(s)) for e, s in pairs) for pairs in change)
