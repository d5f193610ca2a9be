"""The autoscaler in the controller (cluster/control/autoscaling*.py) over replicas in this process:
load on the replicas scales them up, idleness scales them down by draining (no request lost, the
same greedy tokens), every change is in the history with its reason, advisory mode only logs,
the policy is hot-reloaded, and policy and state survive a controller restart through a real
redis-server."""

import asyncio
import threading
import time

import pytest

from moefleet import SamplingParams
from moefleet.autoscaler.policy_file import parse_policy
from tests.conftest import collect_tokens, random_prompts

POLICY = """apiVersion: moefleet.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: unit}
spec:
  mode: %s
  interval_s: 0.01
  slo: {window_s: 5}
  pools:
    replicas:
      min: 1
      max: 3
      max_step: 2
      standby: %s
      targets: {running_requests: 2, waiting_requests: null, kv_cache_usage: null, ttft_slo_fraction: null,
                itl_slo_fraction: null}
      scale_up: {stabilization_window_s: 0, cooldown_s: 0}
      scale_down: {stabilization_window_s: 0, cooldown_s: 0}
"""


@pytest.fixture
def autoscaled(model_dir):
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.control.state_store import InMemoryStore

    made = []

    def make(mode="active", store=None, groups=(), standby=0):
        config = ControllerConfig(engine=EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=256, num_threads=1),
                                  model_id="mixtral-tiny", autoscaling=parse_policy(POLICY % (mode, standby)))
        controller = local_controller(config, store if store is not None else InMemoryStore(), *groups)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.shutdown()


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _busy(controller, count: int, params):
    """`count` requests on replica-0, run on a thread of their own; returns (thread, results)."""
    replica = controller.replica_group.handle("replica-0")
    prompts = random_prompts(replica.engine.engine.spec.vocab_size, [9 + i for i in range(count)], seed=8)
    results: list = []

    def run():
        async def all_of_them():
            return await asyncio.gather(*(collect_tokens(replica, p, params) for p in prompts))
        results.extend(asyncio.run(all_of_them()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, results, prompts


def test_load_scales_replicas_up_idleness_drains_them_and_the_history_says_why(autoscaled, engines):
    controller = autoscaled()
    controller.start(1)
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    thread, results, prompts = _busy(controller, 8, params)
    # 8 running at 2 per replica: 4 units wanted, max_step 2 from 1 -> 3, the max.
    _wait_for(lambda: controller.replica_group.handle("replica-0").stats().running >= 6)
    controller.check(time.time())
    _wait_for(lambda: len(controller.serving_replicas()) == 3)
    thread.join()
    expected = [o.outputs[0].token_ids for o in engines("mixtral").generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    assert results == expected  # nothing lost, nothing changed
    history = controller.autoscaler_history()
    up = history[0]["changes"][0]
    assert (up["action"], up["pool"], up["before"], up["after"]) == ("scale_up", "replicas", 1, 3)
    assert "running_requests" in up["reason"] and up["signals"]["running_requests"] >= 6
    # Idle now: down to the minimum, by draining (the retired replicas leave at the next rounds).
    _wait_for(lambda: not controller.autoscaler.acting())
    time.sleep(0.05)
    controller.check(time.time())
    _wait_for(lambda: len(controller.serving_replicas()) == 1)
    for _ in range(3):
        controller.check(time.time())
    assert len(controller.replica_ids) == 1
    down = controller.autoscaler_history()[0]["changes"][0]
    assert (down["action"], down["before"], down["after"]) == ("scale_down", 3, 1)
    status = controller.autoscaler_status()
    assert status["actual"]["replicas"] == 1 and status["desired"]["replicas"] == 1
    assert controller.deployment_gauges()["pools"] == {"desired": {"replicas": 1, "expert_shards": 0},
                                                       "actual": {"replicas": 1, "expert_shards": 0}}


def test_advisory_mode_decides_and_logs_without_acting(autoscaled):
    controller = autoscaled("advisory")
    controller.start(1)
    thread, _, _ = _busy(controller, 8, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    _wait_for(lambda: controller.replica_group.handle("replica-0").stats().running >= 6)
    controller.check(time.time())
    thread.join()
    decision = controller.autoscaler_history()[0]
    assert decision["advisory"] and decision["replicas"] == 3
    assert controller.serving_replicas() == ["replica-0"]  # nothing acted on


def test_policy_hot_reload_is_validated_and_survives_a_restart_through_redis(autoscaled, tmp_path):
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.control.state_store import RedisStore
    from moefleet.cluster.errors import InvalidRequestError
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        store = RedisStore(server.url, prefix="autoscaler-test")
        first = autoscaled(store=store)
        first.start(1)
        first.check(time.time())  # one decision: the policy's state goes to the store
        with pytest.raises(InvalidRequestError, match=r"spec\.pools\.replicas\.max: .*greater than or equal to 0"):
            first.set_autoscaling_policy((POLICY % ("active", 0)).replace("max: 3", "max: -1"))
        assert "in force" in first.set_autoscaling_policy((POLICY % ("active", 0)).replace("max: 3", "max: 2"))
        assert "max: 2" in first.get_autoscaling_policy()
        second = local_controller(first.config, store, first.shard_group, first.replica_group)
        # The restarted controller decides by the policy set over the Admin API, not the file's.
        assert second.autoscaler.autoscaling.policy.spec.pools.replicas.max == 2
        assert second.autoscaler.autoscaling.state == first.autoscaler.autoscaling.state
        # A deployment started with a changed policy file takes the file's, and keeps the state.
        changed = first.config.model_copy(update={"autoscaling": parse_policy((POLICY % ("active", 0)).replace(
            "max: 3", "max: 4"))})
        third = local_controller(changed, store, first.shard_group, first.replica_group)
        assert third.autoscaler.autoscaling.policy.spec.pools.replicas.max == 4
        assert third.autoscaler.autoscaling.state == first.autoscaler.autoscaling.state
    finally:
        server.stop()


def test_a_standby_replica_is_kept_warm_and_a_scale_up_takes_it_first(autoscaled, engines):
    controller = autoscaled(standby=1)
    controller.start(1)
    controller.check(time.time())  # the first decision asks for one warm replica
    _wait_for(lambda: len(controller.standby_replicas) == 1)
    warm = controller.standby_replicas[0]
    assert controller.serving_replicas() == ["replica-0"]  # warm, not routed to
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    thread, results, prompts = _busy(controller, 8, params)
    _wait_for(lambda: controller.replica_group.handle("replica-0").stats().running >= 6)
    controller.check(time.time())
    _wait_for(lambda: warm in controller.serving_replicas())
    assert any(e.startswith("replicas-started") and f"'from_standby': ['{warm}']" in e for e in controller.events)
    thread.join()
    expected = [o.outputs[0].token_ids for o in engines("mixtral").generate(
        [{"prompt_token_ids": p} for p in prompts], params)]
    assert results == expected
    # At the maximum (3) no room is left for a warm one (standby is at most max - desired).
    _wait_for(lambda: not controller.autoscaler.acting())
    assert controller.autoscaler_status()["standby"]["replicas"] == 0
