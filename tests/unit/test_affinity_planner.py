"""Expert grouping in the placement planner: routing statistics, golden cases, properties on
random skewed routing, the cut in cross-node sends against load-only placement, move
minimisation, and a timing of the large shape (skipped unless MOEFLEET_PLANNER_TIMING is set)."""

import os
import time

import numpy as np
import pytest

from moefleet.cluster.placement.affinity_planner import AffinityObjective, plan_affinity_placement
from moefleet.cluster.placement.placement import Placement, round_robin_placement
from moefleet.cluster.placement.planner import PlacementLimits, diff, imbalance, plan_placement
from moefleet.cluster.placement.routing_stats import RoutingStats


def topic_routing(seed: int, requests: int, tokens: int, layers: int, experts: int, top_k: int, topics: int,
                  focus: float = 0.85, structure: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic routing with request "topics": (seq int64[P], experts int16[P, L, K]).

    Per layer the experts are split into `topics` disjoint groups (drawn from `structure`); a
    request has one topic (some topics more popular than others), and each of its token-layers
    picks, with probability `focus`, from its topic's group, else from a random group: K
    neighbours in the group from a skewed start (the group's first experts are hot; neighbours
    are often chosen together). `seed` draws the requests and their tokens."""
    shaping = np.random.default_rng(structure)
    size = experts // topics
    groups = np.stack([shaping.permutation(experts)[:topics * size].reshape(topics, size) for _ in range(layers)])
    rng = np.random.default_rng([structure, seed])
    popularity = 1 / np.sqrt(np.arange(1, topics + 1))
    topic = rng.choice(topics, size=requests, p=popularity / popularity.sum())
    seq = np.repeat(np.arange(requests, dtype=np.int64), tokens)
    chosen = []
    for start in range(0, len(seq), 50_000):  # bounded memory for the large shape
        part = seq[start:start + 50_000]
        group = np.where(rng.random((len(part), layers)) < focus, topic[part][:, None],
                         rng.integers(topics, size=(len(part), layers)))
        first = (size * rng.random((len(part), layers)) ** 2).astype(np.int64)
        within = (first[..., None] + np.arange(top_k)) % size
        chosen.append(groups[np.arange(layers)[None, :, None], group[..., None], within].astype(np.int16))
    return seq, np.concatenate(chosen)


def cross_node_sends_per_token(placement: Placement, shard_nodes: tuple[int, ...], seq: np.ndarray,
                               experts: np.ndarray) -> float:
    """A token runs on its request's node: the node holding most of the request's expert
    activations (ties to the lower node). Each token-layer sends to the distinct shards off that
    node holding experts it chose that its node lacks (an expert's lowest-numbered holder)."""
    nodes = sorted(set(shard_nodes))
    layers, num_nodes = experts.shape[1], len(nodes)
    on_node = np.zeros((layers, placement.num_experts, num_nodes), dtype=bool)
    first_holder = np.full((layers, placement.num_experts), -1)
    for layer in range(layers):
        for shard, held in enumerate(placement.shard_experts[layer]):
            for e in held:
                on_node[layer, e, nodes.index(shard_nodes[shard])] = True
                if first_holder[layer, e] < 0:
                    first_holder[layer, e] = shard
    layer_index = np.arange(layers)[None, :, None]
    local = on_node[layer_index, experts]  # [P, L, K, M]
    per_request = np.zeros((seq.max() + 1, num_nodes))
    np.add.at(per_request, seq, local.sum(axis=(1, 2)))
    token_node = np.argmax(per_request, axis=1)[seq]
    remote = ~np.take_along_axis(local, token_node[:, None, None, None], axis=3)[..., 0]
    shard = np.sort(np.where(remote, first_holder[layer_index, experts], -1), axis=2)
    distinct = (shard >= 0) & np.concatenate([np.ones(shard.shape[:2] + (1,), dtype=bool),
                                              shard[:, :, 1:] != shard[:, :, :-1]], axis=2)
    return float(distinct.sum() / len(seq))


def layer_imbalance(load: np.ndarray, placement: Placement, layer: int) -> float:
    return imbalance(load[layer:layer + 1], placement, [layer])


def check_feasible(plan: Placement, stats: RoutingStats, limits: PlacementLimits) -> None:
    assert sorted(plan.shard_experts) == list(range(stats.num_layers)) and plan.num_experts == stats.num_experts
    for layer, per_shard in plan.shard_experts.items():
        assert [len(held) <= slots for held, slots in zip(per_shard, limits.slots_per_shard)] == [True] * len(per_shard)
        assert all(len(set(held)) == len(held) for held in per_shard)
        copies = np.bincount([e for held in per_shard for e in held], minlength=stats.num_experts)
        assert copies.min() >= 1 and copies.max() <= limits.max_copies, (layer, copies)


# Routing statistics


def test_routing_stats_golden():
    # Request 0: token 0 chose {0, 1}, token 1 chose {1, 2}; request 1: token 2 chose 0 only.
    stats = RoutingStats.from_paths(np.array([5, 5, 9]), np.array([[[0, 1]], [[1, 2]], [[0, -1]]]), 3)
    assert stats.load.tolist() == [[2, 2, 1]]
    assert stats.coactivation[0].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    # Request profiles over the 3 items, each scaled by 1/sqrt(its activations): request 0 has
    # counts (1, 2, 1) and 4 activations -> (0.5, 1, 0.5); request 1 has (1, 0, 0) -> (1, 0, 0).
    # Co-use U = sum of outer products = [[1.25, .5, .25], [.5, 1, .5], [.25, .5, .25]]; with
    # 3 items <= the sketch's rank, the sketch is exact.
    factors = stats.co_use_factors[0]
    np.testing.assert_allclose(factors @ factors.T, [[1.25, 0.5, 0.25], [0.5, 1, 0.5], [0.25, 0.5, 0.25]], atol=1e-9)
    # A trace this short is kept whole as the token sample, each token standing for itself.
    assert stats.sample.tolist() == [[[0, 1]], [[1, 2]], [[0, -1]]] and stats.tokens_per_sample == 1.0


def test_routing_stats_sketch_approximates_co_use_across_layers():
    seq, experts = topic_routing(0, requests=60, tokens=8, layers=3, experts=32, top_k=4, topics=4)
    stats = RoutingStats.from_paths(seq, experts.astype(np.int64), 32)
    counts = np.zeros((60, 3 * 32))
    for token, request in enumerate(seq):
        for layer in range(3):
            np.add.at(counts[request], layer * 32 + experts[token, layer], 1)
    profiles = counts / np.sqrt(counts.sum(axis=1, keepdims=True))
    co_use = profiles.T @ profiles
    flat = stats.co_use_factors.reshape(96, -1)
    # Rank 48 for 96 items: the best rank-48 approximation misses 0.03% of U (Frobenius norm),
    # this one-pass sketch 0.3%; a sketch that lost the topics would miss far more.
    assert np.linalg.norm(flat @ flat.T - co_use) < 0.02 * np.linalg.norm(co_use)
    assert stats.load.sum() == 60 * 8 * 3 * 4


def test_routing_stats_refuses_bad_input():
    with pytest.raises(ValueError, match="outside -1..3"):
        RoutingStats.from_paths(np.zeros(1, dtype=np.int64), np.array([[[4]]]), 4)
    with pytest.raises(ValueError, match="seq must be"):
        RoutingStats.from_paths(np.zeros(2, dtype=np.int64), np.array([[[1]]]), 4)
    with pytest.raises(ValueError, match="symmetric"):
        RoutingStats(np.ones((1, 2)), np.array([[[0.0, 1.0], [0.0, 0.0]]]), np.zeros((1, 2, 2)),
                     np.zeros((0, 1, 1), dtype=np.int32), 1.0)
    with pytest.raises(ValueError, match="sample holds ids"):
        RoutingStats(np.ones((1, 2)), np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.array([[[2]]], dtype=np.int32), 1.0)


# Golden cases


def test_experts_chosen_together_share_a_shard():
    # 1 layer, 4 experts, 2 shards of 2 slots on 2 nodes; 10 tokens choose {0, 1}, 10 choose
    # {2, 3}: loads are equal (10 each), so every 2 + 2 split is balanced; only {0, 1} | {2, 3}
    # keeps each token on one shard (20 pairs together, every other split 0).
    experts = np.array([[[0, 1]]] * 10 + [[[2, 3]]] * 10)
    stats = RoutingStats.from_paths(np.arange(20), experts, 4)
    plan = plan_affinity_placement(stats, None, (0, 1), PlacementLimits((2, 2), max_copies=1))
    assert {frozenset(held) for held in plan.shard_experts[0]} == {frozenset({0, 1}), frozenset({2, 3})}
    assert plan.epoch == 0 and imbalance(stats.load, plan, [0]) == 1.0
    assert cross_node_sends_per_token(plan, (0, 1), np.arange(20), experts) == 0.0


def test_hot_expert_is_copied_to_keep_balance():
    # 1 layer, loads (60, 10, 10, 10) from single-expert tokens, 2 shards of 3 slots on 2 nodes.
    # Mean shard load 45, target 1.15 x 45 = 51.75: expert 0 alone (60) is above it, so it must
    # have a copy on each shard (30 + 30). The last spare slot goes to a copy of a cold expert
    # (its requests then find it on whichever node they run), which balances the shards exactly:
    # 30 + 5 + 10 = 45 on each.
    experts = np.array([[[0]]] * 60 + [[[1]]] * 10 + [[[2]]] * 10 + [[[3]]] * 10)
    stats = RoutingStats.from_paths(np.arange(90), experts, 4)
    limits = PlacementLimits((3, 3), max_copies=2)
    plan = plan_affinity_placement(stats, None, (0, 1), limits)
    check_feasible(plan, stats, limits)
    assert plan.holders(0, 0) == [0, 1]
    assert [len(held) for held in plan.shard_experts[0]] == [3, 3]
    assert imbalance(stats.load, plan, [0]) == pytest.approx(1.0)
    # Without spare slots for a copy the target is out of reach: 2 slots per shard put expert 0
    # with one cold expert (70 of 90), the best any layout does, as the load-only packing does.
    tight = plan_affinity_placement(stats, None, (0, 1), PlacementLimits((2, 2), max_copies=2))
    assert imbalance(stats.load, tight, [0]) == pytest.approx(70 / 45)


def test_each_request_kind_finds_its_experts_on_one_node():
    # 2 layers x 4 experts, 2 nodes of one shard with 2 slots each, one expert per token. Kind A
    # uses (l0:e0, l1:e1), B (l0:e2, l1:e3), C (l0:e1, l1:e0), D (l0:e3, l1:e2), 4 requests of 5
    # tokens each: every expert has load 20 and no two experts share a token, so only request
    # co-use across layers separates the layouts. Balance puts 2 experts of each layer on each
    # node; any pairing of kinds onto nodes then keeps every request on its node.
    kinds = {"A": (0, 1), "B": (2, 3), "C": (1, 0), "D": (3, 2)}
    paths = [kinds[kind] for kind in "ABCD" for _ in range(4) for _ in range(5)]
    experts = np.array(paths)[:, :, None]
    seq = np.repeat(np.arange(16), 5)
    stats = RoutingStats.from_paths(seq, experts, 4)
    plan = plan_affinity_placement(stats, None, (7, 3), PlacementLimits((2, 2), max_copies=1))
    for e0, e1 in kinds.values():
        assert plan.holders(0, e0) == plan.holders(1, e1)
    assert cross_node_sends_per_token(plan, (7, 3), seq, experts) == 0.0
    load_only = plan_placement(stats.load, None, [0, 1], PlacementLimits((2, 2), max_copies=1))
    assert cross_node_sends_per_token(load_only, (7, 3), seq, experts) > 0  # the load alone does not see it


def test_shards_group_within_nodes_and_nodes_group_across_layers():
    # 4 shards of 2 slots on 2 nodes (2 each), 2 layers x 8 experts, top-2. Kind k (0..3): 3
    # requests of 4 tokens, each choosing experts {2k, 2k+1} in both layers. Loads are equal, so
    # balance allows any 2 + 2 + 2 + 2 split; shards {2k, 2k+1} make one send per token-layer,
    # and kind k's shards of layer 0 and of layer 1 on one node keep its requests there.
    paths = [[[2 * k, 2 * k + 1], [2 * k, 2 * k + 1]] for k in range(4) for _ in range(3) for _ in range(4)]
    experts, seq = np.array(paths), np.repeat(np.arange(12), 4)
    stats = RoutingStats.from_paths(seq, experts, 8)
    plan = plan_affinity_placement(stats, None, (0, 0, 1, 1), PlacementLimits((2, 2, 2, 2), max_copies=1))
    for layer in (0, 1):
        assert {frozenset(held) for held in plan.shard_experts[layer]} == {frozenset({2 * k, 2 * k + 1})
                                                                           for k in range(4)}
    node = (0, 0, 1, 1)
    for k in range(4):
        assert node[plan.holders(0, 2 * k)[0]] == node[plan.holders(1, 2 * k)[0]]
    assert cross_node_sends_per_token(plan, node, seq, experts) == 0.0


def test_bad_arguments_are_refused():
    stats = RoutingStats.from_paths(np.arange(4), np.array([[[0]], [[1]], [[2]], [[3]]]), 4)
    with pytest.raises(ValueError, match="shard_nodes names 3 shards"):
        plan_affinity_placement(stats, None, (0, 0, 1), PlacementLimits((2, 2)))
    with pytest.raises(ValueError, match="cannot hold 4 experts"):
        plan_affinity_placement(stats, None, (0, 1), PlacementLimits((1, 1)))
    with pytest.raises(ValueError, match="cross_node_weight"):
        AffinityObjective(cross_node_weight=0.5)
    with pytest.raises(ValueError, match="current placement has 8 experts"):
        plan_affinity_placement(stats, round_robin_placement([0], 8, 2), (0, 1), PlacementLimits((4, 4)))


# Properties on random skewed routing


@pytest.mark.parametrize("seed", range(8))
def test_limits_kept_and_balance_whenever_load_only_achieves_it(seed):
    rng = np.random.default_rng(seed)
    layers, top_k = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    topics = int(rng.integers(2, 5))
    experts = topics * int(rng.integers(max(2, top_k), 7))
    shards = int(rng.integers(2, 7))
    shard_nodes = tuple(int(n) for n in np.sort(rng.integers(0, 3, size=shards)))
    limits = PlacementLimits(tuple(-(-experts // shards) + int(rng.integers(0, 3)) for _ in range(shards)),
                             tolerance=0.15, max_copies=int(rng.integers(1, 4)))
    seq, chosen = topic_routing(seed, requests=40, tokens=6, layers=layers, experts=experts, top_k=top_k, topics=topics,
                                structure=seed)
    stats = RoutingStats.from_paths(seq, chosen, experts)
    load_only = plan_placement(stats.load, None, list(range(layers)), limits)
    current = round_robin_placement(list(range(layers)), experts, shards, epoch=4)
    for plan in (plan_affinity_placement(stats, None, shard_nodes, limits),
                 plan_affinity_placement(stats, current, shard_nodes, limits)):
        check_feasible(plan, stats, limits)
        for layer in range(layers):
            if layer_imbalance(stats.load, load_only, layer) <= 1.15 + 1e-9:
                assert layer_imbalance(stats.load, plan, layer) <= 1.15 + 1e-9
    assert plan.epoch == 5


def test_deterministic():
    seq, chosen = topic_routing(3, requests=50, tokens=6, layers=2, experts=16, top_k=2, topics=4)
    stats = RoutingStats.from_paths(seq, chosen, 16)
    limits = PlacementLimits((5, 5, 5, 5), max_copies=2)
    plans = [plan_affinity_placement(stats, None, (0, 0, 1, 1), limits) for _ in range(2)]
    assert plans[0].shard_experts == plans[1].shard_experts


# Against load-only placement


def test_cuts_cross_node_sends_against_load_only_placement():
    seq, chosen = topic_routing(1, requests=300, tokens=20, layers=4, experts=32, top_k=4, topics=8)
    stats = RoutingStats.from_paths(seq, chosen, 32)
    shard_nodes = (0, 0, 1, 1, 2, 2, 3, 3)
    limits = PlacementLimits((5,) * 8, tolerance=0.15, max_copies=2)
    load_only = plan_placement(stats.load, None, [0, 1, 2, 3], limits)
    grouped = plan_affinity_placement(stats, None, shard_nodes, limits)
    before = cross_node_sends_per_token(load_only, shard_nodes, seq, chosen)
    after = cross_node_sends_per_token(grouped, shard_nodes, seq, chosen)
    print(f"\ncross-node sends per token: load-only {before:.3f}, affinity {after:.3f} ({1 - after / before:.0%} "
          f"fewer); imbalance {imbalance(stats.load, load_only, [0, 1, 2, 3]):.3f} -> "
          f"{imbalance(stats.load, grouped, [0, 1, 2, 3]):.3f}")
    assert after <= 0.6 * before
    assert imbalance(stats.load, grouped, [0, 1, 2, 3]) <= 1.15 + 1e-9


# Moves against the current placement


def test_own_plan_comes_back_unchanged():
    seq, chosen = topic_routing(2, requests=120, tokens=10, layers=3, experts=24, top_k=3, topics=4)
    stats = RoutingStats.from_paths(seq, chosen, 24)
    shard_nodes, limits = (0, 0, 1, 1, 2, 2), PlacementLimits((5,) * 6, max_copies=2)
    first = plan_affinity_placement(stats, None, shard_nodes, limits)
    again = plan_affinity_placement(stats, first, shard_nodes, limits)
    assert again.shard_experts == first.shard_experts and again.epoch == first.epoch + 1
    assert diff(first, again) == []
    # A plan made from another layout (here round-robin) is also a point where nothing pays.
    moved = plan_affinity_placement(stats, round_robin_placement([0, 1, 2], 24, 6), shard_nodes, limits)
    assert plan_affinity_placement(stats, moved, shard_nodes, limits).shard_experts == moved.shard_experts


def test_small_change_in_routing_moves_few_experts():
    shard_nodes, limits = (0, 0, 1, 1, 2, 2, 3, 3), PlacementLimits((5,) * 8, max_copies=2)
    before = RoutingStats.from_paths(*topic_routing(4, requests=300, tokens=20, layers=4, experts=32, top_k=4,
                                                    topics=8), 32)
    # The same routing with a tenth of the requests replaced by new ones.
    seq, chosen = topic_routing(4, requests=300, tokens=20, layers=4, experts=32, top_k=4, topics=8)
    new_seq, new_chosen = topic_routing(5, requests=30, tokens=20, layers=4, experts=32, top_k=4, topics=8)
    keep = seq >= 30
    after = RoutingStats.from_paths(np.concatenate([seq[keep], new_seq]), np.concatenate([chosen[keep], new_chosen]),
                                    32)
    current = plan_affinity_placement(before, None, shard_nodes, limits)
    warm = plan_affinity_placement(after, current, shard_nodes, limits)
    fresh = plan_affinity_placement(after, None, shard_nodes, limits)
    loads = [sum(move.action == "load" for move in diff(current, plan)) for plan in (warm, fresh)]
    copies = sum(len(held) for per_shard in current.shard_experts.values() for held in per_shard)
    print(f"\nexperts loaded after a 10% change in routing: {loads[0]} (a fresh plan: {loads[1]}) of {copies} copies")
    assert loads[0] <= 0.1 * copies and loads[0] <= loads[1] / 3
    check_feasible(warm, after, limits)
    assert imbalance(after.load, warm, [0, 1, 2, 3]) <= 1.15 + 1e-9


def test_move_cost_decides_whether_a_move_pays():
    # The kinds of the golden case above (20 tokens each, every expert's load 20), from a current
    # layout that splits every kind across the nodes. Regrouping swaps one layer's shards: 4
    # loads, which bring 80 activations (each kind's 20 tokens) onto their request's node, worth
    # 80 x (4 - 1) with the default cross_node_weight 4. With move_cost 0.1, a load costs 0.1 x 20
    # (an average expert's activations): it pays. With move_cost 1000 it does not, and the
    # current layout, balanced and feasible, stays as it is.
    kinds = {"A": (0, 1), "B": (2, 3), "C": (1, 0), "D": (3, 2)}
    experts = np.array([kinds[kind] for kind in "ABCD" for _ in range(20)])[:, :, None]
    stats = RoutingStats.from_paths(np.repeat(np.arange(16), 5), experts, 4)
    current = Placement(epoch=1, num_experts=4, shard_experts={0: ((0, 2), (1, 3)), 1: ((0, 2), (1, 3))})
    limits = PlacementLimits((2, 2), max_copies=1)
    moved = plan_affinity_placement(stats, current, (0, 1), limits)
    for e0, e1 in kinds.values():
        assert moved.holders(0, e0) == moved.holders(1, e1)
    stays = plan_affinity_placement(stats, current, (0, 1), limits, AffinityObjective(move_cost=1000.0))
    assert stays.shard_experts == current.shard_experts


# Timing of the large shape


@pytest.mark.skipif(not os.environ.get("MOEFLEET_PLANNER_TIMING"), reason="timing of the large shape: a minute or two")
def test_timing_large_shape():
    """58 MoE layers x 256 experts top-8, ~1M token occurrences in 20k requests, 32 shards on 4
    nodes; prints the times (not an assertion)."""
    start = time.perf_counter()
    seq, chosen = topic_routing(0, requests=20_000, tokens=50, layers=58, experts=256, top_k=8, topics=16)
    made = time.perf_counter()
    stats = RoutingStats.from_paths(seq, chosen, 256)
    counted = time.perf_counter()
    shard_nodes, limits = tuple(s // 8 for s in range(32)), PlacementLimits((9,) * 32, max_copies=2)
    plan = plan_affinity_placement(stats, None, shard_nodes, limits)
    planned = time.perf_counter()
    again = plan_affinity_placement(stats, plan, shard_nodes, limits)
    replanned = time.perf_counter()
    load_only = plan_placement(stats.load, None, list(range(58)), limits)
    moved = plan_affinity_placement(stats, load_only, shard_nodes, limits)
    from_load_only = time.perf_counter()
    sample = seq < 2000
    sends = [cross_node_sends_per_token(p, shard_nodes, seq[sample], chosen[sample]) for p in (load_only, plan, moved)]
    print(f"\n{len(seq)} token occurrences: trace made in {made - start:.1f} s, RoutingStats.from_paths "
          f"{counted - made:.1f} s; plan {planned - counted:.1f} s, plan from it {replanned - planned:.1f} s "
          f"(unchanged: {again.shard_experts == plan.shard_experts}), plan from the load-only placement "
          f"{from_load_only - replanned:.1f} s; cross-node sends per token on the first 2000 requests: load-only "
          f"{sends[0]:.1f}, affinity {sends[1]:.1f} (from load-only {sends[2]:.1f}); imbalance "
          f"{imbalance(stats.load, plan, list(range(58))):.3f}")
