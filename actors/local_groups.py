"""The controller's shard and replica groups in this process (the seam is
cluster/control/groups.py): the same plain classes the Ray shells wrap — ExpertShardHost for a
shard, Replica for a replica — as objects, with no Ray. The controller's unit tests run on these,
and they serve a deployment that fits in one process.

Replicas reach the shards through an in-process transport over the hosts' ExpertShard objects
(zero copy); a shard whose host was stopped fails like a dead shard actor, so a replica reports
it and the controller replaces it, as on Ray."""

import asyncio
import threading
import time
from dataclasses import replace

import torch

from moefleet.actors.replica import Replica
from moefleet.actors.shard_host import ExpertShardHost
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.control.controller import Controller
from moefleet.cluster.control.state_store import StateStore
from moefleet.cluster.errors import ShardUnavailableError
from moefleet.cluster.experts.backend import ExpertBackend
from moefleet.cluster.experts.transport import InProcessTransport, ShardWork
from moefleet.cluster.messages import ReplicaState
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.staging_plan import peer_sources


class LocalShardGroup:
    """`virtual_nodes`: node ids to report, shard index i on virtual_nodes[i % n] (tests of locality
    on one machine); default: every shard on "local", with its replicas."""

    def __init__(self, engine: EngineConfig, virtual_nodes: list[str] | None = None):
        self.engine, self.virtual_nodes = engine, virtual_nodes
        self.hosts: dict[str, ExpertShardHost] = {}  # name -> host

    def start(self, names: list[str], indices: list[int], placement: Placement | None) -> None:
        epoch = placement.epoch if placement is not None else 0
        for name, index in zip(names, indices):
            experts = placement.experts_of_shard(index) if placement is not None else {}
            # A host sizes its process's torch thread pool; here the process and its pool are the
            # replicas' too, so it keeps the size it has. Staging at idle priority would move the
            # calling thread (the controller's, or a replica's engine thread reporting a lost shard)
            # into the idle class for good.
            self.hosts[name] = ExpertShardHost(index, self.engine.model, self.engine.dtype, experts,
                                               torch.get_num_threads(), epoch, staging_when_idle=False,
                                               malloc_keep_mib=self.engine.malloc_keep_mib)

    def attach(self, name: str) -> bool:
        return name in self.hosts

    def alive(self, names: list[str]) -> bool:
        return all(name in self.hosts for name in names)

    def nodes(self, names: list[str]) -> list[str]:
        if not self.virtual_nodes:
            return ["local" for _ in names]  # every host lives in this process, as its replicas do
        return [self.virtual_nodes[self.hosts[name].shard_id % len(self.virtual_nodes)] for name in names]

    def stage(self, old_names: list[str], new_names: list[str], old: Placement | None, new: Placement,
              lost: set[int], from_peers: bool, pace_s: float) -> list[dict]:
        sources = peer_sources(old, new, lost) if from_peers else {}
        reports = []
        for n, target in enumerate(new.restaged_shards()):
            if n:
                time.sleep(pace_s)
            exports = [self.hosts[old_names[source]].export(keys) for source, keys in sources.get(target, {}).items()]
            reports.append(self.hosts[new_names[target]].stage(new.epoch, new.experts_of_shard(target), *exports))
        return reports

    def retire_before(self, names: list[str], epoch: int, pace_s: float) -> None:
        for n, name in enumerate(names):
            if n:
                time.sleep(pace_s)
            self.hosts[name].retire_before(epoch)

    def stop(self, names: list[str]) -> None:
        for name in names:
            self.hosts.pop(name, None)


class HostedShardsTransport(InProcessTransport):
    """The in-process transport over a shard group's hosts, named per shard index; a send to a
    shard whose host was stopped raises ShardUnavailableError naming it (as an actor call to a
    dead shard does)."""

    def __init__(self, group: LocalShardGroup, names: tuple[str, ...]):
        super().__init__([group.hosts[name].shard for name in names])
        self.group, self.names = group, names

    def send(self, work: list[ShardWork]) -> list[torch.Tensor]:
        for w in work:
            if not self.group.alive([self.names[w.shard]]):
                raise ShardUnavailableError(w.shard, f"shard {self.names[w.shard]} was stopped")
        return super().send(work)


class GroupShards:
    """An ExpertSource (cluster/experts/backend.py) over the controller's shards in this process:
    each epoch's backend reaches the shards its record names, already staged by the controller.
    The backend lists no local shards, so a replica never retires the shared shards' epochs: the
    controller does, once every replica has switched."""

    def __init__(self, group: LocalShardGroup, record: EpochRecord):
        self.group, self.record = group, record

    def first(self, config: EngineConfig, reader) -> ExpertBackend:
        return self._backend(self.record)

    def for_epoch(self, config: EngineConfig, reader, record: EpochRecord, current: ExpertBackend,
                  lost: frozenset[int] = frozenset()) -> ExpertBackend:
        return self._backend(record)

    def _backend(self, record: EpochRecord) -> ExpertBackend:
        # The shards run on the replica's own threads: they take no cores of their own.
        info = [{"shard": i, "node_id": "local", "nbytes": self.group.hosts[name].shard.nbytes(), "threads": 0,
                 "local": True} for i, name in enumerate(record.shards)]
        return ExpertBackend(record.placement, HostedShardsTransport(self.group, record.shards), "local",
                             shard_info=info)


class LocalReplicaGroup:
    """Replica objects in this process. Their blocking calls (install) run an event loop of their
    own: call them from a thread without one, as the controller's methods are."""

    def __init__(self, config: ControllerConfig, shards: LocalShardGroup):
        self.config, self.shards = config, shards
        self.replicas: dict[str, Replica] = {}
        # The controller replicas report lost shards to: whichever runs over this group now (on
        # Ray, replicas find the controller by its actor name for the same reason).
        self.controller: Controller | None = None

    def start(self, replica_ids: list[str], record: EpochRecord) -> None:
        for rid in replica_ids:
            experts = GroupShards(self.shards, record) if record.shards else None
            on_shard_lost = self._report_shard_lost if record.shards else None
            self.replicas[rid] = Replica(rid, self.config.engine, self.config.max_waiting, self.config.model_id,
                                         experts, on_shard_lost)

    def _report_shard_lost(self, index: int | None, seen_epoch: int) -> EpochRecord:
        return self.controller.shard_lost(index, seen_epoch)

    def attach(self, replica_id: str) -> bool:
        return replica_id in self.replicas

    def handle(self, replica_id: str) -> Replica:
        return self.replicas[replica_id]

    def install(self, replica_ids: list[str], record: EpochRecord, wait: bool) -> dict[str, int | str]:
        targets = {rid: self.replicas[rid] for rid in replica_ids if rid in self.replicas}

        async def one(replica: Replica) -> int | str:
            try:
                return await asyncio.wait_for(replica.install_epoch(record), self.config.ack_timeout_s)
            except Exception as e:  # a lost replica is the monitor's to handle
                return f"failed: {type(e).__name__}"

        async def every() -> dict[str, int | str]:
            acks = await asyncio.gather(*(one(replica) for replica in targets.values()))
            return dict(zip(targets, acks))

        if not wait:
            threading.Thread(target=asyncio.run, args=(every(),), daemon=True).start()
            return {}
        return asyncio.run(every())

    def stats(self, replica_id: str) -> ReplicaState:
        state = self._replica(replica_id).stats()
        nodes = self.shards.virtual_nodes  # replica-n on the node of shard n, the shards' numbering
        return replace(state, node_id=nodes[int(replica_id.rsplit("-", 1)[-1]) % len(nodes)]) if nodes else state

    def load_window(self, replica_id: str) -> list[list[int]]:
        return self._replica(replica_id).load_window()

    def arrived_prompts(self, replica_id: str) -> tuple:
        return self._replica(replica_id).arrived_prompts()

    def record_routing(self, replica_id: str, sample_rate: float) -> None:
        self._replica(replica_id).record_routing(sample_rate)

    def routing_sample(self, replica_id: str) -> list:
        return self._replica(replica_id).routing_sample()

    def drain(self, replica_id: str) -> None:
        self._replica(replica_id).drain()

    def shutdown(self, replica_id: str) -> None:
        replica = self.replicas.pop(replica_id, None)
        if replica is not None:
            replica.shutdown()

    def _replica(self, replica_id: str) -> Replica:
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise LookupError(f"replica {replica_id} is gone")
        return replica


def local_controller(config: ControllerConfig, store: StateStore, shards: LocalShardGroup | None = None,
                     replicas: LocalReplicaGroup | None = None) -> Controller:
    """A controller whose shards and replicas are objects in this process. Given the groups of an
    earlier controller (and its store), it is that controller restarted: it recovers from the
    store and takes the groups over."""
    shards = shards or LocalShardGroup(config.engine)
    replicas = replicas or LocalReplicaGroup(config, shards)
    controller = Controller(config, shards, replicas, store)
    replicas.controller = controller
    return controller
