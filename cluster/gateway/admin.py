"""The Admin API's operations, behind the gRPC Admin service (grpc_server.AdminService checks the
token and maps errors)."""

import asyncio

from moefleet.cluster.errors import InvalidRequestError
from moefleet.v1 import admin_pb2


class GatewayAdmin:
    """The Admin API's operations. Shard scaling and rebalancing go to the controller when it owns
    the expert shards, else they run the epoch protocol on each replica (prepare while serving,
    commit between steps, retire); the autoscaler is not built yet, so its policy calls answer
    UNIMPLEMENTED and say so."""

    def __init__(self, gateway):
        self.gateway = gateway

    async def GetClusterState(self, request):  # noqa: N802
        states = await asyncio.gather(*(h.call("state") for h in self.gateway.pool.handles.values()))
        replicas = [admin_pb2.ReplicaState(
            replica_id=s["replica_id"], status=s["status"], running=s["running"], waiting=s["waiting"],
            outstanding_tokens=s["outstanding_tokens"], shards=[admin_pb2.ShardState(**x) for x in s["shards"]],
            expert_load=[admin_pb2.ExpertLoad(**x) for x in s["expert_load"]]) for s in states]
        epoch = max((s["placement_epoch"] for s in states), default=0)
        return admin_pb2.ClusterState(model=self.gateway.model_id, placement_epoch=epoch, replicas=replicas,
                                      gateways=self.gateway.num_gateways)

    async def ScaleReplicas(self, request):  # noqa: N802
        if request.replicas < 1:
            raise InvalidRequestError("replicas", f"must be >= 1, got {request.replicas}")
        if self.gateway.controller is None:
            raise NotImplementedError("this gateway has no controller to start replicas")
        message = await self.gateway.controller.scale_replicas.remote(request.replicas)
        await self.gateway.refresh_replicas()
        return admin_pb2.OperationResult(accepted=True, message=message)

    async def Drain(self, request):  # noqa: N802
        handle = self.gateway.pool.handles.get(request.replica_id)
        if handle is None:
            raise InvalidRequestError("replica_id", f"unknown replica {request.replica_id!r}; "
                                                    f"replicas: {sorted(self.gateway.pool.handles)}")
        await handle.call("drain")
        self.gateway.pool.mark_draining(request.replica_id)
        if self.gateway.controller is not None:
            await self.gateway.controller.mark_draining.remote(request.replica_id)
        return admin_pb2.OperationResult(accepted=True, message=f"replica {request.replica_id} is draining")

    async def ScaleShards(self, request):  # noqa: N802
        if request.shards < 1:
            raise InvalidRequestError("shards", f"must be >= 1, got {request.shards}")
        if await self._controller_owns_shards():
            done = await self.gateway.controller.scale_shards.remote(request.shards)
            return admin_pb2.OperationResult(accepted=True, message=f"{request.shards} expert shards; placement epoch "
                                                                    f"{done['epoch']} serving")
        epochs = await asyncio.gather(*(h.call("scale_shards", request.shards) for h in self.gateway.pool.handles.values()))
        return admin_pb2.OperationResult(accepted=True, message=f"{request.shards} expert shards per replica; "
                                                                f"placement epochs {sorted(set(epochs))}")

    async def Rebalance(self, request):  # noqa: N802
        if await self._controller_owns_shards():
            done = await self.gateway.controller.rebalance.remote()
            return admin_pb2.OperationResult(accepted=True, message=f"rebalanced by load; placement epoch {done['epoch']}")
        epochs = await asyncio.gather(*(h.call("rebalance") for h in self.gateway.pool.handles.values()))
        return admin_pb2.OperationResult(accepted=True, message=f"rebalanced by load; placement epochs {sorted(set(epochs))}")

    async def _controller_owns_shards(self) -> bool:
        if self.gateway.controller is None:
            return False
        return (await self.gateway.controller.health.remote())["shards"] > 0

    async def GetAutoscalingPolicy(self, request):  # noqa: N802
        raise NotImplementedError("the autoscaler is not built yet: there is no autoscaling policy")

    async def SetAutoscalingPolicy(self, request):  # noqa: N802
        raise NotImplementedError("the autoscaler is not built yet: there is no autoscaling policy to set")
