"""The shards and the transport a replica's dispatcher talks to, and where they come from.

A backend serves one placement epoch. An `ExpertSource` makes the engine's first backend and the
backend of each later epoch (`for_epoch`), prepared while the current one serves: shards at the
same index are the same shards, so only the experts that move are loaded; shards beyond the old
count are started; removed ones stop when the old backend retires. The engine never starts, finds
or stops a shard process itself: it is handed a source. This module holds the in-process source
(shards are objects in the replica's own process, the fast single-machine default); sources over
shard actors are in remote_backend.py."""

from dataclasses import dataclass, field
from typing import Protocol

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.experts.expert_shard import ExpertShard
from moefleet.cluster.experts.transport import InProcessTransport
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement, round_robin_placement
from moefleet.cluster.placement.staging_plan import peer_sources


@dataclass
class ExpertBackend:
    placement: Placement  # the epoch this backend serves
    transport: object | None  # None until activate() for a compiled graph staged beside a live one
    kind: str  # "local", "actor" or "compiled_graph"
    local_shards: list[ExpertShard] = field(default_factory=list)
    shard_info: list[dict] = field(default_factory=list)  # per shard actor: its info() and whether it is on this node

    def threads_used_on_this_node(self) -> int:
        """torch threads that shard actors run beside this process."""
        return sum(info["threads"] for info in self.shard_info if info.get("local"))

    def activate(self) -> None:
        """Finish a backend whose transport could only be built once its predecessor let go of
        the shards (see remote_backend.RemoteBackend)."""

    def release_transport(self) -> None:
        """Free what the transport holds (a compiled graph's channels)."""

    def retire(self, successor: "ExpertBackend | None" = None, epoch: int | None = None) -> None:
        """After the switch to `successor` (epoch `epoch`): let the shards it keeps free the
        experts only older epochs used."""
        if successor is not None and epoch is not None:
            for shard in successor.local_shards:
                shard.retire_before(epoch)

    def close(self) -> None:
        self.retire()


class ExpertSource(Protocol):
    """Where a replica's routed experts live."""

    def first(self, config: EngineConfig, reader) -> ExpertBackend:
        """The backend the engine starts on (its `placement` is the first epoch)."""
        ...

    def for_epoch(self, config: EngineConfig, reader, record: EpochRecord, current: ExpertBackend,
                  lost: frozenset[int] = frozenset()) -> ExpertBackend:
        """The backend of `record`'s epoch, made while `current` keeps serving (any thread, one
        change at a time). Shards in `lost` failed: fresh ones take their indices and they are no
        source of experts."""
        ...


def uses_remote_shards(config: EngineConfig) -> bool:
    """Whether `config` asks for shard actors rather than shards in this process."""
    return config.engine_shards > 0 and config.transport != "local"


def initial_placement(config: EngineConfig, spec) -> Placement:
    """The round-robin placement an engine with its own shards starts on (spec: the model's ModelSpec)."""
    return round_robin_placement(spec.moe_layer_indices, spec.moe.num_experts, max(1, config.engine_shards),
                                 config.replicate_experts)


def stage_local(old_shards: list[ExpertShard], new_shards: list[ExpertShard], reader, old: Placement | None,
                new: Placement, lost: set[int] = frozenset()) -> None:
    """Stage `new` on in-process shards: a peer's expert is shared (same weight objects, no
    copy), the rest are read from the checkpoint."""
    for target, by_source in peer_sources(old, new, lost).items():
        for source, keys in by_source.items():
            for key in keys:
                new_shards[target].weights.setdefault(key, old_shards[source].weights[key])
    for target, shard in enumerate(new_shards):
        experts = new.experts_of_shard(target)
        shard.load_missing(reader, experts)
        shard.install_epoch(new.epoch, experts)


class InProcessExperts:
    """Shards as objects in this process: zero copy, no serialisation."""

    def first(self, config: EngineConfig, reader) -> ExpertBackend:
        placement = initial_placement(config, reader.spec)
        shards = [ExpertShard.from_checkpoint(i, reader, placement.experts_of_shard(i), placement.epoch)
                  for i in range(placement.num_shards)]
        return ExpertBackend(placement, InProcessTransport(shards), "local", local_shards=shards)

    def for_epoch(self, config: EngineConfig, reader, record: EpochRecord, current: ExpertBackend,
                  lost: frozenset[int] = frozenset()) -> ExpertBackend:
        new = record.placement
        shards = [current.local_shards[i] if i < len(current.local_shards) and i not in lost
                  else ExpertShard(i, new.num_experts) for i in range(new.num_shards)]
        stage_local(current.local_shards, shards, reader, current.placement, new, lost)
        return ExpertBackend(new, InProcessTransport(shards), "local", local_shards=shards)
