"""GetClusterState while the autoscaler retires replicas: a replica gone between the pool's list and
its answer is left out of the state; any other failure still fails the call."""

import asyncio
import types

import pytest

from moefleet.cluster.errors import ReplicaLostError
from moefleet.cluster.gateway.admin import GatewayAdmin
from moefleet.cluster.messages import ReplicaSnapshot, ReplicaState
from moefleet.v1 import admin_pb2


class _Handle:
    def __init__(self, answer):
        self.answer = answer

    async def call(self, method: str):
        assert method == "state"
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _snapshot(replica_id: str, epoch: int) -> ReplicaSnapshot:
    return ReplicaSnapshot(state=ReplicaState(replica_id=replica_id, status="serving", running=3, waiting=1,
                                              requests=4, outstanding_tokens=40),
                           placement_epoch=epoch, shards=(), expert_load=())


def _admin(answers: dict) -> GatewayAdmin:
    pool = types.SimpleNamespace(handles={rid: _Handle(a) for rid, a in answers.items()})
    return GatewayAdmin(types.SimpleNamespace(pool=pool, model_id="m", num_gateways=1))


def test_a_replica_retired_meanwhile_is_left_out_of_the_state():
    admin = _admin({"r0": _snapshot("r0", 7), "r1": ReplicaLostError("retired")})
    state = asyncio.run(admin.GetClusterState(admin_pb2.GetClusterStateRequest()))
    assert [r.replica_id for r in state.replicas] == ["r0"]
    assert (state.replicas[0].running, state.replicas[0].waiting, state.placement_epoch) == (3, 1, 7)


def test_any_other_failure_still_fails_the_call():
    admin = _admin({"r0": _snapshot("r0", 7), "r1": ValueError("a bug")})
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(admin.GetClusterState(admin_pb2.GetClusterStateRequest()))
