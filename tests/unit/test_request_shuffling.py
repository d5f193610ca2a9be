"""Request shuffling: a request goes to the replica whose node holds most of its predicted expert
activations, but never to one loaded beyond the least loaded by more than the router's slack."""

import random

import numpy as np
import pytest

from moefleet.cluster.gateway.router import PREFIX_HOME_BONUS, ReplicaLoad, choose_replica
from moefleet.cluster.messages import GenerateRequest
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.affinity import AffinityModel
from moefleet.cluster.routing.request_placement import NodeAffinityTable, node_affinity_table, node_share
from moefleet.cluster.sampling_params import SamplingParams


def test_locality_wins_among_the_balanced_replicas():
    loads = [ReplicaLoad("a", 100), ReplicaLoad("b", 300), ReplicaLoad("c", 50)]
    # b holds the most, and is within 256 of the least loaded (c): b.
    assert choose_replica(loads, "k", balance_slack=256, locality={"a": 0.2, "b": 0.9, "c": 0.1}) == 1
    # With a tighter slack b is too far ahead of c: the best of a and c.
    assert choose_replica(loads, "k", balance_slack=100, locality={"a": 0.2, "b": 0.9, "c": 0.1}) == 0
    # Equal shares: the less loaded, unless one is the prefix's home (worth PREFIX_HOME_BONUS).
    even = {"a": 0.5, "b": 0.5, "c": 0.5}
    home = choose_replica(loads, "k", balance_slack=1000)  # without locality: the home replica
    chosen = choose_replica(loads, "k", balance_slack=1000, locality=even)
    assert chosen == home
    assert choose_replica(loads, "k", balance_slack=1000,
                          locality={**even, loads[home].replica_id: 0.5 - 2 * PREFIX_HOME_BONUS}) != home


def test_a_draining_replica_is_never_chosen_for_locality():
    loads = [ReplicaLoad("a", 0, draining=True), ReplicaLoad("b", 0)]
    assert choose_replica(loads, "k", locality={"a": 1.0, "b": 0.0}) == 1


@pytest.mark.parametrize("seed", range(5))
def test_shuffling_never_overloads_a_replica(seed):
    """Requests that all prefer one replica. Under light load (few in flight) it takes nearly all
    of them; when they arrive faster than they finish, each is sent to a replica at most the slack
    beyond the least loaded at the time, so the load spreads instead of piling on the favourite."""
    from moefleet.cluster.gateway.replica_pool import ReplicaPool

    class Handle:
        def __init__(self, rid):
            self.replica_id = rid

    rng = random.Random(seed)
    pool = ReplicaPool([Handle(f"r{i}") for i in range(4)])
    pool.locality = lambda request: {"r0": 0.95, "r1": 0.3, "r2": 0.2, "r3": 0.1}
    slack = 256

    def send(in_flight: list, chosen: dict) -> None:
        request = GenerateRequest(prompt_token_ids=[rng.randrange(1000) for _ in range(8)],
                                  sampling_params=SamplingParams(max_tokens=rng.randrange(16, 128)))
        least = min(pool.outstanding.values())
        handle = pool.pick(request)
        assert pool.outstanding[handle.replica_id] <= least + slack
        chosen[handle.replica_id] = chosen.get(handle.replica_id, 0) + 1
        cost = 8 + request.sampling_params.max_tokens
        pool.outstanding[handle.replica_id] += cost
        in_flight.append((handle.replica_id, cost))

    light, in_flight = {}, []
    for _ in range(200):
        send(in_flight, light)
        while len(in_flight) > 2:  # light load: requests finish about as fast as they come
            rid, cost = in_flight.pop(0)
            pool.outstanding[rid] -= cost
    assert light.get("r0", 0) >= 0.8 * 200
    heavy = {}
    for _ in range(400):  # nothing finishes
        send(in_flight, heavy)
    assert max(pool.outstanding.values()) - min(pool.outstanding.values()) <= slack + 136
    assert all(heavy.get(rid, 0) > 50 for rid in pool.outstanding)  # the load spread over every replica


def _topic_model() -> AffinityModel:
    """2 MoE layers, 4 experts, top-2: token 1 always chooses experts {0, 1}, token 2 {2, 3}."""
    model = AffinityModel(num_layers=2, num_experts=4, top_k=2, half_life=float("inf"))
    tokens = np.array([1] * 50 + [2] * 50)
    experts = np.array([[[0, 1], [0, 1]]] * 50 + [[[2, 3], [2, 3]]] * 50)
    model.observe(tokens, experts)
    return model


def test_node_table_scores_where_a_prompts_experts_live():
    model = _topic_model()
    # Layers keyed 10 and 20 in the placement (the model's MoE layers); shard 0 on node 0 holds
    # experts 0 and 1 of both layers, shard 1 on node 1 holds 2 and 3.
    placement = Placement(epoch=0, num_experts=4, shard_experts={10: ((0, 1), (2, 3)), 20: ((0, 1), (2, 3))})
    share = node_share(placement, (0, 1), [10, 20])
    assert share.shape == (2, 4, 2) and share[:, :2, 0].all() and share[:, 2:, 1].all() and share.sum() == 8
    table = node_affinity_table(model, share)
    assert list(table.token_ids) == [1, 2]
    # Token 1 was seen 50 times choosing {0, 1}: p(0) = p(1) = (50 + pi) / 51 with pi = (50 + 0.5) / 101
    # for those experts, so nearly all of its activations sit on node 0.
    pi = (50 + 0.5) / 101
    own, other = (50 + pi) / 51, pi / 51
    assert table.per_node[0] == pytest.approx([own / (own + other), other / (own + other)], rel=1e-5)
    assert table.unseen == pytest.approx([0.5, 0.5])  # the prior: half the activations on each node
    scores = table.request_scores([1, 1, 1, 2])
    assert scores == pytest.approx(0.75 * table.per_node[0] + 0.25 * table.per_node[1], rel=1e-6)
    assert table.request_scores([7, 8]) == pytest.approx([0.5, 0.5])
    assert table.request_scores([]) == pytest.approx([0.5, 0.5])


def test_a_copy_on_every_node_is_local_everywhere():
    model = _topic_model()
    placement = Placement(epoch=0, num_experts=4,
                          shard_experts={0: ((0, 1, 2), (2, 3)), 1: ((0, 1), (2, 3))})
    table = node_affinity_table(model, node_share(placement, (0, 1), [0, 1]))
    # Token 2 chooses {2, 3}; layer 0 expert 2 is on both nodes: node 0 holds a quarter of its activations.
    assert table.per_node[1][0] == pytest.approx(0.25, abs=0.02) and table.per_node[1][1] > 0.98


def test_bad_layouts_are_refused():
    placement = Placement(epoch=0, num_experts=4, shard_experts={0: ((0, 1), (2, 3))})
    with pytest.raises(ValueError, match="shard_nodes"):
        node_share(placement, (0,), [0])
    with pytest.raises(ValueError, match="share"):
        node_affinity_table(_topic_model(), np.zeros((1, 4, 2)))
    empty = NodeAffinityTable(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float32), np.array([0.3, 0.7]))
    assert empty.request_scores([3, 4]) == pytest.approx([0.3, 0.7])  # a model that has seen nothing: the prior
