"""The shards and the transport a replica's dispatcher talks to: in-process shard objects, or
shard actors on a Ray cluster reached by actor calls or a compiled graph ("auto" takes the
compiled graph when every shard shares this node).

A backend serves one placement epoch. The next epoch's backend is prepared from the current
one while it serves (`prepare_next`): shards at the same index are the same shards, so only the
experts that move are loaded; shards beyond the old count are started; removed shards are
stopped when the old backend retires. A backend either owns its shard actors (a replica with
its own shards) or attaches to shards the controller owns (then it never stops them)."""

import logging
from dataclasses import dataclass, field

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.experts.expert_shard import ExpertShard
from moefleet.cluster.experts.staging import stage_local, stage_remote
from moefleet.cluster.experts.transport import InProcessTransport
from moefleet.cluster.experts.wire import control
from moefleet.cluster.placement.placement import Placement

log = logging.getLogger(__name__)


@dataclass
class ExpertBackend:
    transport: object | None  # None until activate() for a compiled graph staged beside a live one
    kind: str  # "local", "actor" or "compiled_graph"
    actors: list = field(default_factory=list)
    local_shards: list[ExpertShard] = field(default_factory=list)
    shard_info: list[dict] = field(default_factory=list)
    owned: bool = True  # stop the actors when retired
    timeout_s: float = 30.0
    _released: bool = False

    def threads_used_on_this_node(self) -> int:
        """torch threads that shard actors run beside this process."""
        return sum(info["threads"] for info in self.shard_info if info.get("local"))

    def activate(self) -> None:
        """Build a deferred compiled graph (Ray lets an actor belong to one graph at a time, so
        the next epoch's graph is compiled only after the old one was torn down)."""
        if self.transport is None:
            from moefleet.cluster.experts.ray_transport import CompiledGraphTransport

            self.transport = CompiledGraphTransport(self.actors, self.timeout_s, [i["local"] for i in self.shard_info])

    def release_transport(self) -> None:
        if self.transport is not None and hasattr(self.transport, "close") and not self._released:
            self._released = True
            self.transport.close()

    def retire(self, successor: "ExpertBackend | None" = None, epoch: int | None = None) -> None:
        """After the switch to `successor` (epoch `epoch`): stop owned actors it does not keep
        and let the kept ones free the experts only older epochs used."""
        self.release_transport()
        if successor is not None and epoch is not None:
            for shard in successor.local_shards:
                shard.retire_before(epoch)
        if not self.actors or not self.owned:
            return
        import ray

        kept = set(map(id, successor.actors)) if successor is not None else set()
        for actor in self.actors:
            if id(actor) not in kept:
                ray.kill(actor)
        if successor is not None and epoch is not None:
            try:
                ray.get([control(a, "retire_before").remote(epoch) for a in successor.actors], timeout=self.timeout_s)
            except Exception as e:  # a shard lost meanwhile is recovered elsewhere; freeing is best effort
                log.warning("retiring epochs before %s: %s", epoch, e)
        self.actors = []

    def close(self) -> None:
        self.retire()


def uses_remote_shards(config: EngineConfig) -> bool:
    return config.expert_shards > 0 and config.transport != "local"


def start_shard_actors(config: EngineConfig, indices: list[int], placement: Placement | None, epoch: int = 0,
                       names: list[str] | None = None) -> list:
    """Shard actors for `indices` (each loading its experts of `placement`; none if None).
    Named ones are detached: they outlive their creator (the controller), which finds them again
    by name after a restart."""
    from moefleet.actors.ray_runtime import ensure_ray
    from moefleet.actors.shard_host import remote_shard_class

    ensure_ray(config.ray_address)
    shard_class = remote_shard_class()
    actors = []
    for n, i in enumerate(indices):
        # OMP_NUM_THREADS before torch loads in the actor: its OpenMP pool is sized at import.
        options = {"num_cpus": config.shard_num_cpus, "max_restarts": 0,
                   "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(config.shard_num_threads)}}}
        if config.shard_resources:
            options["resources"] = config.shard_resources[i % len(config.shard_resources)]
        if names is not None:
            options.update(name=names[n], lifetime="detached")
        experts = placement.experts_of_shard(i) if placement is not None else {}
        actors.append(shard_class.options(**options).remote(i, config.model, config.dtype, experts,
                                                            config.shard_num_threads, epoch,
                                                            config.shard_staging_when_idle, config.malloc_keep_mib))
    return actors


def shard_infos(actors: list, timeout_s: float) -> list[dict]:
    """Each actor's info plus whether it shares this process's node."""
    import ray

    info = ray.get([control(a, "info").remote() for a in actors], timeout=timeout_s)
    my_node = ray.get_runtime_context().get_node_id()
    return [{**i, "local": i["node_id"] == my_node} for i in info]


def _choose_transport(config: EngineConfig, info: list[dict]) -> str:
    # "auto" takes the compiled graph only when every shard shares this node: across nodes,
    # Ray 2.60's compiled-graph channels are ~6x slower here, and a shard dying mid-push crashes
    # the raylet (mutable-object WriteAcquire check, "Channel closed").
    if config.transport == "compiled_graph" or (config.transport == "auto" and all(i["local"] for i in info)):
        return "compiled_graph"
    if config.transport == "auto":
        log.info("shards span nodes: using actor calls rather than a compiled graph")
    return "actor"


def _remote_backend(config: EngineConfig, actors: list, info: list[dict], kind: str, deferred: bool,
                    owned: bool = True) -> ExpertBackend:
    from moefleet.cluster.experts.ray_transport import ActorTransport, CompiledGraphTransport

    local = [i["local"] for i in info]
    if kind == "compiled_graph":
        if deferred:
            return ExpertBackend(None, kind, actors, shard_info=info, owned=owned, timeout_s=config.shard_timeout_s)
        try:
            transport = CompiledGraphTransport(actors, config.shard_timeout_s, local)
            return ExpertBackend(transport, kind, actors, shard_info=info, owned=owned, timeout_s=config.shard_timeout_s)
        except Exception as e:
            if config.transport == "compiled_graph":
                raise
            log.warning("compiled graph unavailable (%s); using actor calls", e)
    return ExpertBackend(ActorTransport(actors, config.shard_timeout_s, local), "actor", actors, shard_info=info,
                         owned=owned, timeout_s=config.shard_timeout_s)


def build_expert_backend(config: EngineConfig, reader, placement: Placement) -> ExpertBackend:
    """Shards for `placement` (one per placement shard), each loading only its experts."""
    if not uses_remote_shards(config):
        shards = [ExpertShard.from_checkpoint(i, reader, placement.experts_of_shard(i), placement.epoch)
                  for i in range(placement.num_shards)]
        return ExpertBackend(InProcessTransport(shards), "local", local_shards=shards)
    import ray

    actors = start_shard_actors(config, list(range(placement.num_shards)), placement, placement.epoch)
    try:
        info = shard_infos(actors, config.shard_start_timeout_s)
        return _remote_backend(config, actors, info, _choose_transport(config, info), deferred=False)
    except Exception:
        for actor in actors:
            ray.kill(actor)
        raise


def named_actors(names: list[str]) -> list:
    import ray

    return [ray.get_actor(name) for name in names]


def attach_backend(config: EngineConfig, actors: list, info: list[dict] | None = None) -> ExpertBackend:
    """A backend over shard actors someone else (the controller) owns and has staged: actor calls,
    because a compiled graph would bind the shared actors to this one replica."""
    info = info if info is not None else shard_infos(actors, config.shard_timeout_s)
    return _remote_backend(config, actors, info, "actor", deferred=False, owned=False)


def prepare_next(config: EngineConfig, reader, current: ExpertBackend, old: Placement, new: Placement,
                 lost: set[int] = frozenset()) -> ExpertBackend:
    """The backend of epoch `new`, staged while `current` (epoch `old`) keeps serving."""
    if current.kind == "local":
        shards = [current.local_shards[i] if i < len(current.local_shards) and i not in lost
                  else ExpertShard(i, new.num_experts) for i in range(new.num_shards)]
        stage_local(current.local_shards, shards, reader, old, new, lost)
        return ExpertBackend(InProcessTransport(shards), "local", local_shards=shards)
    kept = [i for i in range(new.num_shards) if i < len(current.actors) and i not in lost]
    fresh_indices = [i for i in range(new.num_shards) if i not in kept]
    fresh = dict(zip(fresh_indices, start_shard_actors(config, fresh_indices, None, new.epoch)))
    actors = [current.actors[i] if i in kept else fresh[i] for i in range(new.num_shards)]
    try:
        stage_remote(current.actors, actors, old, new, config.shard_start_timeout_s, lost,
                     from_peers=config.expert_source == "peer")
        info = shard_infos(actors, config.shard_timeout_s)
    except Exception:
        import ray

        for actor in fresh.values():
            ray.kill(actor)
        raise
    # A compiled graph cannot take in actors that still belong to the serving graph: build it at commit.
    return _remote_backend(config, actors, info, current.kind, deferred=current.kind == "compiled_graph")
