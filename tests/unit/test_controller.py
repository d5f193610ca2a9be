"""The controller without Ray: its shard and replica groups in this process (actors/local_groups.py),
an in-memory state store, the tiny Mixtral, and real Replica objects generating real tokens.
Placement changes, failures and restarts happen while requests run; every greedy output must
equal a static single-process run.

The controller's methods block (they wait for the replicas' acknowledgements on an event loop of
their own), so async tests call them through asyncio.to_thread, as the Ray shell's threads do."""

import asyncio
import time

import pytest

from moefleet import SamplingParams
from tests.conftest import collect_tokens, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)


@pytest.fixture
def deployment(model_dir):
    """deployment(store=None, **controller options) -> a controller over local groups; shut down
    after the test."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.control.state_store import InMemoryStore

    made = []

    def make(store=None, **options):
        config = ControllerConfig(engine=EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=256, num_threads=1),
                                  model_id="mixtral-tiny", stage_pace_s=0.0, **options)
        controller = local_controller(config, store if store is not None else InMemoryStore())
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.shutdown()


@pytest.fixture(scope="module")
def prompts_and_expected(engines):
    static = engines("mixtral")
    prompts = random_prompts(static.engine.spec.vocab_size, (7, 29, 12, 41), seed=23)
    expected = [o.outputs[0].token_ids for o in static.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    return prompts, expected


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _committed(controller, epoch: int) -> bool:
    return any(e.startswith("epoch-committed") and f"'epoch': {epoch}," in e for e in controller.events)


def test_scale_and_rebalance_shards_while_serving_keep_tokens_identical(deployment, prompts_and_expected):
    """Controller-owned shards 2 -> 4 -> rebalance -> 3 under requests in flight: the standby
    shard is taken first, the removed shard stops, every shard keeps only the slot maps of the
    epoch it serves, and the store holds what the controller committed."""
    from moefleet.cluster.errors import InvalidRequestError

    prompts, expected = prompts_and_expected
    controller = deployment(expert_shards=2, standby_shards=1)
    assert controller.start(1) == ["replica-0"]
    replica = controller.replica_group.handle("replica-0")
    standby = list(controller.standby)
    assert len(standby) == 1 and len(controller.shard_names) == 2

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replica, p, GREEDY)) for p in prompts]
        summaries = []
        for change in (lambda: controller.scale_shards(4), controller.rebalance, lambda: controller.scale_shards(3)):
            await asyncio.sleep(0.05)
            summaries.append(await asyncio.to_thread(change))
            assert not all(t.done() for t in tasks)  # the epoch changed under requests in flight
        return await asyncio.gather(*tasks), summaries

    outputs, summaries = asyncio.run(run())
    assert outputs == expected
    assert [s["epoch"] for s in summaries] == [1, 2, 3] and [s["shards"] for s in summaries] == [4, 4, 3]
    assert all(s["acks"] == {"replica-0": s["epoch"]} for s in summaries)
    assert standby[0] in controller.shard_names  # the change took the standby shard, no fresh start for it
    _wait_for(lambda: len(controller.standby) == 1)  # refilled after the change
    placement = controller.placement
    hosts = controller.shard_group.hosts
    assert set(hosts) == set(controller.shard_names) | set(controller.standby)  # the fourth shard stopped
    for i, name in enumerate(controller.shard_names):
        assert sorted(hosts[name].shard.epochs) == [placement.layout_epoch(i)]  # older epochs retired
    assert replica.engine.engine.placement == placement
    assert controller.store.epoch() == (4, placement)  # start + three changes, compare-and-set each
    assert list(controller.store.deployment().shards) == controller.shard_names
    with pytest.raises(InvalidRequestError, match="shards"):
        controller.scale_shards(0)


def test_lost_shard_is_replaced_once_and_requests_keep_their_tokens(deployment, prompts_and_expected):
    """A shard stops while two replicas stream: both see it fail, the controller replaces it once
    (with the standby shard), and every request finishes with the static run's tokens."""
    prompts, expected = prompts_and_expected
    controller = deployment(expert_shards=2, standby_shards=1)
    controller.start(2)
    replicas = [controller.replica_group.handle(rid) for rid in ("replica-0", "replica-1")]
    lost, standby = controller.shard_names[1], controller.standby[0]

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replicas[i % 2], p, GREEDY)) for i, p in enumerate(prompts)]
        await asyncio.sleep(0.2)
        controller.shard_group.stop([lost])  # the shard's process dies
        return await asyncio.gather(*tasks)

    assert asyncio.run(run()) == expected
    _wait_for(lambda: _committed(controller, 1))
    assert controller.placement.epoch == 1  # reported by both replicas, replaced once
    assert controller.shard_names[1] == standby and lost not in controller.shard_group.hosts
    assert any("replace lost shards [1]" in e for e in controller.events)
    assert [r.engine.engine.placement.epoch for r in replicas] == [1, 1]


def test_lost_replica_is_replaced_and_a_drained_one_retires(deployment, prompts_and_expected):
    prompts, expected = prompts_and_expected
    controller = deployment(expert_shards=2)
    controller.start(2)
    controller.replica_group.shutdown("replica-0")  # the replica's process dies
    controller.check(time.time())
    assert [rid for rid, _, _ in controller.replicas()] == ["replica-1", "replica-2"]
    assert controller.store.deployment().replicas == ("replica-1", "replica-2")
    assert any("replica-lost" in e for e in controller.events)
    fresh = controller.replica_group.handle("replica-2")
    assert asyncio.run(collect_tokens(fresh, prompts[0], GREEDY)) == expected[0]

    assert controller.drain_replica("replica-1") == "draining replica-1"
    assert controller.replicas()[0] == ("replica-1", controller.replica_group.handle("replica-1"), True)
    controller.check(time.time())  # idle: it retires
    assert [rid for rid, _, _ in controller.replicas()] == ["replica-2"]
    assert "replica-1" not in controller.replica_group.replicas and controller.target_replicas == 1


def test_restarted_controller_recovers_from_the_store_with_its_rebalance_window_and_cooldown(
        deployment, model_dir, prompts_and_expected):
    """Each controller below is the one before it restarted on the same store: it finds the
    shards and replicas by name, replaces a shard that died while none was watching, and keeps the
    rebalance rule's samples and cooldown (wall-clock times from the store)."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.autoscaler.rebalance_rule import rebalance_due
    from moefleet.cluster.control.state_store import InMemoryStore

    prompts, expected = prompts_and_expected
    store = InMemoryStore()
    rule = {"enabled": True, "threshold": 1.01, "window_s": 2.0, "cooldown_s": 100.0}
    first = deployment(store, expert_shards=2, auto_rebalance=rule)
    first.start(1)
    replica = first.replica_group.handle("replica-0")
    skewed = asyncio.run(collect_tokens(replica, [7, 7, 7, 7], GREEDY))  # a skewed expert load
    now = time.time() + 1000  # long after the start's commit: its cooldown is over

    def restart(before):
        return local_controller(before.config, store, before.shard_group, before.replica_group)

    first.check(now)
    first.check(now + 1)  # one second of a two-second window watched: not due yet
    assert first.placement.epoch == 0 and len(first.policy.samples) == 2

    second = restart(first)
    assert second.recovered and second.incarnation != first.incarnation
    assert (second.placement, second.generation, second.shard_names) == (first.placement, 1, first.shard_names)
    assert second.replica_ids == ["replica-0"] and second.policy == first.policy
    second.check(now + 2.5)  # the window began before the restart
    assert second.placement.epoch == 1 and any("rebalance (imbalance above 1.01" in e for e in second.events)
    assert store.rebalance_state().last_change_at == now + 2.5

    dead = second.shard_names[0]
    second.shard_group.stop([dead])  # dies while no controller watches
    third = restart(second)
    _wait_for(lambda: _committed(third, 2))
    assert third.placement.epoch == 2 and dead not in third.shard_names
    assert any("lost_shards': [0]" in e for e in third.events)
    assert asyncio.run(collect_tokens(replica, prompts[1], GREEDY)) == expected[1]
    assert asyncio.run(collect_tokens(replica, [7, 7, 7, 7], GREEDY)) == skewed

    fourth = restart(third)
    last_change = fourth.policy.last_change_at
    for t in (4.0, 5.0, 7.0):
        fourth.check(last_change + t)
    samples, rule = list(fourth.policy.samples), fourth.config.auto_rebalance
    assert rebalance_due(samples, last_change + 7.0, rule.model_copy(update={"cooldown_s": 0.0}), last_change)
    assert fourth.placement.epoch == 2  # due but for the cooldown of the last change, which the restart kept
    fourth.check(last_change + 101.0)
    assert fourth.placement.epoch == 3


def test_replicas_with_their_own_experts_change_placement_through_the_controller(deployment, prompts_and_expected):
    """expert_shards = 0: each replica keeps its experts in process, and the controller still plans
    (from the replicas' summed load), commits and sends every epoch; a replica started later
    catches up to the committed one."""
    prompts, expected = prompts_and_expected
    controller = deployment()
    controller.start(2)
    replicas = [controller.replica_group.handle(rid) for rid in ("replica-0", "replica-1")]
    assert controller.placement.epoch == 0 and controller.shard_names == []
    assert all(r.engine.engine.placement == controller.placement for r in replicas)

    async def serve_on_both():
        return await asyncio.gather(*(collect_tokens(replicas[i % 2], p, GREEDY) for i, p in enumerate(prompts)))

    assert asyncio.run(serve_on_both()) == expected
    controller.check(time.time())  # collects the load: the replicas' windows, summed
    assert controller.store.load() == sum(r.engine.engine.load.window() for r in replicas).astype(int).tolist()
    assert controller.scale_shards(2)["acks"] == {"replica-0": 1, "replica-1": 1}
    assert controller.rebalance()["epoch"] == 2
    for replica in replicas:
        engine = replica.engine.engine
        assert engine.placement == controller.placement and len(engine.experts.local_shards) == 2
    assert controller.store.epoch() == (3, controller.placement)
    late = controller.replica_group.handle(controller.add_replica())
    assert late.engine.engine.placement == controller.placement
    assert asyncio.run(serve_on_both()) == expected
    assert asyncio.run(collect_tokens(late, prompts[2], GREEDY)) == expected[2]


def test_the_controller_learns_routing_and_a_restarted_one_keeps_it(deployment, model_dir, tmp_path):
    """The replicas' sampled routing feeds the controller's affinity model, which is saved to the
    state store (a real redis-server) and reloaded by a restarted controller."""
    import numpy as np

    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.control.state_store import RedisStore
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        store = RedisStore(server.url, prefix="affinity-test")
        first = deployment(store, affinity_save_interval_s=0.0)
        first.start(1)
        replica = first.replica_group.handle("replica-0")
        replica.engine.engine.record_routing(1.0)
        prompt = [11, 12, 13, 11, 12, 13, 11, 12]
        asyncio.run(collect_tokens(replica, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
        first.check(time.time())
        assert first.affinity.num_observed == len(prompt) + 3  # every token run: the prompt and 3 fed outputs
        assert store.affinity() is not None
        second = local_controller(first.config, store, first.shard_group, first.replica_group)
        assert second.affinity.num_observed == first.affinity.num_observed
        tokens = np.array(prompt)
        for layer in range(first.affinity.num_layers):
            assert [a.tolist() for a in second.affinity.predict(tokens, layer)] == \
                [a.tolist() for a in first.affinity.predict(tokens, layer)]
    finally:
        server.stop()


def test_copy_and_send_sizes_follow_the_engines_dtype(model_dir):
    """What an expert copy moves (the autoscaler's migration budget) and what a remote send carries
    (the cross-node bytes gauge) are counted in the engines' dtype, not always float32."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.control.state_store import InMemoryStore

    sizes = {}
    for dtype in ("float32", "bfloat16"):
        config = ControllerConfig(engine=EngineConfig(model=model_dir("mixtral"), dtype=dtype), model_id="m")
        controller = local_controller(config, InMemoryStore())
        try:
            sizes[dtype] = (controller.expert_bytes(), controller.speculation.quality.row_bytes)
        finally:
            controller.shutdown()
    spec = controller.spec
    assert sizes["float32"] == (3 * spec.hidden_size * spec.moe.intermediate_size * 4, spec.hidden_size * 4)
    assert sizes["bfloat16"] == (sizes["float32"][0] // 2, sizes["float32"][1] // 2)


def test_gateways_listing_replicas_skip_one_retired_meanwhile(deployment):
    """A gateway's refresh lists the replicas without the control lock; a replica the monitor retires
    in the middle (its handle gone, its id not yet) is left out instead of failing the refresh (an
    Admin ScaleReplicas answered INTERNAL KeyError('replica-1') this way)."""
    controller = deployment()
    controller.start(2)
    controller.replica_group.shutdown("replica-1")  # the retire's second half, before the id goes
    assert [rid for rid, _, _ in controller.replicas()] == ["replica-0"]


def test_an_epoch_skips_a_replica_actor_retired_since_the_ids_were_listed(model_dir):
    """The controller lists its replicas, then installs an epoch on each; the monitor may retire one
    in between. Its actor is gone from the Ray group: nothing to install, not a KeyError that fails
    the whole change (an Admin ScaleShards right after a drain answered INTERNAL this way)."""
    from moefleet.actors.ray_groups import RayReplicaGroup
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.placement.epoch_record import EpochRecord

    group = RayReplicaGroup(ControllerConfig(engine=EngineConfig(model=model_dir("mixtral")), model_id="m"), "ctl")
    record = EpochRecord.__new__(EpochRecord)  # never sent: there is no live replica to send it to
    assert group.install(["replica-1"], record, wait=True) == {}
