"""The controller's seam to the processes it runs: a shard group (the expert shards it owns) and a
replica group (the model replicas). Every call the controller makes to a shard or a replica goes
through one of these, so the controller is a plain class over plain data — names, replica ids,
placements, epoch records, stats — and runs the same over Ray actors (actors/ray_groups.py) and
over objects in this process (actors/local_groups.py, which its unit tests use).

Shards and replicas are found by name or id, never by handle: a restarted controller finds the
ones its predecessor started by the names in the state store's deployment record."""

from typing import TYPE_CHECKING, Protocol

from moefleet.cluster.messages import ReplicaState
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement

if TYPE_CHECKING:  # the engine's module imports torch; the seam needs only the name
    import numpy as np

    from moefleet.cluster.engine.routing_recorder import RecordedTokens


class ShardGroup(Protocol):
    def start(self, names: list[str], indices: list[int], placement: Placement | None) -> None:
        """Start a shard per name (names[n] serves shard index indices[n] and loads its experts
        of `placement`; None: an empty standby shard that a later epoch fills). Returns once
        every one answers; raises if one does not (and stops the ones it started)."""
        ...

    def attach(self, name: str) -> bool:
        """Find a shard an earlier controller started; False if there is none by that name."""
        ...

    def alive(self, names: list[str]) -> bool:
        """Whether every named shard answers."""
        ...

    def nodes(self, names: list[str]) -> list[str]:
        """The node each named shard runs on (as ReplicaState.node_id names nodes); raises if one
        does not answer."""
        ...

    def stage(self, old_names: list[str], new_names: list[str], old: Placement | None, new: Placement,
              lost: set[int], from_peers: bool, pace_s: float) -> list[dict]:
        """Make epoch `new` ready on the shards it restages (new_names[i] serves index i; the
        current epoch, old_names/old, serves meanwhile): each gets the experts it lacks from a
        peer of the old epoch that holds them when `from_peers` (never from a `lost` one), else
        from the checkpoint. With pace_s > 0 the shards are staged one after another. Returns
        each staged shard's report: {"shard", "epoch", "from_checkpoint", "from_peers", "seconds"}."""
        ...

    def retire_before(self, names: list[str], epoch: int, pace_s: float) -> None:
        """Let the named shards free the slot maps and experts only epochs before `epoch` use."""
        ...

    def stop(self, names: list[str]) -> None:
        """Stop the named shards (unknown or dead ones are skipped)."""
        ...


class ReplicaGroup(Protocol):
    def start(self, replica_ids: list[str], record: EpochRecord) -> None:
        """Start a replica per id and return once every one is ready (model loaded, engine
        running). With `record.shards` they reach the controller's shards and report a lost one
        to the controller; without, each keeps its experts in its own process."""
        ...

    def attach(self, replica_id: str) -> bool:
        """Find a replica an earlier controller started; False if there is none by that id."""
        ...

    def handle(self, replica_id: str) -> object:
        """What a gateway calls the replica through (a Ray actor handle, or the Replica object in
        this process). The controller hands it out and never calls it itself."""
        ...

    def install(self, replica_ids: list[str], record: EpochRecord, wait: bool) -> dict[str, int | str]:
        """Send the committed epoch to the replicas (each switches at its next step boundary).
        With `wait`, each one's acknowledgement: the epoch it now serves, or "failed: <error>";
        without, {} at once."""
        ...

    def stats(self, replica_id: str) -> ReplicaState:
        """Raises when the replica is gone or does not answer."""
        ...

    def load_window(self, replica_id: str) -> list[list[int]]:
        """Tokens per expert per MoE layer over the replica's load window. Raises like stats."""
        ...

    def arrived_prompts(self, replica_id: str) -> "tuple[np.ndarray, int]":
        """(int64[N] prompt tokens, requests) the replica admitted since the last call."""
        ...

    def record_routing(self, replica_id: str, sample_rate: float) -> None:
        """Let the replica sample `sample_rate` of its tokens' routing from its next step on."""
        ...

    def routing_sample(self, replica_id: str) -> "list[RecordedTokens]":
        """The routing the replica's recorder sampled since the last call (taken: each token is
        handed out once). Raises like stats."""
        ...

    def drain(self, replica_id: str) -> None:
        """The replica takes no new requests; those in flight finish."""
        ...

    def shutdown(self, replica_id: str) -> None:
        """Stop the replica (its engine and process)."""
        ...
