"""The controller's speculative scheduling: the prediction-quality gauges on a hand-computed case,
the topology's node numbering, and a controller over two virtual nodes that learns routing, plans a
grouping rebalance from it, and serves the same greedy tokens before and after (lossless)."""

import asyncio
import re
import time

import numpy as np
import pytest

from moefleet import SamplingParams
from moefleet.cluster.control.speculation import Speculation, Topology
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.affinity import AffinityModel
from tests.conftest import collect_tokens, random_prompts


def test_topology_numbers_nodes_by_sorted_id():
    topology = Topology.from_ids(["node-b", "node-a", "node-b"], {"replica-0": "node-a", "replica-1": "node-c"})
    assert topology.node_ids == ("node-a", "node-b", "node-c")
    assert topology.shard_nodes == (1, 0, 1)
    assert topology.replica_nodes == {"replica-0": 0, "replica-1": 2}
    assert topology.spans_nodes
    assert not Topology.from_ids([], {"replica-0": "local"}).spans_nodes  # experts inside the replica


def test_quality_gauges_on_a_hand_computed_sample():
    # One MoE layer of 4 experts, top-2; shard 0 = {0, 1} on node 0, shard 1 = {2, 3} on node 1; the
    # sampled tokens ran on node 0. An untrained model predicts the uniform prior, ties to the lower
    # ids: experts [0, 1] for every token.
    placement = Placement(epoch=0, num_experts=4, shard_experts={5: ((0, 1), (2, 3))})
    topology = Topology.from_ids(["a", "b"], {"replica-0": "a"})
    speculation = Speculation(AffinityModel(1, 4, 2), row_bytes=100)
    tokens = np.array([7, 8])
    experts = np.array([[[0, 2]], [[1, 0]]])  # [N=2, L=1, K=2]
    speculation.learn(tokens, experts, 0, placement, [5], topology)
    gauges = speculation.quality.gauges()
    # precision: token 7 hits {0} of {0, 1}, token 8 hits {0, 1}: 3 of 4 predicted.
    assert gauges["precision"] == pytest.approx(3 / 4)
    # actual local: 0 (local), 2 (remote), 1, 0 (local): 3 of 4. Predicted: 0, 1 twice, all local.
    assert gauges["actual_local_fraction"] == pytest.approx(3 / 4)
    assert gauges["predicted_local_fraction"] == pytest.approx(1.0)
    # fan-out: token 7 on shards {0, 1}, token 8 on {0}: 1.5. Remote sends: 1 (token 7 to shard 1)
    # over 2 tokens = 0.5 per token, each a 100-byte row out and back: 100 bytes per token.
    assert gauges["fanout"] == pytest.approx(1.5)
    assert gauges["cross_node_bytes_per_token"] == pytest.approx(100.0)
    assert speculation.model.num_observed == 2  # scored first, then learned from


def test_no_gauges_before_a_sample():
    gauges = Speculation(AffinityModel(1, 4, 2), row_bytes=8).quality.gauges()
    assert set(gauges.values()) == {None}


def controller_config(model_dir, **options):
    """A controller over the tiny Mixtral with a small KV cache, one torch thread and no staging pace."""
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig

    return ControllerConfig(engine=EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=256, num_threads=1),
                            model_id="mixtral-tiny", stage_pace_s=0.0, **options)


@pytest.fixture
def two_node_controller(model_dir):
    from moefleet.actors.local_groups import LocalShardGroup, local_controller
    from moefleet.cluster.control.state_store import InMemoryStore

    config = controller_config(model_dir, expert_shards=4)
    controller = local_controller(config, InMemoryStore(), LocalShardGroup(config.engine, ["node-a", "node-b"]))
    yield controller
    controller.shutdown()


def test_a_controller_over_two_nodes_plans_by_affinity_and_tokens_stay_the_same(two_node_controller, engines):
    controller = two_node_controller
    controller.start(2)
    static = engines("mixtral")
    prompts = random_prompts(static.engine.spec.vocab_size, (31, 17, 44, 9, 25, 38), seed=5)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in static.generate([{"prompt_token_ids": p} for p in prompts], params)]
    replicas = [controller.replica_group.handle(rid) for rid in ("replica-0", "replica-1")]
    for replica in replicas:
        replica.engine.engine.record_routing(1.0)

    async def serve_all():
        return await asyncio.gather(*(collect_tokens(replicas[i % 2], p, params) for i, p in enumerate(prompts)))

    assert asyncio.run(serve_all()) == expected
    controller.check(time.time())
    topology = controller.topology()
    assert topology.shard_nodes == (0, 1, 0, 1) and topology.replica_nodes == {"replica-0": 0, "replica-1": 1}
    gauges = controller.deployment_gauges()["speculation"]
    assert all(value is not None for value in gauges.values()), gauges
    assert 0 <= gauges["actual_local_fraction"] <= 1 and gauges["fanout"] >= 1
    assert controller.speculation.can_plan()

    summary = controller.rebalance("test")
    assert summary["reason"] == "rebalance (test; affinity)"
    assert asyncio.run(serve_all()) == expected  # the router still decides: the same tokens
    locality = controller.gateway_locality()
    assert locality is not None and set(locality.replica_nodes) == {"replica-0", "replica-1"}
    scores = locality.replica_scores(prompts[0])
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    # Two nodes hold every expert between them: a prompt's shares over the nodes sum to at least 1.
    assert sum(scores.values()) >= 1.0 - 1e-6


def test_gauges_become_prometheus_families():
    from prometheus_client.parser import text_string_to_metric_families

    from moefleet.cluster.gateway.deployment_metrics import deployment_families
    from moefleet.cluster.gateway.replica_metrics import merge_replica_metrics

    gauges = {"speculation": {"precision": 0.5, "fanout": None},
              "pools": {"desired": {"replicas": 3, "expert_shards": 2}, "actual": {"replicas": 1, "expert_shards": 2}}}
    text = merge_replica_metrics({}, deployment_families(gauges))
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples == [("moefleet_prediction_precision", {}, 0.5),  # nothing measured: no fan-out gauge
                       ("moefleet_autoscaler_desired_size", {"pool": "replicas"}, 3.0),
                       ("moefleet_autoscaler_desired_size", {"pool": "expert_shards"}, 2.0),
                       ("moefleet_autoscaler_actual_size", {"pool": "replicas"}, 1.0),
                       ("moefleet_autoscaler_actual_size", {"pool": "expert_shards"}, 2.0)]


def test_text_prompts_are_tokenized_for_shuffling(model_dir):
    from moefleet.cluster.control.speculation import GatewayLocality
    from moefleet.cluster.engine.tokenizer import Tokenizer
    from moefleet.cluster.gateway.request_locality import RequestLocality
    from moefleet.cluster.messages import GenerateRequest
    from moefleet.cluster.routing.request_placement import NodeAffinityTable

    directory = model_dir("mixtral")
    ids = Tokenizer(directory).encode("hello world")
    # Token ids[0] lives on node 1 only; every other token on node 0 only.
    table = NodeAffinityTable(np.array([ids[0]]), np.array([[0.0, 1.0]], dtype=np.float32), np.array([1.0, 0.0]))
    locality = RequestLocality()
    request = GenerateRequest(prompt="hello world", sampling_params=SamplingParams(max_tokens=1))
    assert locality(request) is None  # no table yet: routed by load and prefix alone
    locality.update(GatewayLocality(table, {"replica-0": 0, "replica-1": 1}, directory))
    share_on_1 = 1 / len(ids)
    assert locality(request) == pytest.approx({"replica-0": 1 - share_on_1, "replica-1": share_on_1})


def test_serving_starts_from_a_planned_placement_file(model_dir, engines, tmp_path):
    """`moefleet serve --placement FILE` (the controller's initial_placement): the shards start
    holding the file's experts, keyed by the model's MoE layers, and the tokens are the same."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.control.state_store import InMemoryStore
    from moefleet.cluster.placement.placement_file import save_placement_file

    static = engines("mixtral")
    spec = static.engine.spec
    num_experts, layers = spec.moe.num_experts, spec.moe_layer_indices
    # Trace numbering 0..L-1; shard 0 takes the low half of the experts, plus a copy of expert 0 on shard 1.
    low, high = tuple(range(num_experts // 2)), tuple(range(num_experts // 2, num_experts))
    layout = {i: (low, (0, *high)) for i in range(len(layers))}
    planned = Placement(epoch=0, num_experts=num_experts, shard_experts=layout)
    path = str(tmp_path / "placement.json")
    save_placement_file(path, planned, (0, 1))
    config = controller_config(model_dir, expert_shards=2, initial_placement=path)
    controller = local_controller(config, InMemoryStore())
    try:
        controller.start(1)
        assert controller.placement.shard_experts == {layer: (low, (0, *high)) for layer in layers}
        prompt = random_prompts(spec.vocab_size, (23,), seed=3)[0]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        expected = static.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
        replica = controller.replica_group.handle("replica-0")
        assert asyncio.run(collect_tokens(replica, prompt, params)) == expected
    finally:
        controller.shutdown()
    wrong = config.model_copy(update={"expert_shards": 3})
    with pytest.raises(ValueError, match="places experts on 2 shards, expert_shards is 3"):
        local_controller(wrong, InMemoryStore()).start(1)
    one_node = config.model_copy(update={"engine": config.engine.model_copy(
        update={"shard_resources": [{"node_a": 0.01}]})})
    with pytest.raises(ValueError, match="plans shards 0 and 1 on different nodes"):
        local_controller(one_node, InMemoryStore()).start(1)


def test_shard_resources_must_group_shards_as_the_plans_nodes_do():
    from moefleet.cluster.placement.placement_file import check_shard_nodes

    a, b = {"node_a": 0.01}, {"node_b": 0.01}
    check_shard_nodes("p.json", (0, 0, 1, 1), [a, a, b, b])
    check_shard_nodes("p.json", (0, 1, 0, 1), [a, b])  # cycled: shards 0, 2 on a; 1, 3 on b
    check_shard_nodes("p.json", (0, 0, 1, 1), None)  # one node: nothing to check
    with pytest.raises(ValueError, match="plans shards 0 and 2 on different nodes"):
        check_shard_nodes("p.json", (0, 0, 1, 1), [a])
    with pytest.raises(ValueError, match="plans shards 0 and 1 on one node"):
        check_shard_nodes("p.json", (0, 0, 1, 1), [a, b])


def test_recording_routing_refuses_bad_arguments(two_node_controller):
    from moefleet.cluster.errors import InvalidRequestError

    for args, field in (((0.0, 1.0, 10), "sample_rate"), ((1.0, 0.0, 10), "duration_s"),
                        ((1.0, 601.0, 10), "duration_s"), ((1.0, 1.0, 0), "max_events")):
        with pytest.raises(InvalidRequestError, match=field):
            two_node_controller.record_routing(*args)


def test_proactive_rebalancing_moves_experts_before_the_predicted_load_arrives(model_dir):
    """The affinity model has learned that token 5 routes, at every MoE layer, to the two busiest
    experts of the busiest shard (round robin on 2 shards). Requests of token 5 are admitted (the
    real router sends them elsewhere: the model is random); the prediction alone puts the forecast
    above the threshold, and the controller rebalances toward it. The bet missed (the real load
    lands on other experts), and the first sample above the threshold after it plans again toward
    the observed load, without waiting for the reactive rule's window or cooldown."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.autoscaler.rebalance_config import AutoRebalance
    from moefleet.cluster.control.state_store import InMemoryStore
    from moefleet.cluster.placement.planner import imbalance

    # threshold 5: the reactive rule never fires here; only the proactive one and its check can.
    config = controller_config(model_dir, expert_shards=2,
                               auto_rebalance=AutoRebalance(enabled=True, threshold=5.0, cooldown_s=0.0,
                                                            proactive_cooldown_s=0.0))
    controller = local_controller(config, InMemoryStore())
    try:
        controller.start(1)
        replica = controller.replica_group.handle("replica-0")
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        for prompt in random_prompts(replica.engine.engine.spec.vocab_size, (40, 33, 51, 27, 45, 38), seed=1):
            asyncio.run(collect_tokens(replica, prompt, params))
        controller.check(time.time())  # the observed window: a spread load; nothing predicted ahead
        assert controller.placement.epoch == 0
        load = controller._collect_load()  # [L, E]; round robin: shard s holds experts e with e % 2 == s
        hot = []
        for row in load:
            heavy = int(np.argmax([row[0::2].sum(), row[1::2].sum()]))
            hot.append(sorted(range(heavy, len(row), 2), key=lambda e: -row[e])[:2])
        controller.affinity.observe(np.full(1000, 5), np.tile(np.array(hot), (1000, 1, 1)))
        for _ in range(4):  # 2,000 prompt tokens coming: the predicted change counts (almost) in full
            asyncio.run(collect_tokens(replica, [5] * 500, SamplingParams(temperature=0, max_tokens=1)))
        controller.check(time.time())
        committed = [e for e in controller.events if e.startswith("epoch-committed")]
        assert controller.placement.epoch == 1 and "proactive: forecast imbalance" in committed[0]
        # The planner spread each layer's two coming-hot experts over both shards (or copied one).
        for row, layer in enumerate(controller.moe_layers):
            holders = {s for e in hot[row] for s in controller.placement.holders(layer, e)}
            assert holders == {0, 1}
        assert controller.policy.unchecked_proactive_at is not None
        # The token-5 prompts really went to other experts: on the new placement the observed load
        # is above the proactive threshold, and the next round corrects the bet.
        observed = imbalance(controller._collect_load(), controller.placement, controller.moe_layers)
        assert observed > 1.2, observed
        controller.check(time.time())
        committed = [e for e in controller.events if e.startswith("epoch-committed")]
        assert controller.placement.epoch == 2 and re.search(r"proactive rebalance \d+s ago missed", committed[0]), \
            committed
        assert controller.policy.unchecked_proactive_at is None  # one correction per bet
        assert imbalance(controller._collect_load(), controller.placement, controller.moe_layers) < observed
    finally:
        controller.shutdown()


def test_the_autoscaler_sees_the_arriving_requests_predicted_expert_load(model_dir):
    """With the predicted_expert_load predictor, each round hands the autoscaler the load window
    as the requests just admitted will make it: shaped like the affinity model's prediction for
    their prompts, scaled by their predicted rate against the rounds before."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.autoscaler.policy_file import parse_policy
    from moefleet.cluster.control.state_store import InMemoryStore

    policy = parse_policy("""apiVersion: moefleet.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: predicted}
spec:
  mode: advisory
  interval_s: 0.01
  predictor: {kind: predicted_expert_load}
  pools:
    replicas: {min: 1, max: 1}
    expert_shards: {min: 2, max: 4, targets: {shard_utilization: 0.7}}
""")
    config = controller_config(model_dir, expert_shards=2, autoscaling=policy)
    controller = local_controller(config, InMemoryStore())
    seen = []
    try:
        controller.start(1)
        observe = controller.autoscaler.autoscaling.observe
        controller.autoscaler.autoscaling.observe = lambda observation: (seen.append(observation),
                                                                         observe(observation))
        replica = controller.replica_group.handle("replica-0")
        controller.affinity.observe(np.full(1000, 5), np.tile(np.array([[1, 6]]), (1000, 4, 1)))
        one = SamplingParams(temperature=0, max_tokens=1)
        for prompt in random_prompts(replica.engine.engine.spec.vocab_size, (40, 33, 51), seed=1):
            asyncio.run(collect_tokens(replica, prompt, one))
        controller.check(time.time())  # the first admissions: nothing earlier to compare them with
        assert seen[-1].predicted_expert_load is None and seen[-1].expert_load is not None
        time.sleep(0.2)
        for _ in range(2):
            asyncio.run(collect_tokens(replica, [5] * 400, one))
        controller.check(time.time())
        observed, predicted = seen[-1].expert_load, seen[-1].predicted_expert_load
        assert predicted is not None and predicted.shape == observed.shape
        # Token 5 goes to experts 1 and 6 at every layer, as the model learned (the router decides otherwise).
        assert all(set(np.argsort(row)[-2:]) == {1, 6} for row in predicted)
        # 800 tokens of token 5 just now against 124 random ones in the round before: more is coming.
        assert predicted.sum() > 2 * observed.sum()
    finally:
        controller.shutdown()
