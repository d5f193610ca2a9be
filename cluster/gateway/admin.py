"""The Admin API's operations, behind the gRPC Admin service (grpc_server.AdminService checks the
token and maps errors)."""

import asyncio
import dataclasses
import json

from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.gateway.replica_pool import is_replica_loss
from moefleet.cluster.messages import ReplicaSnapshot
from moefleet.cluster.routing.trace import trace_gzip_bytes
from moefleet.v1 import admin_pb2

DEFAULT_MAX_RECORDED_EVENTS = 1_000_000  # about 10 MB of gzip'd trace: under gRPC's default message limits


def _compute_s(snapshot: ReplicaSnapshot, shard: int) -> float:
    """Expert compute inside remote shard `shard` for this replica's rows (0 where its experts are local)."""
    compute = snapshot.state.shard_compute_s
    return compute[shard] if shard < len(compute) else 0.0


class GatewayAdmin:
    """The Admin API's operations. Replica and shard scaling and rebalancing go to the controller
    (one control path, whether it owns the expert shards or each replica keeps its experts in
    process), and so does Drain when there is one; a gateway without a controller answers
    UNIMPLEMENTED for the changes and drains a replica itself, and so do the autoscaler's calls
    where no autoscaling policy runs."""

    def __init__(self, gateway):
        self.gateway = gateway

    async def GetClusterState(self, request):  # noqa: N802
        answers = await asyncio.gather(*(h.call("state") for h in self.gateway.pool.handles.values()),
                                       return_exceptions=True)
        # A replica retired (or lost) between the pool's list and its answer is no longer part of the
        # deployment: the state leaves it out instead of failing the whole call.
        for answer in answers:
            if isinstance(answer, BaseException) and not is_replica_loss(answer):
                raise answer
        snapshots: list[ReplicaSnapshot] = [a for a in answers if not isinstance(a, BaseException)]
        replicas = [admin_pb2.ReplicaState(
            replica_id=s.state.replica_id, status=s.state.status, running=s.state.running, waiting=s.state.waiting,
            outstanding_tokens=s.state.outstanding_tokens,
            shards=[admin_pb2.ShardState(**dataclasses.asdict(shard), compute_seconds=_compute_s(s, shard.shard))
                    for shard in s.shards],
            expert_load=[admin_pb2.ExpertLoad(**dataclasses.asdict(load)) for load in s.expert_load])
            for s in snapshots]
        epoch = max((s.placement_epoch for s in snapshots), default=0)
        return admin_pb2.ClusterState(model=self.gateway.model_id, placement_epoch=epoch, replicas=replicas,
                                      gateways=self.gateway.num_gateways)

    async def ScaleReplicas(self, request):  # noqa: N802
        if request.replicas < 1:
            raise InvalidRequestError("replicas", f"must be >= 1, got {request.replicas}")
        message = await self._controller("start replicas").scale_replicas.remote(request.replicas)
        await self.gateway.refresh_replicas()
        return admin_pb2.OperationResult(accepted=True, message=message)

    async def Drain(self, request):  # noqa: N802
        handle = self.gateway.pool.handles.get(request.replica_id)
        if handle is None:
            raise InvalidRequestError("replica_id", f"unknown replica {request.replica_id!r}; "
                                                    f"replicas: {sorted(self.gateway.pool.handles)}")
        if self.gateway.controller is not None:  # it drains the replica and keeps count of the serving ones
            await self.gateway.controller.drain_replica.remote(request.replica_id)
        else:
            await handle.call("drain")
        self.gateway.pool.mark_draining(request.replica_id)
        return admin_pb2.OperationResult(accepted=True, message=f"replica {request.replica_id} is draining")

    async def ScaleShards(self, request):  # noqa: N802
        if request.shards < 1:
            raise InvalidRequestError("shards", f"must be >= 1, got {request.shards}")
        done = await self._controller("change the placement").scale_shards.remote(request.shards)
        return admin_pb2.OperationResult(accepted=True, message=f"{request.shards} expert shards; placement epoch "
                                                                f"{done['epoch']} serving")

    async def Rebalance(self, request):  # noqa: N802
        done = await self._controller("change the placement").rebalance.remote()
        return admin_pb2.OperationResult(accepted=True, message=f"{done['reason']}; placement epoch {done['epoch']}")

    async def RecordRouting(self, request):  # noqa: N802
        max_events = request.max_events or DEFAULT_MAX_RECORDED_EVENTS
        events, truncated = await self._controller("record routing").record_routing.remote(
            request.sample_rate, request.duration_s, max_events)
        return admin_pb2.RoutingTrace(jsonl_gz=trace_gzip_bytes(events), events=len(events), truncated=truncated)

    def _controller(self, to_do: str):
        """The controller actor, through which every membership and placement change goes."""
        if self.gateway.controller is None:
            raise NotImplementedError(f"this gateway has no controller to {to_do}")
        return self.gateway.controller

    async def GetAutoscalingPolicy(self, request):  # noqa: N802
        text = await self._controller("run an autoscaler").get_autoscaling_policy.remote()
        return admin_pb2.AutoscalingPolicy(yaml=text)

    async def SetAutoscalingPolicy(self, request):  # noqa: N802
        if not request.yaml.strip():
            raise InvalidRequestError("yaml", "the policy is empty")
        message = await self._controller("run an autoscaler").set_autoscaling_policy.remote(request.yaml)
        return admin_pb2.OperationResult(accepted=True, message=message)

    async def GetAutoscalerStatus(self, request):  # noqa: N802
        controller = self._controller("run an autoscaler")
        if request.limit < 0:
            raise InvalidRequestError("limit", f"must be >= 0, got {request.limit}")
        if request.history:
            found = await controller.autoscaler_history.remote(request.limit or 100)
        else:
            found = await controller.autoscaler_status.remote()
        return admin_pb2.AutoscalerStatus(json=json.dumps(found))
