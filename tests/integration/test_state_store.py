"""The state store contract, run against the in-memory store and a real redis-server."""

import os
import time

import pytest

from moefleet.cluster.control.state_store import InMemoryStore, RedisStore
from moefleet.cluster.placement.placement import round_robin_placement
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return InMemoryStore()
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"test-{os.getpid()}-{time.monotonic_ns()}")


def test_epoch_compare_and_set(store):
    assert store.epoch() == (0, None)
    first = round_robin_placement([0, 1], 8, 2)
    assert store.commit_epoch(0, first)
    assert not store.commit_epoch(0, round_robin_placement([0, 1], 8, 4, epoch=1))  # a stale controller loses
    generation, placement = store.epoch()
    assert generation == 1 and placement == first
    second = round_robin_placement([0, 1], 8, 4, epoch=1)
    assert store.commit_epoch(1, second) and store.epoch() == (2, second)


def test_membership_heartbeats_expire(store):
    store.heartbeat("shard", "s0", {"node": "a"}, now=100.0, ttl_s=5)
    store.heartbeat("shard", "s1", {"node": "b"}, now=103.0, ttl_s=5)
    assert store.members("shard", now=104.0) == {"s0": {"node": "a"}, "s1": {"node": "b"}}
    assert store.members("shard", now=106.0) == {"s1": {"node": "b"}}  # s0 missed its heartbeat
    store.remove_member("shard", "s1")
    assert store.members("shard", now=106.0) == {} and store.members("replica", now=0) == {}


def test_load_window_and_decision_log(store):
    assert store.load() is None
    store.put_load([[1, 2, 3], [4, 5, 6]])
    assert store.load() == [[1, 2, 3], [4, 5, 6]]
    for i in range(5):
        store.log_decision({"action": "rebalance", "i": i})
    assert [d["i"] for d in store.decisions(limit=3)] == [4, 3, 2]


def test_two_stores_on_one_redis_see_one_epoch(redis_url):
    a, b = RedisStore(redis_url, prefix="shared-epoch"), RedisStore(redis_url, prefix="shared-epoch")
    a.redis.delete("shared-epoch:epoch")
    assert a.commit_epoch(0, round_robin_placement([0], 4, 2))
    assert not b.commit_epoch(0, round_robin_placement([0], 4, 1))
    assert b.epoch()[0] == 1  # a restarted controller recovers the epoch from Redis


def test_deployment_record_round_trips(store):
    from moefleet.cluster.control.records import DeploymentRecord

    assert store.deployment() is None
    record = DeploymentRecord(shards=("s-a", "s-b"), replicas=("replica-0", "replica-2"), draining=("replica-0",),
                              standby=("s-c",), target_replicas=1, next_replica=3)
    store.put_deployment(record)
    assert store.deployment() == record


def test_rebalance_state_outlives_the_controller_that_wrote_it(store):
    """The rules' samples, last change and proactive change still watched, as a restarted
    controller reads them back (wall-clock times, so they mean the same in any process)."""
    from moefleet.cluster.control.records import RebalanceState

    assert store.rebalance_state() == RebalanceState()
    state = RebalanceState().changed(1_700_000_000.5).sampled(1_700_000_001.25, 1.75, window_s=30.0)
    store.put_rebalance_state(state)
    assert store.rebalance_state() == state
    assert store.rebalance_state().samples == ((1_700_000_001.25, 1.75),)
    watched = RebalanceState().changed(1_700_000_002.5, proactive=True).sampled(1_700_000_003.0, 1.1, window_s=30.0)
    store.put_rebalance_state(watched)
    assert store.rebalance_state() == watched and store.rebalance_state().unchecked_proactive_at == 1_700_000_002.5
    store.put_rebalance_state(watched.checked())
    assert store.rebalance_state().unchecked_proactive_at is None
    assert store.rebalance_state().samples == ((1_700_000_003.0, 1.1),)


def test_the_affinity_model_outlives_the_controller_that_wrote_it(store):
    """What a controller saves of its affinity model comes back, predicting the same."""
    import numpy as np

    from moefleet.cluster.routing.affinity import AffinityModel

    assert store.affinity() is None
    model = AffinityModel(num_layers=2, num_experts=8, top_k=2)
    model.observe(np.array([3, 3, 4]), np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[5, 6], [7, 0]]]))
    store.put_affinity(model.state())
    back = AffinityModel.from_state(store.affinity())
    tokens = np.array([3, 4, 9])
    for layer in range(2):
        assert [a.tolist() for a in back.predict(tokens, layer)] == [a.tolist() for a in model.predict(tokens, layer)]
    assert back.num_observed == 3
