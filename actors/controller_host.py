"""The controller's Ray shell: a named actor that Ray restarts when it dies, over the Ray shard and
replica groups and the configured state store."""

from moefleet.actors.cluster_capacity import cluster_capacity
from moefleet.actors.ray_groups import RayReplicaGroup, RayShardGroup
from moefleet.actors.ray_runtime import serving_runtime_env
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.control.controller import Controller
from moefleet.cluster.control.state_store import store_from_url


class ControllerHost(Controller):
    """Inside the controller actor: the controller over Ray actors, watching from the start.
    Its replicas report lost shards to it by its actor name, so a restarted one hears them too."""

    def __init__(self, config: ControllerConfig):
        import ray

        name = ray.get_runtime_context().get_actor_name()
        capacity = cluster_capacity(config, joined_cluster=config.engine.ray_address is not None)
        super().__init__(config, RayShardGroup(config.engine), RayReplicaGroup(config, name),
                         store_from_url(config.state_store, config.store_prefix), request_capacity=capacity)
        self.start_monitor()


def remote_controller_class():
    import ray

    # Restarted by Ray when it dies; the restarted one recovers from the state store.
    return ray.remote(num_cpus=0, max_concurrency=32, max_restarts=-1,
                      runtime_env=serving_runtime_env())(ControllerHost)
