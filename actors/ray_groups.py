"""The controller's shard and replica groups over Ray actors (the seam is cluster/control/groups.py).
Shards and replicas are named, detached actors: they outlive the controller, and a restarted one
finds them again by name. Handles stay in here; the controller sees names and ids."""

import ray

from moefleet.actors.replica import ControllerShardReport, remote_replica_class
from moefleet.actors.shard_host import start_shard_actors
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.experts.remote_backend import ControllerShards
from moefleet.cluster.experts.staging import paced, stage_remote
from moefleet.cluster.experts.wire import control
from moefleet.cluster.messages import ReplicaState
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement

ALIVE_TIMEOUT_S = 10.0  # how long a shard or replica may take to answer before it counts as gone
RETIRE_TIMEOUT_S = 30.0


class RayShardGroup:
    def __init__(self, engine: EngineConfig):
        self.engine = engine
        self._actors: dict[str, object] = {}  # name -> actor handle

    def start(self, names: list[str], indices: list[int], placement: Placement | None) -> None:
        if not names:
            return
        epoch = placement.epoch if placement is not None else 0
        actors = start_shard_actors(self.engine, indices, placement, epoch, names=names)
        try:
            ray.get([control(a, "info").remote() for a in actors], timeout=self.engine.shard_start_timeout_s)
        except Exception:
            for actor in actors:
                ray.kill(actor)
            raise
        self._actors.update(zip(names, actors))

    def attach(self, name: str) -> bool:
        try:
            self._actors[name] = ray.get_actor(name)
        except ValueError:
            return False
        return True

    def alive(self, names: list[str]) -> bool:
        try:
            ray.get([control(self._actors[name], "info").remote() for name in names], timeout=ALIVE_TIMEOUT_S)
        except Exception:
            return False
        return True

    def nodes(self, names: list[str]) -> list[str]:
        infos = ray.get([control(self._actors[name], "info").remote() for name in names], timeout=ALIVE_TIMEOUT_S)
        return [info["node_id"] for info in infos]

    def stage(self, old_names: list[str], new_names: list[str], old: Placement | None, new: Placement,
              lost: set[int], from_peers: bool, pace_s: float) -> list[dict]:
        old_actors = [self._actors.get(name) for name in old_names]  # a lost one may have no handle
        return stage_remote(old_actors, [self._actors[name] for name in new_names], old, new,
                            self.engine.shard_start_timeout_s, lost, from_peers, pace_s)

    def retire_before(self, names: list[str], epoch: int, pace_s: float) -> None:
        paced(lambda a: control(a, "retire_before").remote(epoch), [self._actors[name] for name in names], pace_s,
              RETIRE_TIMEOUT_S)

    def stop(self, names: list[str]) -> None:
        for name in names:
            actor = self._actors.pop(name, None)
            if actor is not None:
                ray.kill(actor)


class RayReplicaGroup:
    """Replica actors; with the controller's shards, each reports a lost shard to the controller
    by its actor name (`controller_name`), whichever incarnation of it runs then."""

    def __init__(self, config: ControllerConfig, controller_name: str):
        self.config, self.controller_name = config, controller_name
        self._actors: dict[str, object] = {}  # replica id -> actor handle

    def start(self, replica_ids: list[str], record: EpochRecord) -> None:
        engine = self.config.engine
        experts = ControllerShards(record) if record.shards else None
        on_shard_lost = ControllerShardReport(self.controller_name, engine.shard_start_timeout_s) if record.shards else None
        cls = remote_replica_class()
        started = {rid: cls.options(**self._options(rid)).remote(
            rid, engine, self.config.max_waiting, self.config.model_id, experts, on_shard_lost) for rid in replica_ids}
        ray.get([actor.ready.remote() for actor in started.values()])  # model loaded, engine loop running
        self._actors.update(started)

    def _options(self, replica_id: str) -> dict:
        options = {"name": _actor_name(replica_id), "lifetime": "detached", "num_cpus": 0}
        resources = self.config.replica_resources
        if resources:  # cycled by the replica's number, which is never reused
            options["resources"] = resources[int(replica_id.rsplit("-", 1)[-1]) % len(resources)]
        return options

    def attach(self, replica_id: str) -> bool:
        try:
            self._actors[replica_id] = ray.get_actor(_actor_name(replica_id))
        except ValueError:
            return False
        return True

    def handle(self, replica_id: str) -> object:
        return self._actors[replica_id]

    def install(self, replica_ids: list[str], record: EpochRecord, wait: bool) -> dict[str, int | str]:
        # A replica retired since the caller listed the ids (the monitor retires without the control
        # lock's help for its actor) has nothing to install: skipped, as the local group skips it.
        refs = {rid: actor.install_epoch.remote(record) for rid in replica_ids
                if (actor := self._actors.get(rid)) is not None}
        if not wait:
            return {}
        acks = {}
        for rid, ref in refs.items():
            try:
                acks[rid] = ray.get(ref, timeout=self.config.ack_timeout_s)
            except Exception as e:  # a lost replica is the monitor's to handle
                acks[rid] = f"failed: {type(e).__name__}"
        return acks

    def stats(self, replica_id: str) -> ReplicaState:
        return ray.get(self._actors[replica_id].stats.remote(), timeout=ALIVE_TIMEOUT_S)

    def load_window(self, replica_id: str) -> list[list[int]]:
        return ray.get(self._actors[replica_id].load_window.remote(), timeout=5)

    def arrived_prompts(self, replica_id: str) -> tuple:
        return ray.get(self._actors[replica_id].arrived_prompts.remote(), timeout=5)

    def record_routing(self, replica_id: str, sample_rate: float) -> None:
        ray.get(self._actors[replica_id].record_routing.remote(sample_rate), timeout=ALIVE_TIMEOUT_S)

    def routing_sample(self, replica_id: str) -> list:
        return ray.get(self._actors[replica_id].routing_sample.remote(), timeout=5)

    def drain(self, replica_id: str) -> None:
        ray.get(self._actors[replica_id].drain.remote(), timeout=30)

    def shutdown(self, replica_id: str) -> None:
        actor = self._actors.pop(replica_id, None)
        if actor is None:
            return
        try:
            ray.get(actor.shutdown.remote(), timeout=30)
        except Exception:  # already gone, or stuck: killed either way
            pass
        ray.kill(actor)


def _actor_name(replica_id: str) -> str:
    return f"moefleet-{replica_id}"
