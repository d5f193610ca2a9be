"""Controller: owns membership (replicas, shards) and the versioned placement, and changes them
while serving by the epoch protocol: plan -> stage on the shards while the current epoch serves
-> commit (compare-and-set in the state store, then every replica switches between two steps)
-> retire (after every replica acknowledged: old slots freed, removed shards stopped).

A plain class; actors/controller_host.py applies the Ray shell (a named actor that Ray restarts
when it dies). All it needs to carry on lives in the state store: a restarted controller reads
the committed epoch and the actor names of the deployment, re-attaches to the (detached) shard
and replica actors, replaces the ones that died meanwhile and goes on. Replicas do not need the
controller to serve: they keep the last committed epoch while it is away or the store is down.

With `expert_shards` = 0 the replicas keep their experts in process and placement changes run
on each replica (Replica.scale_shards / rebalance); with N > 0 the controller owns N shard actors
that every replica reaches by actor calls."""

import functools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import replace

import numpy as np

from moefleet.autoscaler.rebalance_rule import rebalance_due
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.control.state_store import store_from_url
from moefleet.cluster.errors import ControlUnavailableError, InvalidRequestError
from moefleet.cluster.experts.staging import paced, stage_remote
from moefleet.cluster.experts.wire import control
from moefleet.cluster.placement.placement import Placement, placement_to_dict, round_robin_placement
from moefleet.cluster.placement.planner import imbalance, plan_placement, scale_limits
from moefleet.cluster.placement.staging_plan import layout_epochs

log = logging.getLogger(__name__)

CONTROLLER_NAME = "moefleet-controller"
DEPLOYMENT = "deployment"  # the state-store record naming the deployment's actors


def _store_errors() -> tuple[type, ...]:
    kinds: list[type] = [ConnectionError, TimeoutError, OSError]
    try:
        import redis

        kinds.append(redis.exceptions.RedisError)
    except ImportError:
        pass
    return tuple(kinds)


class Controller:
    def __init__(self, config: dict):
        self.config = ControllerConfig(**config)
        self.engine_config = EngineConfig(**self.config.engine)
        self.store = store_from_url(self.config.state_store, self.config.store_prefix)
        self.lock = threading.RLock()  # one control change at a time
        self._refill_lock = threading.Lock()  # one standby refill at a time
        self.placement: Placement | None = None
        self.generation = 0
        self.shards: list = []
        self.shard_names: list[str] = []
        self.standby: list[tuple[str, object]] = []
        self._replicas: dict[str, object] = {}
        self.draining: set[str] = set()
        self.target_replicas = 0
        self.next_replica = 0  # replica ids are never reused, across controller restarts too
        self.samples: deque[tuple[float, float]] = deque(maxlen=10_000)
        self.last_change_at: float | None = None
        self.store_error: str | None = None
        self.events: deque[str] = deque(maxlen=200)
        self._stopped = threading.Event()
        self.incarnation = uuid.uuid4().hex[:8]  # tells a restarted controller from the one before
        self.recovered = self._recover()
        self._monitor = threading.Thread(target=self._monitor_forever, name="moefleet-controller", daemon=True)
        self._monitor.start()

    # ----- state store -----
    def _store(self, fn, *args, wait_s: float | None = None):
        """Call the store, retrying while it is unreachable for up to `wait_s`; then a clear error."""
        deadline = time.monotonic() + (self.config.store_wait_s if wait_s is None else wait_s)
        while True:
            try:
                result = fn(*args)
                self.store_error = None
                return result
            except _store_errors() as e:
                self.store_error = f"state store unreachable: {type(e).__name__}: {e}"[:300]
                if time.monotonic() >= deadline:
                    epoch = self.placement.epoch if self.placement else None
                    raise ControlUnavailableError(f"{self.store_error}; control changes wait until it is back "
                                                  f"(serving continues on epoch {epoch})") from None
                time.sleep(0.2)

    def _save_deployment(self) -> None:
        self._store(self.store.put_record, DEPLOYMENT, {
            "shards": self.shard_names, "replicas": sorted(self._replicas), "draining": sorted(self.draining),
            "target_replicas": self.target_replicas, "standby": [name for name, _ in self.standby],
            "next_replica": self.next_replica})

    def _log(self, action: str, **details) -> None:
        record = {"at": time.time(), "action": action, **details}
        self.events.appendleft(f"{action} {details}")
        log.info("controller: %s %s", action, details)
        try:
            self._store(self.store.log_decision, record, wait_s=0)
        except ControlUnavailableError:
            pass  # the decision log is best effort; the change itself was committed or refused

    # ----- recovery -----
    def _recover(self) -> bool:
        """Carry on from the store's record, if any: re-attach to the named actors and replace the
        ones that died while no controller was watching."""
        import ray

        record = self._store(self.store.get_record, DEPLOYMENT)
        generation, placement = self._store(self.store.epoch)
        if record is None:
            return False
        self.generation, self.placement = generation, placement
        self.target_replicas = record.get("target_replicas", 0)
        self.next_replica = record.get("next_replica", 0)
        self.draining = set(record.get("draining", []))
        for rid in record.get("replicas", []):
            try:
                self._replicas[rid] = ray.get_actor(_replica_actor_name(rid))
            except ValueError:
                self._log("replica-gone-at-recovery", replica=rid)
        self.shard_names = list(record.get("shards", []))
        for name in record.get("standby", []):
            try:
                self.standby.append((name, ray.get_actor(name)))
            except ValueError:
                pass
        lost = set()
        for i, name in enumerate(self.shard_names):
            try:
                actor = ray.get_actor(name)
                ray.get(control(actor, "info").remote(), timeout=10)
            except Exception:
                actor = None
                lost.add(i)
            self.shards.append(actor)
        self._log("recovered", epoch=placement.epoch if placement else None, replicas=sorted(self._replicas),
                  shards=len(self.shard_names), lost_shards=sorted(lost))
        if lost and placement is not None:
            self._replace_shards(lost)
        elif placement is not None:  # a replica may have missed the last commit while we were away
            self._install_everywhere(self._epoch_record(), wait=False)
        return True

    # ----- start and membership -----
    def start(self, replicas: int) -> list[str]:
        """First start (no-op for what a recovered controller already has): shards, then replicas."""
        with self.lock:
            if self.config.expert_shards and self.placement is None:
                spec_layers, num_experts = self._model_shape()
                placement = round_robin_placement(spec_layers, num_experts, self.config.expert_shards)
                names = [_new_shard_name() for _ in range(placement.num_shards)]
                actors = self._start_shards(names, range(placement.num_shards), placement)
                self._commit(placement, actors, names)
            self.target_replicas = max(self.target_replicas, replicas)
            missing = replicas - len([r for r in self._replicas if r not in self.draining])
            started = self._start_replicas(missing) if missing > 0 else []
            self._save_deployment()
        if self.config.expert_shards:
            self._refill_standby()
        return started

    @functools.cache
    def _model_shape(self) -> tuple[list[int], int]:
        from moefleet.models.spec import load_spec

        spec = load_spec(self.engine_config.model)
        return spec.moe_layer_indices, spec.moe.num_experts

    def _take_shards(self, count: int, first_index: int) -> tuple[list[str], list]:
        """`count` empty shard actors: standby ones first, fresh ones for the rest."""
        taken, self.standby = self.standby[:count], self.standby[count:]
        names = [n for n, _ in taken] + [_new_shard_name() for _ in range(count - len(taken))]
        fresh = self._start_shards(names[len(taken):], range(first_index + len(taken), first_index + count), None)
        return names, [a for _, a in taken] + fresh

    def _refill_standby_later(self) -> None:
        """Start the standby shards used up, in the background: after the change, not during it
        (a process start competes for the cores the serving epoch uses)."""
        if len(self.standby) < self.config.standby_shards:
            threading.Thread(target=self._refill_standby, daemon=True).start()

    def _refill_standby(self) -> None:
        """Start standby shards up to the configured count. The starts (seconds each) run outside
        the lock, so control changes do not wait for them."""
        with self._refill_lock:
            missing = self.config.standby_shards - len(self.standby)
            if missing <= 0:
                return
            names = [_new_shard_name() for _ in range(missing)]
            started = list(zip(names, self._start_shards(names, range(missing), None)))
            with self.lock:
                self.standby += started
                try:
                    self._save_deployment()
                except ControlUnavailableError:
                    pass

    def _start_shards(self, names: list[str], indices, placement: Placement | None) -> list:
        from moefleet.cluster.experts.backend import start_shard_actors

        epoch = placement.epoch if placement is not None else 0
        import ray

        actors = start_shard_actors(self.engine_config, list(indices), placement, epoch, names=names)
        ray.get([control(a, "info").remote() for a in actors], timeout=self.engine_config.shard_start_timeout_s)
        return actors

    def _replica_options(self) -> dict:
        options = dict(self.config.engine)
        if self.config.expert_shards:
            options.update(attach_shards=list(self.shard_names), attach_placement=placement_to_dict(self.placement),
                           controller=CONTROLLER_NAME)
        return options

    def _start_replicas(self, count: int) -> list[str]:
        import ray

        from moefleet.actors.replica import remote_replica_class

        cls = remote_replica_class()
        started = []
        for _ in range(count):
            rid = f"replica-{self.next_replica}"
            self.next_replica += 1
            actor = cls.options(name=_replica_actor_name(rid), lifetime="detached", num_cpus=0).remote(
                rid, self._replica_options(), self.config.max_waiting, self.config.model_id)
            started.append((rid, actor))
        ray.get([a.ready.remote() for _, a in started])  # model loaded, engine loop running
        self._replicas.update(started)
        # A replica that started on an older epoch than the one committed meanwhile catches up.
        if self.config.expert_shards:
            record = self._epoch_record()
            ray.get([a.install_epoch.remote(record) for _, a in started], timeout=self.config.ack_timeout_s)
        self._log("replicas-started", replicas=[rid for rid, _ in started])
        return [rid for rid, _ in started]

    def replicas(self) -> list[tuple[str, object, bool]]:
        """(replica id, actor, draining) for gateways."""
        return [(rid, actor, rid in self.draining) for rid, actor in list(self._replicas.items())]

    def scale_replicas(self, count: int) -> str:
        if not isinstance(count, int) or count < 1:
            raise InvalidRequestError("replicas", f"must be an integer >= 1, got {count!r}")
        with self.lock:
            serving = [rid for rid in self._replicas if rid not in self.draining]
            self.target_replicas = count
            if count > len(serving):
                added = self._start_replicas(count - len(serving))
                self._save_deployment()
                return f"started {', '.join(added)}"
            victims = serving[count:]
            for rid in victims:
                self._drain(rid)
            self._save_deployment()
        return f"draining {', '.join(victims)}; they stop when their requests finish" if victims else \
            f"already {count} serving replicas"

    def add_replica(self) -> str:
        with self.lock:
            rid = self._start_replicas(1)[0]
            self.target_replicas += 1
            self._save_deployment()
            return rid

    def drain_replica(self, replica_id: str) -> str:
        with self.lock:
            if replica_id not in self._replicas:
                raise InvalidRequestError("replica_id", f"no replica {replica_id!r}; replicas: {sorted(self._replicas)}")
            self._drain(replica_id)
            self.target_replicas = max(0, self.target_replicas - 1)
            self._save_deployment()
            return f"draining {replica_id}"

    def mark_draining(self, replica_id: str) -> None:  # the gateway's Drain admin call
        self.drain_replica(replica_id)

    def _drain(self, rid: str) -> None:
        import ray

        self.draining.add(rid)
        ray.get(self._replicas[rid].drain.remote(), timeout=30)
        self._log("replica-draining", replica=rid)

    # ----- placement changes -----
    def _epoch_record(self) -> dict:
        return {"placement": placement_to_dict(self.placement), "shards": list(self.shard_names)}

    def _commit(self, placement: Placement, actors: list, names: list[str]) -> None:
        """Compare-and-set the epoch in the store, then adopt it here."""
        if not self._store(self.store.commit_epoch, self.generation, placement):
            self._reseed_lost_store()
            if not self._store(self.store.commit_epoch, self.generation, placement):
                raise ControlUnavailableError("another controller committed an epoch meanwhile; this one stands down")
        self.generation += 1
        self.placement, self.shards, self.shard_names = placement, list(actors), list(names)
        self._save_deployment()
        self.last_change_at = time.monotonic()

    def _reseed_lost_store(self) -> None:
        """A store that came back empty (a Redis restarted without persistence) holds nothing to
        conflict with: write this controller's committed state into it again."""
        generation, placement = self._store(self.store.epoch)
        if generation != 0 or placement is not None or self.placement is None:
            return  # someone else's commit: a real conflict
        if self._store(self.store.commit_epoch, 0, self.placement):
            self.generation = 1
            self._save_deployment()
            self._log("store-reseeded", epoch=self.placement.epoch)

    def _install_everywhere(self, record: dict, wait: bool) -> dict:
        """Push the epoch to every replica; with wait, block until each acknowledged (or failed)."""
        import ray

        refs = {rid: a.install_epoch.remote(record) for rid, a in self._replicas.items()}
        if not wait:
            return {}
        acks = {}
        for rid, ref in refs.items():
            try:
                acks[rid] = ray.get(ref, timeout=self.config.ack_timeout_s)
            except Exception as e:  # a lost replica is the monitor's to handle
                acks[rid] = f"failed: {type(e).__name__}"
        return acks

    def _change(self, placement: Placement, actors: list, names: list[str], lost: set[int] = frozenset(),
                reason: str = ""):
        """Stage and commit (call with the lock held). Returns (summary, finish): finish() switches
        the replicas, waits for their acknowledgements and retires the old epoch; call it without
        the lock, because a replica whose engine thread waits in `shard_lost` for the lock cannot
        acknowledge meanwhile."""
        import ray

        old_actors, old_names, old_placement = self.shards, self.shard_names, self.placement
        placement = replace(placement, shard_epochs=layout_epochs(old_placement, old_names, placement, names, lost))
        restaged = [actors[s] for s in placement.restaged_shards()]
        started = time.monotonic()
        try:
            reports = stage_remote(old_actors, actors, old_placement, placement, self.engine_config.shard_start_timeout_s,
                                   lost, from_peers=self.engine_config.expert_source == "peer",
                                   pace_s=self.config.stage_pace_s)
            self._commit(placement, actors, names)
        except BaseException:
            for actor, name in zip(actors, names):
                if name not in old_names:
                    ray.kill(actor)
            raise
        staged = time.monotonic()
        record = self._epoch_record()
        removed = [a for a, n in zip(old_actors, old_names) if n not in names and a is not None]
        summary = {"epoch": placement.epoch, "reason": reason, "shards": len(names), "shards_staged": len(restaged),
                   "from_checkpoint": sum(r["from_checkpoint"] for r in reports),
                   "from_peers": sum(r["from_peers"] for r in reports), "stage_s": round(staged - started, 3)}

        def finish():
            acks = self._install_everywhere(record, wait=True)
            acked = time.monotonic()
            # acked_at (CLOCK_MONOTONIC, one clock for the machine's processes): the new epoch
            # serves everywhere from here; what follows is cleanup.
            summary.update(acks=acks, switch_s=round(acked - staged, 3), acked_at=acked)
            for actor in removed:
                ray.kill(actor)
            try:  # free the slots of older epochs (every replica has moved on); unstaged shards have none
                paced(lambda a: control(a, "retire_before").remote(placement.epoch), restaged, self.config.stage_pace_s, 30)
            except Exception as e:
                log.warning("retiring before epoch %s: %s", placement.epoch, e)
            summary["retire_s"] = round(time.monotonic() - acked, 3)
            self._log("epoch-committed", **summary)
            return summary

        return summary, finish

    def _require_shards(self) -> None:
        if not self.config.expert_shards:
            raise ControlUnavailableError("this deployment keeps experts inside each replica; use the replicas' own "
                                          "placement changes")

    def scale_shards(self, count: int) -> dict:
        if not isinstance(count, int) or count < 1:
            raise InvalidRequestError("shards", f"must be an integer >= 1, got {count!r}")
        self._require_shards()
        with self.lock:
            layers, num_experts = self._model_shape()
            new = plan_placement(self._load(), self.placement, layers, scale_limits(num_experts, count))
            keep = min(count, len(self.shards))
            new_names, new_actors = self._take_shards(count - keep, keep)
            names, actors = self.shard_names[:keep] + new_names, self.shards[:keep] + new_actors
            _, finish = self._change(new, actors, names, reason=f"scale shards {len(self.shards)} -> {count}")
        summary = finish()
        self._refill_standby_later()
        return summary

    def rebalance(self, reason: str = "asked") -> dict:
        self._require_shards()
        with self.lock:
            layers, num_experts = self._model_shape()
            limits = scale_limits(num_experts, len(self.shards), spare_per_shard=1)
            new = plan_placement(self._load(), self.placement, layers, limits)
            _, finish = self._change(new, list(self.shards), list(self.shard_names), reason=f"rebalance ({reason})")
        return finish()

    def shard_lost(self, index: int | None, seen_epoch: int) -> dict:
        """A replica saw shard `index` fail on epoch `seen_epoch`. Replace it (once, however many
        replicas report it) and answer the epoch to switch to."""
        import ray

        with self.lock:
            if index is not None and index >= len(self.shards):
                return self._epoch_record()  # reported on an older, larger epoch: the shard is gone anyway
            if self.placement.epoch > seen_epoch:
                current = [index] if index is not None else range(len(self.shards))
                try:
                    ray.get([control(self.shards[i], "info").remote() for i in current], timeout=5)
                    return self._epoch_record()  # already replaced (another replica reported it first)
                except Exception:
                    pass
            lost = set(range(len(self.shards))) if index is None else {index}
            self._replace_shards(lost)
            return self._epoch_record()

    def _replace_shards(self, lost: set[int]) -> None:
        """Fresh shards take the lost indices; they copy experts from peers holding them, else read
        the checkpoint. Replicas switch without the caller's acknowledgement being awaited (the
        reporting replica's engine thread is waiting for this answer)."""
        fresh_names, fresh_actors = self._take_shards(len(lost), 0)
        names = list(self.shard_names)
        actors = list(self.shards)
        for i, name, actor in zip(sorted(lost), fresh_names, fresh_actors):
            names[i], actors[i] = name, actor
        placement = Placement(self.placement.epoch + 1, self.placement.num_experts, self.placement.shard_experts)
        _, finish = self._change(placement, actors, names, lost=lost, reason=f"replace lost shards {sorted(lost)}")

        def finish_then_refill():
            finish()
            self._refill_standby()

        threading.Thread(target=finish_then_refill, daemon=True).start()

    # ----- load, monitoring, automatic rebalance -----
    def _load(self) -> np.ndarray:
        """Tokens per expert per MoE layer, summed over the replicas' windows."""
        import ray

        layers, num_experts = self._model_shape()
        total = np.zeros((len(layers), num_experts))
        for rid, actor in list(self._replicas.items()):
            try:
                total += np.asarray(ray.get(actor.load_window.remote(), timeout=5))
            except Exception:
                pass  # a replica that does not answer is the monitor's to handle
        return total

    def _monitor_forever(self) -> None:
        while not self._stopped.wait(self.config.monitor_interval_s):
            try:
                self.check()
            except Exception as e:  # keep watching whatever one round hit
                log.warning("controller monitor: %s", e)

    def check(self) -> None:
        """One monitoring round: drop dead replicas (and start replacements), retire drained ones,
        sample the imbalance, rebalance when the policy says so, heartbeat into the store."""
        import ray

        now = time.monotonic()
        for rid, actor in list(self._replicas.items()):
            try:
                stats = ray.get(actor.stats.remote(), timeout=10)
            except Exception as e:
                self._replica_lost(rid, e)
                continue
            if rid in self.draining and stats["requests"] == 0:
                self._retire_replica(rid)
        if self.config.expert_shards and self.placement is not None and self._replicas:
            load = self._load()
            layers, _ = self._model_shape()
            if load.sum() > 0:
                self.samples.append((now, imbalance(load, self.placement, layers)))
                try:
                    self._store(self.store.put_load, load.astype(int).tolist(), wait_s=0)
                except ControlUnavailableError:
                    pass
            if rebalance_due(list(self.samples), now, self.config.auto_rebalance, self.last_change_at):
                try:
                    self.rebalance(reason=f"imbalance above {self.config.auto_rebalance.threshold} for "
                                          f"{self.config.auto_rebalance.window_s}s")
                except ControlUnavailableError as e:
                    log.warning("automatic rebalance waits: %s", e)
        try:
            for rid in list(self._replicas):
                self._store(self.store.heartbeat, "replica", rid, {"draining": rid in self.draining}, time.time(),
                            self.config.monitor_interval_s * 10, wait_s=0)
        except ControlUnavailableError:
            pass

    def _replica_lost(self, rid: str, error: Exception) -> None:
        with self.lock:
            if rid not in self._replicas:
                return
            self._replicas.pop(rid)
            self.draining.discard(rid)
            self._log("replica-lost", replica=rid, error=type(error).__name__)
            serving = len([r for r in self._replicas if r not in self.draining])
            if self.config.replace_lost_replicas and serving < self.target_replicas:
                self._start_replicas(self.target_replicas - serving)
            try:
                self._save_deployment()
            except ControlUnavailableError:
                pass

    def _retire_replica(self, rid: str) -> None:
        import ray

        with self.lock:
            actor = self._replicas.pop(rid, None)
            self.draining.discard(rid)
        if actor is not None:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(actor)
            self._log("replica-retired", replica=rid)
            try:
                self._save_deployment()
            except ControlUnavailableError:
                pass

    # ----- views -----
    def health(self) -> dict:
        return {"ok": self.store_error is None, "store": self.store_error or "reachable",
                "epoch": self.placement.epoch if self.placement else None, "generation": self.generation,
                "replicas": sorted(self._replicas), "draining": sorted(self.draining), "shards": len(self.shard_names),
                "recovered": self.recovered, "incarnation": self.incarnation}

    def state(self) -> dict:
        return {**self.health(), "placement": placement_to_dict(self.placement) if self.placement else None,
                "shard_names": list(self.shard_names), "events": list(self.events)[:20]}

    def shard_actors(self) -> list:
        return list(self.shards)

    def shutdown(self) -> None:
        """Stop the monitor, the replicas and the shards (the store keeps its record)."""
        import ray

        self._stopped.set()
        with self.lock:
            replicas, self._replicas = list(self._replicas.values()), {}
            shards, self.shards = [a for a in self.shards if a is not None] + [a for _, a in self.standby], []
            self.standby = []
        for actor in replicas:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(actor)
        for actor in shards:
            ray.kill(actor)


def _replica_actor_name(rid: str) -> str:
    return f"moefleet-{rid}"


def _new_shard_name() -> str:
    return f"moefleet-shard-{uuid.uuid4().hex[:8]}"
