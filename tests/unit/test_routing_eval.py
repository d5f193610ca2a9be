"""Evaluating a placement against a routing trace: golden cases worked by hand, the choice of the
copy that serves a replicated expert, request routing (round robin, affinity under the overload
cap), the profiling/evaluation split (or the sequences a caller names) and the predictor's
precision and recall."""

import math

import numpy as np
import pytest

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.affinity import AffinityModel
from moefleet.cluster.routing.evaluate import (
    default_shard_nodes,
    evaluate,
    evaluation_split,
    observe_profiling_half,
)
from moefleet.cluster.routing.trace import RoutingEvent, RoutingTrace


class TablePredictor:
    """A predictor of AffinityModel's API that answers from a fixed token -> experts table (the same
    at every layer), and records what it was shown."""

    def __init__(self, table: dict[int, tuple[int, ...]], num_layers: int, num_experts: int):
        self.table, self.num_layers, self.num_experts = table, num_layers, num_experts
        self.observed_tokens: list[int] = []

    def observe(self, tokens, experts):
        self.observed_tokens += tokens.tolist()

    def predict(self, tokens, layer, k=None, previous=None):
        return np.array([self.table[t][:k] for t in tokens.tolist()]), np.ones(len(tokens))

    def expected_load(self, tokens):
        load = np.zeros((self.num_layers, self.num_experts))
        for t in tokens.tolist():
            load[:, list(self.table[t])] += 1
        return load


def test_golden_two_nodes_with_a_replicated_expert():
    # Shard 0 on node 0, shard 1 on node 1. Layer 1 holds expert 3 on both shards.
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3)), 1: ((0, 2, 3), (1, 3))})
    trace = RoutingTrace.from_events([
        RoutingEvent("a", 0, None, 0, (0, 1)),  # seq a -> node 0: shard 0 only; 2 local, fan-out 1
        RoutingEvent("a", 0, None, 1, (1, 3)),  # 1 -> shard 1 (remote); 3 -> its node-0 copy, shard 0: fan-out 2
        RoutingEvent("a", 1, None, 0, (2, 3)),  # both on shard 1, remote: fan-out 1, one remote shard
        RoutingEvent("b", 0, None, 0, (0, 2)),  # seq b -> node 1: 0 on shard 0 (remote), 2 local: fan-out 2
        RoutingEvent("b", 0, None, 1, (3,)),    # 3 -> its node-1 copy, shard 1: local, fan-out 1
    ])
    result = evaluate(trace, placement, (0, 1))
    # fan-out (1 + 2 + 1 + 2 + 1) / 5; local pairs 2 + 1 + 0 + 1 + 1 = 5 of 9;
    # remote shards per token occurrence: (a,0): 0 + 1, (a,1): 1, (b,0): 1 + 0 -> 3 over 3 occurrences;
    # shard loads: layer 0 [3, 3], layer 1 [1, 2] -> all layers [4, 5]: 5 / 4.5; worst layer 2 / 1.5
    assert result == {
        "fanout": pytest.approx(7 / 5), "local_fraction": pytest.approx(5 / 9), "cross_node_sends_per_token": 1.0,
        "imbalance": pytest.approx(5 / 4.5), "imbalance_per_layer_max": pytest.approx(2 / 1.5),
        "precision": None, "recall": None, "events": 5, "tokens": 3, "sequences": 2, "eval_sequences": 2}


def test_replica_choice_prefers_a_visited_shard_then_the_least_loaded():
    # Three shards, each its own node; expert 0 on shards 1 and 2, expert 1 on shard 2, expert 2 on shard 0.
    placement = Placement(epoch=0, num_experts=3, shard_experts={0: ((2,), (0,), (0, 1))})
    trace = RoutingTrace.from_events([
        RoutingEvent("a", 0, None, 0, (1, 0)),  # 1 -> shard 2; 0 has no copy on node 0: the visited shard 2
        RoutingEvent("a", 1, None, 0, (0,)),    # loads so far shard 1: 0, shard 2: 2 -> shard 1
        RoutingEvent("a", 2, None, 0, (0,)),    # shard 1: 1, shard 2: 2 -> shard 1
        RoutingEvent("a", 3, None, 0, (2,)),    # shard 0
    ])
    result = evaluate(trace, placement, (0, 1, 2))
    # every event reaches one shard; loads [1, 2, 2] -> 2 / (5 / 3); only expert 2 is on node 0
    assert result["fanout"] == 1.0
    assert result["imbalance"] == pytest.approx(2 / (5 / 3))
    assert result["local_fraction"] == pytest.approx(1 / 5)
    assert result["cross_node_sends_per_token"] == pytest.approx(3 / 4)


def _topic_trace(num_sequences: int) -> RoutingTrace:
    """Every sequence: 4 tokens of id 0, each choosing experts 2 and 3 at its one layer."""
    return RoutingTrace.from_events(RoutingEvent(f"s{s}", p, 0, 0, (2, 3))
                                    for s in range(num_sequences) for p in range(4))


def test_affinity_request_routing_follows_predictions_but_never_overloads_a_node():
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3))})
    trace = _topic_trace(8)
    predictor = TablePredictor({0: (2, 3)}, num_layers=1, num_experts=4)
    round_robin = evaluate(trace, placement, (0, 1), predictor)
    affinity = evaluate(trace, placement, (0, 1), predictor, request_routing="affinity")
    # 4 evaluated sequences; round robin puts sequences by index parity, so the local share depends
    # on which 4 the split evaluates; affinity wants node 1 for all, capped at ceil(1.1 x 4 / 2) = 3
    evaluated = np.nonzero(evaluation_split(trace.seq_names))[0]
    assert round_robin["local_fraction"] == pytest.approx(np.mean(evaluated % 2 == 1))
    assert math.ceil(1.1 * 4 / 2) == 3
    assert affinity["local_fraction"] == pytest.approx(3 / 4)
    assert affinity["cross_node_sends_per_token"] == pytest.approx(1 / 4)  # the 4th sequence's tokens go remote
    assert affinity["eval_sequences"] == 4 and affinity["sequences"] == 8 and affinity["events"] == 16


def test_a_predictor_fitted_elsewhere_measures_the_sequences_named_under_the_cap_given():
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3))})
    trace = _topic_trace(8)
    predictor = TablePredictor({0: (2, 3)}, num_layers=1, num_experts=4)
    every = np.ones(8, dtype=bool)
    # All 8 sequences want node 1 (experts 2 and 3 live on shard 1): the default cap takes
    # ceil(1.1 x 8 / 2) = 5 there, the other 3 send every token's rows to node 1 (one send each).
    result = evaluate(trace, placement, (0, 1), predictor, "affinity", measured=every)
    assert result["eval_sequences"] == 8 and result["tokens"] == 32
    assert result["local_fraction"] == pytest.approx(5 / 8)
    assert result["cross_node_sends_per_token"] == pytest.approx(3 / 8)
    # An even share (overload_factor 1): ceil(8 / 2) = 4 on node 1, 4 remote.
    even = evaluate(trace, placement, (0, 1), predictor, "affinity", measured=every, overload_factor=1.0)
    assert even["local_fraction"] == pytest.approx(4 / 8) and even["cross_node_sends_per_token"] == pytest.approx(4 / 8)
    # Sequences 0 and 3 only, round robin: s0 on node 0 (remote), s3 on node 1 (local).
    named = evaluate(trace, placement, (0, 1), predictor, measured=np.arange(8) % 3 == 0)
    assert named["eval_sequences"] == 3 and named["tokens"] == 12  # s0, s3, s6
    assert named["local_fraction"] == pytest.approx(1 / 3)  # s3 alone is on node 1


@pytest.mark.parametrize("kwargs, problem", [
    ({"measured": np.ones(3, dtype=bool)}, "measured must flag each of the trace's 8 sequences"),
    ({"measured": np.zeros(8, dtype=bool)}, "at least one True"),
    ({"overload_factor": 0.9}, "overload_factor must be >= 1"),
])
def test_bad_measured_sequences_and_caps_are_refused(kwargs, problem):
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3))})
    with pytest.raises(ValueError, match=problem):
        evaluate(_topic_trace(8), placement, (0, 1), TablePredictor({0: (2, 3)}, 1, 4), "affinity", **kwargs)


def test_precision_and_recall_golden_on_the_evaluation_half():
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3)), 1: ((0, 1), (2, 3))})
    events = []
    for s in range(4):
        events += [RoutingEvent(s, 0, 5, 0, (0, 2)), RoutingEvent(s, 0, 5, 1, (1,)),
                   RoutingEvent(s, 1, None, 0, (3, 1))]
    trace = RoutingTrace.from_events(events)
    predictor = TablePredictor({5: (0, 1)}, num_layers=2, num_experts=4)
    result = evaluate(trace, placement, (0, 1), predictor)
    # per evaluated sequence, token 5: layer 0 predicts {0, 1} for {0, 2} (1 hit), layer 1 {0, 1} for {1}
    # (1 hit); the null-token event is not scored -> precision 2 / 4, recall 2 / 3
    assert result["eval_sequences"] == 2
    assert result["precision"] == pytest.approx(2 / 4) and result["recall"] == pytest.approx(2 / 3)


def test_no_token_ids_means_no_precision():
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3))})
    trace = RoutingTrace.from_events(RoutingEvent(s, 0, None, 0, (0, 2)) for s in range(4))
    result = evaluate(trace, placement, (0, 1), TablePredictor({}, 1, 4))
    assert result["precision"] is None and result["recall"] is None and result["eval_sequences"] == 2


def test_split_is_deterministic_balanced_and_keyed_by_name():
    names = tuple(f"req-{i}" for i in range(101))
    split = evaluation_split(names)
    assert split.sum() == 51 and np.array_equal(split, evaluation_split(names))
    # a sequence's half depends on its name, not on its index
    reordered = evaluation_split(names[::-1])
    assert np.array_equal(reordered[::-1], split)
    assert evaluation_split(("only",)).tolist() == [True]


def test_the_profiling_half_feeds_the_predictor():
    trace = RoutingTrace.from_events(RoutingEvent(f"s{s}", 0, 100 + s, 0, (s % 4,)) for s in range(10))
    predictor = TablePredictor({}, 1, 4)
    assert observe_profiling_half(trace, predictor) == 5
    profiling = ~evaluation_split(trace.seq_names)
    assert sorted(predictor.observed_tokens) == [100 + s for s in range(10) if profiling[s]]


def test_with_the_real_affinity_model_a_deterministic_routing_is_predicted_exactly():
    # token t always chooses experts (t, t + 1) % 8 at every layer; every token id occurs in both halves
    events = [RoutingEvent(s, p, t, layer, (t % 8, (t + 1) % 8))
              for s in range(12) for p, t in enumerate(range(8)) for layer in range(2)]
    trace = RoutingTrace.from_events(events)
    model = AffinityModel(num_layers=2, num_experts=8, top_k=2)
    observe_profiling_half(trace, model)
    placement = Placement(epoch=0, num_experts=8, shard_experts={layer: ((0, 1, 2, 3), (4, 5, 6, 7))
                                                                 for layer in range(2)})
    result = evaluate(trace, placement, (0, 1), model, request_routing="affinity")
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["tokens"] == 6 * 8 and result["events"] == 6 * 8 * 2


def test_default_shard_nodes_are_contiguous_groups():
    assert default_shard_nodes(8, 2) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert default_shard_nodes(5, 2) == (0, 0, 0, 1, 1)
    assert default_shard_nodes(3, 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="nodes must be between 1 and the shard count 2, got 3"):
        default_shard_nodes(2, 3)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        default_shard_nodes(0, 1)


@pytest.mark.parametrize("placement, nodes, kwargs, problem", [
    (Placement(0, 4, {0: ((0, 1), (2, 3)), 1: ((0, 1), (2, 3)), 2: ((0, 1), (2, 3))}), (0, 1), {},
     "the trace has 2 MoE layers"),
    (Placement(0, 3, {0: ((0, 1), (2,)), 1: ((0, 1), (2,))}), (0, 1), {}, "the trace routes to 4 experts"),
    (Placement(0, 4, {0: ((0, 1), (2, 3)), 1: ((0, 1), (2, 3))}), (0,), {}, "shard_nodes must give each"),
    (Placement(0, 4, {0: ((0, 1), (2, 3)), 1: ((0, 1), (2, 3))}), (0, 1), {"request_routing": "random"},
     "request_routing must be one of"),
    (Placement(0, 4, {0: ((0, 1), (2, 3)), 1: ((0, 1), (2, 3))}), (0, 1), {"request_routing": "affinity"},
     "needs a predictor"),
])
def test_mismatches_are_refused(placement, nodes, kwargs, problem):
    trace = RoutingTrace.from_events([RoutingEvent("a", 0, 1, 0, (0, 3)), RoutingEvent("a", 0, 1, 1, (1,))])
    with pytest.raises(ValueError, match=problem):
        evaluate(trace, placement, nodes, **kwargs)
