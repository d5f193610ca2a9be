"""Expert sources over shard actors on a Ray cluster, reached by actor calls or a compiled graph
("auto" takes the compiled graph when every shard shares this node).

Two owners: `OwnedShardActors` — a replica that starts (through the launcher it is given) and
stops its own shard actors; `ControllerShards` — shards the controller owns and has already
staged, found by actor name, which this replica only attaches to and never stops."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.experts.backend import ExpertBackend, initial_placement
from moefleet.cluster.experts.ray_transport import ActorTransport, CompiledGraphTransport
from moefleet.cluster.experts.staging import stage_remote
from moefleet.cluster.experts.wire import control
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement

log = logging.getLogger(__name__)

# launch(config, indices, placement or None, epoch) -> shard actors for those indices (see
# actors/shard_host.start_shard_actors), each loading its experts of the placement (none if None).
ShardLauncher = Callable[[EngineConfig, list[int], Placement | None, int], list]


@dataclass
class RemoteBackend(ExpertBackend):
    actors: list = field(default_factory=list)
    owned: bool = True  # stop the actors when retired
    timeout_s: float = 30.0
    _released: bool = False

    def activate(self) -> None:
        """Build a deferred compiled graph (Ray lets an actor belong to one graph at a time, so
        the next epoch's graph is compiled only after the old one was torn down)."""
        if self.transport is None:
            self.transport = CompiledGraphTransport(self.actors, self.timeout_s, [i["local"] for i in self.shard_info])

    def release_transport(self) -> None:
        if self.transport is not None and hasattr(self.transport, "close") and not self._released:
            self._released = True
            self.transport.close()

    def retire(self, successor: ExpertBackend | None = None, epoch: int | None = None) -> None:
        """After the switch to `successor` (epoch `epoch`): stop owned actors it does not keep
        and let the kept ones free the experts only older epochs used."""
        self.release_transport()
        if not self.actors or not self.owned:
            return
        kept = set(map(id, getattr(successor, "actors", [])))
        for actor in self.actors:
            if id(actor) not in kept:
                ray.kill(actor)
        if successor is not None and epoch is not None:
            try:
                ray.get([control(a, "retire_before").remote(epoch) for a in successor.actors], timeout=self.timeout_s)
            except Exception as e:  # a shard lost meanwhile is recovered elsewhere; freeing is best effort
                log.warning("retiring epochs before %s: %s", epoch, e)
        self.actors = []


def shard_infos(actors: list, timeout_s: float) -> list[dict]:
    """Each actor's info plus whether it shares this process's node."""
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


def _remote_backend(config: EngineConfig, placement: Placement, actors: list, info: list[dict], kind: str,
                    deferred: bool, owned: bool = True) -> RemoteBackend:
    local = [i["local"] for i in info]
    common = dict(shard_info=info, actors=actors, owned=owned, timeout_s=config.shard_timeout_s)
    if kind == "compiled_graph":
        if deferred:
            return RemoteBackend(placement, None, kind, **common)
        try:
            return RemoteBackend(placement, CompiledGraphTransport(actors, config.shard_timeout_s, local), kind, **common)
        except Exception as e:
            if config.transport == "compiled_graph":
                raise
            log.warning("compiled graph unavailable (%s); using actor calls", e)
    return RemoteBackend(placement, ActorTransport(actors, config.shard_timeout_s, local), "actor", **common)


class OwnedShardActors:
    """Shard actors this replica starts with `launch` and stops when they leave its placement."""

    def __init__(self, launch: ShardLauncher):
        self.launch = launch

    def first(self, config: EngineConfig, reader) -> RemoteBackend:
        placement = initial_placement(config, reader.spec)
        actors = self.launch(config, list(range(placement.num_shards)), placement, placement.epoch)
        try:
            info = shard_infos(actors, config.shard_start_timeout_s)
            return _remote_backend(config, placement, actors, info, _choose_transport(config, info), deferred=False)
        except Exception:
            for actor in actors:
                ray.kill(actor)
            raise

    def for_epoch(self, config: EngineConfig, reader, record: EpochRecord, current: RemoteBackend,
                  lost: frozenset[int] = frozenset()) -> RemoteBackend:
        new = record.placement
        kept = [i for i in range(new.num_shards) if i < len(current.actors) and i not in lost]
        fresh_indices = [i for i in range(new.num_shards) if i not in kept]
        fresh = dict(zip(fresh_indices, self.launch(config, fresh_indices, None, new.epoch)))
        actors = [current.actors[i] if i in kept else fresh[i] for i in range(new.num_shards)]
        try:
            stage_remote(current.actors, actors, current.placement, new, config.shard_start_timeout_s, lost,
                         from_peers=config.expert_source == "peer")
            info = shard_infos(actors, config.shard_timeout_s)
        except Exception:
            for actor in fresh.values():
                ray.kill(actor)
            raise
        # A compiled graph cannot take in actors that still belong to the serving graph: build it at commit.
        return _remote_backend(config, new, actors, info, current.kind, deferred=current.kind == "compiled_graph")


class ControllerShards:
    """Shard actors the controller owns and stages, found by name. Actor calls, never a compiled
    graph: a graph would bind the shared actors to this one replica."""

    def __init__(self, record: EpochRecord):
        self.record = record
        self._known: dict[str, tuple] = {}  # actor name -> (handle, info): an epoch switch looks up only new shards

    def first(self, config: EngineConfig, reader) -> RemoteBackend:
        return self._attach(config, self.record)

    def for_epoch(self, config: EngineConfig, reader, record: EpochRecord, current: RemoteBackend,
                  lost: frozenset[int] = frozenset()) -> RemoteBackend:
        return self._attach(config, record)

    def _attach(self, config: EngineConfig, record: EpochRecord) -> RemoteBackend:
        new = [n for n in record.shards if n not in self._known]
        if new:
            actors = [ray.get_actor(name) for name in new]
            self._known.update(zip(new, zip(actors, shard_infos(actors, config.shard_timeout_s))))
        self._known = {n: self._known[n] for n in record.shards}
        actors, info = zip(*(self._known[n] for n in record.shards))
        return _remote_backend(config, record.placement, list(actors), list(info), "actor", deferred=False, owned=False)
