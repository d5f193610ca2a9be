"""Building the shards and the transport a replica's dispatcher talks to, from the engine
config: in-process shard objects, or shard actors on a Ray cluster reached by actor calls or a
compiled graph ("auto" tries the compiled graph first: it is the faster of the two)."""

import logging
from dataclasses import dataclass, field

from moefleet.actors.expert_shard import ExpertShard
from moefleet.cluster.config import EngineConfig
from moefleet.cluster.placement import Placement
from moefleet.cluster.transport import InProcessTransport

log = logging.getLogger(__name__)


@dataclass
class ExpertBackend:
    transport: object
    kind: str  # "local", "actor" or "compiled_graph"
    actors: list = field(default_factory=list)
    local_shards: list[ExpertShard] = field(default_factory=list)
    shard_info: list[dict] = field(default_factory=list)

    def threads_used_on_this_node(self) -> int:
        """torch threads that shard actors run beside this process."""
        return sum(info["threads"] for info, local in zip(self.shard_info, self.transport.traffic.local) if local)

    def close(self) -> None:
        if hasattr(self.transport, "close"):
            self.transport.close()
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


def uses_remote_shards(config: EngineConfig) -> bool:
    return config.expert_shards > 0 and config.transport != "local"


def build_expert_backend(config: EngineConfig, reader, placement: Placement) -> ExpertBackend:
    """Shards for `placement` (one per placement shard), each loading only its experts."""
    if not uses_remote_shards(config):
        shards = [ExpertShard.from_checkpoint(i, reader, placement.experts_of_shard(i)) for i in range(placement.num_shards)]
        return ExpertBackend(InProcessTransport(shards), "local", local_shards=shards)
    import ray

    from moefleet.actors.shard_host import remote_shard_class
    from moefleet.cluster.ray_runtime import ensure_ray
    from moefleet.cluster.ray_transport import ActorTransport, CompiledGraphTransport

    ensure_ray(config.ray_address)
    shard_class = remote_shard_class()
    actors = []
    for i in range(placement.num_shards):
        # OMP_NUM_THREADS before torch loads in the actor: its OpenMP pool is sized at import.
        options = {"num_cpus": config.shard_num_cpus, "max_restarts": 0,
                   "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(config.shard_num_threads)}}}
        if config.shard_resources:
            options["resources"] = config.shard_resources[i % len(config.shard_resources)]
        actors.append(shard_class.options(**options).remote(
            i, config.model, config.dtype, placement.experts_of_shard(i), config.shard_num_threads))
    info = ray.get([a.info.remote() for a in actors], timeout=config.shard_start_timeout_s)
    my_node = ray.get_runtime_context().get_node_id()
    local = [i["node_id"] == my_node for i in info]
    # "auto" takes the compiled graph only when every shard shares this node: across nodes,
    # Ray 2.60's compiled-graph channels are ~6x slower here, and a shard dying mid-push crashes
    # the raylet (mutable-object WriteAcquire check, "Channel closed").
    if config.transport == "compiled_graph" or (config.transport == "auto" and all(local)):
        try:
            transport = CompiledGraphTransport(actors, config.shard_timeout_s, local)
            return ExpertBackend(transport, "compiled_graph", actors=actors, shard_info=info)
        except Exception as e:
            if config.transport == "compiled_graph":
                for actor in actors:
                    ray.kill(actor)
                raise
            log.warning("compiled graph unavailable (%s); using actor calls", e)
    elif config.transport == "auto":
        log.info("shards span nodes: using actor calls rather than a compiled graph")
    return ExpertBackend(ActorTransport(actors, config.shard_timeout_s, local), "actor", actors=actors, shard_info=info)
