"""GatewayHost: the Ray shell of a gateway process — a Gateway (cluster/gateway) over the
controller's replicas, started on its own event loop inside the actor."""

from moefleet.actors.ray_runtime import serving_runtime_env
from moefleet.cluster.gateway.auth import TokenAuth
from moefleet.cluster.gateway.gateway import Gateway
from moefleet.cluster.gateway.replica_pool import RayReplicaHandle


class GatewayHost:
    """Inside a gateway actor: a Gateway over the controller's replicas."""

    def __init__(self, controller_name: str, model_id: str, auth: TokenAuth, grpc_address: str, http_host: str,
                 http_port: int | None, tls, num_gateways: int, transport: str = "socket"):
        import ray

        controller = ray.get_actor(controller_name)
        handles = [RayReplicaHandle(actor, rid, transport) for rid, actor, _ in ray.get(controller.replicas.remote())]
        self.gateway = Gateway(handles, model_id, auth, grpc_address, http_host, http_port, tls, controller, num_gateways,
                               transport=transport)
        self.ports = self.gateway.start()

    def ports_bound(self) -> tuple[int, int | None]:
        return self.ports

    def drain(self, grace_s: float) -> None:
        self.gateway.stop(grace_s)


def remote_gateway_class():
    """Gateways run on the node of the process that starts them (`moefleet serve`, which prints
    their addresses; on Kubernetes the head pod, behind the gateway Service), never on a worker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here, runtime_env=serving_runtime_env())(GatewayHost)
