"""Controller: owns membership (replicas, shards) and the versioned placement, and changes them
while serving by the epoch protocol: plan -> stage on the shards while the current epoch serves
-> commit (compare-and-set in the state store, then every replica switches between two steps)
-> retire (after every replica acknowledged: old slots freed, removed shards stopped).

A change reads as one pass through six steps, like an engine step: collect (the replicas' load)
-> decide (the rebalance rule, or an admin's ask) -> plan (placement/planner.py) -> diff (which
shards restage, placement/staging_plan.py) -> execute (stage on the shard group, switch the
replica group) -> persist (the epoch by compare-and-set, the deployment record, the rule's state).

A plain class over two seams (cluster/control/groups.py): the shard group and the replica group,
which it reaches by names and ids only; the Ray shell (actors/controller_host.py) injects groups of
Ray actors, unit tests groups of objects in one process. All it needs to carry on lives in the
state store: a restarted controller reads the committed epoch, the deployment record and the
rebalance rule's state, finds the shards and replicas by name, replaces the ones that died
meanwhile and goes on. Replicas do not need the controller to serve: they keep the last committed
epoch while it is away or the store is down.

With `expert_shards` = N > 0 the controller owns N shards that every replica reaches; with 0
each replica keeps its experts in process, and the controller still plans and commits every
placement change: it sends the epoch to the replicas, which stage it on their own shards."""

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from moefleet.autoscaler.policy_file import dump_policy
from moefleet.autoscaler.proactive_rebalance import proactive_change_missed, proactive_rebalance
from moefleet.autoscaler.rebalance_rule import rebalance_due
from moefleet.cluster.config.controller_config import ControllerConfig
from moefleet.cluster.control.autoscaling_actuator import AutoscalingActuator
from moefleet.cluster.control.groups import ReplicaGroup, ShardGroup
from moefleet.cluster.control.records import DeploymentRecord, RebalanceState
from moefleet.cluster.control.speculation import ArrivingLoad, GatewayLocality, Speculation, Topology
from moefleet.cluster.control.state_store import StateStore
from moefleet.cluster.errors import ControlUnavailableError, InvalidRequestError
from moefleet.cluster.experts.backend import initial_placement
from moefleet.cluster.experts.wire import TORCH_DTYPES
from moefleet.cluster.placement.affinity_planner import plan_affinity_placement
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement, placement_to_dict, round_robin_placement
from moefleet.cluster.placement.placement_file import (
    check_shard_nodes,
    load_placement_file,
    on_model_layers,
    relabel_layers,
)
from moefleet.cluster.placement.planner import imbalance, plan_placement, scale_limits
from moefleet.cluster.placement.routing_stats import RoutingStats
from moefleet.cluster.placement.staging_plan import layout_epochs
from moefleet.cluster.routing.affinity import AffinityModel
from moefleet.cluster.routing.trace import RoutingEvent
from moefleet.models.spec import load_spec

log = logging.getLogger(__name__)

CONTROLLER_NAME = "moefleet-controller"
MAX_RECORDING_S = 600.0


def _store_errors() -> tuple[type, ...]:
    kinds: list[type] = [ConnectionError, TimeoutError, OSError]
    try:
        import redis

        kinds.append(redis.exceptions.RedisError)
    except ImportError:
        pass
    return tuple(kinds)


class Controller:
    def __init__(self, config: ControllerConfig, shards: ShardGroup, replicas: ReplicaGroup, store: StateStore,
                 request_capacity: Callable[[int, int, set[str]], None] | None = None):
        """request_capacity(replicas, shards, busy nodes): asks the cluster for the nodes those
        sizes need (actors/cluster_capacity.py); None: the cluster is what it is."""
        self.config = config
        self.shard_group, self.replica_group, self.store = shards, replicas, store
        self.spec = spec = load_spec(config.engine.model)
        self.moe_layers, self.num_experts = spec.moe_layer_indices, spec.moe.num_experts
        self.lock = threading.RLock()  # one control change at a time
        self._refill_lock = threading.Lock()  # one standby refill at a time
        self.placement: Placement | None = None
        self.generation = 0
        self.shard_names: list[str] = []  # shard_names[i] serves shard index i (empty: experts inside replicas)
        self.standby: list[str] = []
        self.standby_target = config.standby_shards  # the autoscaler may change it
        self.standby_replicas: list[str] = []  # started and loaded, not serving: the autoscaler's warm ones
        self.standby_replicas_target = 0
        self._standby_replica_lock = threading.Lock()  # one refill at a time
        self.replica_ids: list[str] = []
        self.draining: set[str] = set()
        self.target_replicas = 0
        self.next_replica = 0  # replica ids are never reused, across controller restarts too
        self.policy = RebalanceState()
        self.store_error: str | None = None
        self.events: deque[str] = deque(maxlen=200)
        self._stopped = threading.Event()
        self.incarnation = uuid.uuid4().hex[:8]  # tells a restarted controller from the one before
        self.speculation = Speculation(self._affinity_model(), row_bytes=spec.hidden_size * self._dtype_bytes())
        self._affinity_saved_at = 0.0
        # Recent sampled routing paths (request ordinal, experts[L, K]): what grouping plans from.
        self._recent_paths: deque[tuple[str, np.ndarray]] = deque(maxlen=config.affinity_max_tokens)
        self._learning = threading.Lock()  # the monitor and a recording both take the replicas' samples
        self._recording: list[RoutingEvent] | None = None  # events kept while an admin records routing
        # (from, to, predicted load[L, E]) of the prompts admitted between two rounds, over the rebalance window
        self._arrived: deque[tuple[float, float, np.ndarray]] = deque()
        self._prompts_taken_at: float | None = None
        self._shard_node_ids: list[str] = []
        self._replica_node_ids: dict[str, str] = {}
        self.recovered = self._recover()
        self.started = self.recovered  # start() ran, here or in the controller before this one
        self.autoscaler = None
        if config.autoscaling is not None:
            self.autoscaler = AutoscalingActuator(self, config.autoscaling, self._store(self.store.autoscaler),
                                                  request_capacity)

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

    def _best_effort(self, fn, *args) -> None:
        """A store write that may be lost while the store is down (a heartbeat, a load sample)."""
        try:
            self._store(fn, *args, wait_s=0)
        except ControlUnavailableError:
            pass

    def _save_deployment(self) -> None:
        self._store(self.store.put_deployment, DeploymentRecord(
            tuple(self.shard_names), tuple(self.replica_ids), tuple(sorted(self.draining)), tuple(self.standby),
            self.target_replicas, self.next_replica, tuple(self.standby_replicas)))

    def _log(self, action: str, **details) -> None:
        self.events.appendleft(f"{action} {details}")
        log.info("controller: %s %s", action, details)
        # The decision log is best effort; the change itself was committed or refused.
        self._best_effort(self.store.log_decision, {"at": time.time(), "action": action, **details})

    # ----- the affinity model (speculative scheduling) -----
    def _affinity_model(self) -> AffinityModel:
        """The store's model when it has one for this model's shape (a restarted controller
        carries on learning), else a new one."""
        state = self._store(self.store.affinity)
        layers, top_k = len(self.moe_layers), self.spec.moe.top_k
        if state is not None:
            try:
                model = AffinityModel.from_state(state)
                if (model.num_layers, model.num_experts, model.top_k) == (layers, self.num_experts, top_k):
                    return model
                log.warning("the stored affinity model is for another model's shape: starting a new one")
            except ValueError as e:
                log.warning("the stored affinity model is unreadable (%s): starting a new one", e)
        return AffinityModel(layers, self.num_experts, top_k, max_tokens=self.config.affinity_max_tokens)

    @property
    def affinity(self) -> AffinityModel:
        return self.speculation.model

    def topology(self) -> Topology:
        if len(self._shard_node_ids) != len(self.shard_names):  # recovered: not asked yet
            self._shard_node_ids = self._shard_nodes(list(self.shard_names))
        return Topology.from_ids(self._shard_node_ids, dict(self._replica_node_ids))

    def _learn_routing(self, now: float) -> int:
        """Feed the replicas' sampled routing to the affinity model (scoring its predictions on
        each sample first); saved to the store at most every affinity_save_interval_s. Returns the
        token occurrences learned."""
        learned, topology = 0, self.topology()
        with self._learning:
            for rid in list(self.replica_ids):
                try:
                    sample = self.replica_group.routing_sample(rid)
                except Exception:  # a replica that does not answer is the monitor's to handle
                    continue
                for recorded in sample:
                    self.speculation.learn(recorded.tokens, recorded.experts, topology.replica_nodes.get(rid),
                                           self.placement, self.moe_layers, topology)
                    self._recent_paths.extend(zip((f"{rid}/{r}" for r in recorded.request_ids), recorded.experts))
                    if self._recording is not None:
                        self._recording += recorded.events(lambda request_id, rid=rid: f"{rid}/{request_id}")
                    learned += len(recorded.tokens)
        if learned and now - self._affinity_saved_at >= self.config.affinity_save_interval_s:
            self._best_effort(self.store.put_affinity, self.affinity.state())
            self._affinity_saved_at = now
        return learned

    def record_routing(self, sample_rate: float, duration_s: float, max_events: int) -> tuple[list[RoutingEvent], bool]:
        """The replicas' routing at `sample_rate` for `duration_s` (sequences named replica/request):
        (events, truncated at max_events). The replicas go back to the configured rate after."""
        if not 0 < sample_rate <= 1:
            raise InvalidRequestError("sample_rate", f"must be in (0, 1], got {sample_rate}")
        if not 0 < duration_s <= MAX_RECORDING_S:
            raise InvalidRequestError("duration_s", f"must be in (0, {MAX_RECORDING_S:g}], got {duration_s}")
        if max_events < 1:
            raise InvalidRequestError("max_events", f"must be >= 1, got {max_events}")
        with self._learning:
            if self._recording is not None:
                raise InvalidRequestError("RecordRouting", "a recording is already running: one at a time")
            self._recording = []
        default_rate = self.config.engine.routing_sample_rate
        try:
            self._set_routing_rate(sample_rate)
            deadline = time.monotonic() + duration_s
            while time.monotonic() < deadline and len(self._recording) < max_events:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                self._learn_routing(time.time())
        finally:
            self._set_routing_rate(default_rate)
            self._learn_routing(time.time())  # what the replicas sampled up to the switch back
            with self._learning:
                events, self._recording = self._recording, None
        return events[:max_events], len(events) > max_events

    def _set_routing_rate(self, sample_rate: float) -> None:
        for rid in list(self.replica_ids):
            try:
                self.replica_group.record_routing(rid, sample_rate)
            except Exception as e:  # a lost replica is the monitor's to handle; the others record
                log.warning("recording routing on %s: %s", rid, e)

    def gateway_locality(self) -> GatewayLocality | None:
        """What gateways shuffle requests by (None: placement by load alone, nothing to gain, or
        nothing learned yet)."""
        with self.lock:
            placement = self.placement
        if placement is None or self.config.placement_objective != "affinity":
            return None
        return self.speculation.gateway_locality(placement, self.moe_layers, self.topology(), self.config.engine.model)

    def _plan_rebalance(self, load: np.ndarray, limits) -> tuple[Placement, str]:
        """The rebalanced placement and how it was planned: grouped by the affinity model's routing
        when asked for and learned enough, with shards on more than one node; else for load."""
        topology = self.topology()
        if (self.config.placement_objective == "affinity" and self.speculation.can_plan() and topology.spans_nodes
                and self._recent_paths):
            names = {name: i for i, name in enumerate(dict.fromkeys(seq for seq, _ in self._recent_paths))}
            seq = np.array([names[name] for name, _ in self._recent_paths])
            experts = np.stack([path for _, path in self._recent_paths])
            stats = RoutingStats.from_paths(seq, experts, self.num_experts)
            ordinal = list(range(len(self.moe_layers)))
            planned = plan_affinity_placement(stats, relabel_layers(self.placement, ordinal), topology.shard_nodes,
                                              limits)
            return relabel_layers(planned, self.moe_layers, self.placement.epoch + 1), "affinity"
        return plan_placement(load, self.placement, self.moe_layers, limits), "load"

    # ----- recovery -----
    def _recover(self) -> bool:
        """Carry on from the store's record, if any: find the shards and replicas by name and
        replace the ones that died while no controller was watching."""
        record = self._store(self.store.deployment)
        generation, placement = self._store(self.store.epoch)
        if record is None:
            return False
        self.generation, self.placement = generation, placement
        self.policy = self._store(self.store.rebalance_state)
        self.target_replicas, self.next_replica = record.target_replicas, record.next_replica
        for rid in record.replicas:
            if self.replica_group.attach(rid):
                self.replica_ids.append(rid)
            else:
                self._log("replica-gone-at-recovery", replica=rid)
        self.draining = set(record.draining) & set(self.replica_ids)
        self.standby_replicas = [rid for rid in record.standby_replicas if self.replica_group.attach(rid)]
        self.standby = [name for name in record.standby if self.shard_group.attach(name)]
        self.shard_names = list(record.shards)
        lost = {i for i, name in enumerate(self.shard_names)
                if not (self.shard_group.attach(name) and self.shard_group.alive([name]))}
        self._log("recovered", epoch=placement.epoch if placement else None, replicas=list(self.replica_ids),
                  shards=len(self.shard_names), lost_shards=sorted(lost))
        if lost and placement is not None:
            self._replace_shards(lost)
        elif placement is not None:  # a replica may have missed the last commit while we were away
            self.replica_group.install(list(self.replica_ids), self._epoch_record(), wait=False)
        return True

    # ----- start and membership -----
    def start(self, replicas: int) -> list[str]:
        """First start (no-op for what a recovered controller already has): the first epoch (and
        the shards it names), then replicas."""
        with self.lock:
            if self.placement is None:
                self._start_first_epoch()
            self.target_replicas = max(self.target_replicas, replicas)
            missing = replicas - len(self._serving())
            started = self._start_replicas(missing) if missing > 0 else []
            self._save_deployment()
            self.started = True
        if self.config.expert_shards:
            self._refill_standby()
        return started

    def _start_first_epoch(self) -> None:
        """Round robin over the controller's shards, or over the shards each replica keeps in
        process (the placement a replica's engine starts on)."""
        if self.config.initial_placement:
            placement = self._placement_from_file(self.config.initial_placement)
            names = [_new_shard_name() for _ in range(placement.num_shards)]
            self.shard_group.start(names, list(range(placement.num_shards)), placement)
        elif self.config.expert_shards:
            placement = round_robin_placement(self.moe_layers, self.num_experts, self.config.expert_shards)
            names = [_new_shard_name() for _ in range(placement.num_shards)]
            self.shard_group.start(names, list(range(placement.num_shards)), placement)
        else:
            placement = initial_placement(self.config.engine, self.spec)
            names = []
        self._commit(placement, names, time.time())

    def _placement_from_file(self, path: str) -> Placement:
        placement, shard_nodes = load_placement_file(path)
        if placement.num_shards != self.config.expert_shards:
            raise ValueError(f"{path}: places experts on {placement.num_shards} shards, expert_shards is "
                             f"{self.config.expert_shards}")
        if shard_nodes is not None:
            check_shard_nodes(path, shard_nodes, self.config.engine.shard_resources)
        return on_model_layers(placement, self.moe_layers, self.num_experts, 0, path)

    def _serving(self) -> list[str]:
        return [rid for rid in self.replica_ids if rid not in self.draining]

    def _take_shards(self, indices: list[int]) -> list[str]:
        """Names of empty shards to serve `indices`: standby ones first, fresh ones for the rest."""
        taken, self.standby = self.standby[:len(indices)], self.standby[len(indices):]
        fresh = [_new_shard_name() for _ in indices[len(taken):]]
        self.shard_group.start(fresh, indices[len(taken):], None)
        return taken + fresh

    def _refill_standby_later(self) -> None:
        """Start the standby shards used up, in the background: after the change, not during it
        (a process start competes for the cores the serving epoch uses)."""
        if len(self.standby) < self.standby_target:
            threading.Thread(target=self._refill_standby, daemon=True).start()

    def _refill_standby(self) -> None:
        """Start standby shards up to the configured count. The starts (seconds each) run outside
        the lock, so control changes do not wait for them."""
        with self._refill_lock:
            missing = self.standby_target - len(self.standby)
            if missing <= 0:
                return
            names = [_new_shard_name() for _ in range(missing)]
            self.shard_group.start(names, list(range(missing)), None)
            with self.lock:
                self.standby += names
                try:
                    self._save_deployment()
                except ControlUnavailableError:
                    pass

    def _start_replicas(self, count: int) -> list[str]:
        """`count` more serving replicas: warm standby ones first (they only switch to the current
        epoch), fresh ones for the rest."""
        warm, self.standby_replicas = self.standby_replicas[:count], self.standby_replicas[count:]
        ids = [f"replica-{self.next_replica + n}" for n in range(count - len(warm))]
        self.next_replica += len(ids)
        record = self._epoch_record()
        self.replica_group.start(ids, record)
        # A replica keeping its experts in process starts on the first epoch, and a standby one on
        # the epoch of its start: each catches up here.
        acks = self.replica_group.install(warm + ids, record, wait=True)
        lost = [rid for rid in warm if isinstance(acks.get(rid), str)]  # a standby replica that died meanwhile
        for rid in lost:
            self.replica_group.shutdown(rid)
        started = [rid for rid in warm if rid not in lost] + ids
        self.replica_ids += started
        if lost:
            started += self._start_replicas(len(lost))
        self._log("replicas-started", replicas=started, from_standby=[rid for rid in warm if rid not in lost])
        if warm:
            self._refill_standby_replicas_later()
        return started

    def set_standby_replicas(self, count: int) -> None:
        """Keep `count` replicas started but not serving (the autoscaler's warm pool)."""
        self.standby_replicas_target = count
        surplus = []
        with self.lock:
            while len(self.standby_replicas) > count:
                surplus.append(self.standby_replicas.pop())
            if surplus:
                self._save_deployment()
        for rid in surplus:
            self.replica_group.shutdown(rid)
        self._refill_standby_replicas_later()

    def _refill_standby_replicas_later(self) -> None:
        if len(self.standby_replicas) < self.standby_replicas_target:
            threading.Thread(target=self._refill_standby_replicas, daemon=True).start()

    def _refill_standby_replicas(self) -> None:
        """Start standby replicas up to the target, outside the lock (a start takes seconds)."""
        with self._standby_replica_lock:
            with self.lock:
                missing = self.standby_replicas_target - len(self.standby_replicas)
                ids = [f"replica-{self.next_replica + n}" for n in range(max(0, missing))]
                self.next_replica += len(ids)
            if not ids:
                return
            self.replica_group.start(ids, self._epoch_record())
            with self.lock:
                self.standby_replicas += ids
                self._log("standby-replicas-started", replicas=ids)
                try:
                    self._save_deployment()
                except ControlUnavailableError:
                    pass

    def replicas(self) -> list[tuple[str, object, bool]]:
        """(replica id, handle, draining) for gateways. Without the control lock (a placement change
        holds it for seconds), so a replica retired while this runs is left out: its handle is gone."""
        found = []
        for rid in list(self.replica_ids):
            try:
                found.append((rid, self.replica_group.handle(rid), rid in self.draining))
            except KeyError:  # retired or lost since the list was taken
                continue
        return found

    def scale_replicas(self, count: int) -> str:
        if not isinstance(count, int) or count < 1:
            raise InvalidRequestError("replicas", f"must be an integer >= 1, got {count!r}")
        return self.scale_replicas_to(count)

    def scale_replicas_to(self, count: int) -> str:
        """`count` serving replicas, 0 included (the autoscaler's scale to zero): new ones start,
        surplus ones drain (they stop when their requests finish)."""
        with self.lock:
            serving = self._serving()
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
            if replica_id not in self.replica_ids:
                raise InvalidRequestError("replica_id", f"no replica {replica_id!r}; replicas: {sorted(self.replica_ids)}")
            self._drain(replica_id)
            self.target_replicas = max(0, self.target_replicas - 1)
            self._save_deployment()
            return f"draining {replica_id}"

    def _drain(self, rid: str) -> None:
        self.draining.add(rid)
        self.replica_group.drain(rid)
        self._log("replica-draining", replica=rid)

    # ----- placement changes: collect -> decide -> plan -> diff -> execute -> persist -----
    def scale_shards(self, count: int) -> dict:
        if not isinstance(count, int) or count < 1:
            raise InvalidRequestError("shards", f"must be an integer >= 1, got {count!r}")
        with self.lock:
            new = plan_placement(self._collect_load(), self.placement, self.moe_layers,
                                 scale_limits(self.num_experts, count))
            names = []
            if self.config.expert_shards:
                keep = min(count, len(self.shard_names))
                names = self.shard_names[:keep] + self._take_shards(list(range(keep, count)))
            finish = self._change(new, names, time.time(), reason=f"scale shards {self.placement.num_shards} -> {count}")
        summary = finish()
        self._refill_standby_later()
        return summary

    def rebalance(self, reason: str = "asked") -> dict:
        return self._rebalance(reason, time.time())

    def _rebalance(self, reason: str, now: float, toward: np.ndarray | None = None) -> dict:
        """`toward`: plan for this load (a forecast, float64[L, E]) instead of the observed one: a
        proactive change, committed as a bet to watch (RebalanceState.unchecked_proactive_at)."""
        with self.lock:
            limits = scale_limits(self.num_experts, self.placement.num_shards, spare_per_shard=1)
            if toward is not None:
                new, objective = plan_placement(toward, self.placement, self.moe_layers, limits), "forecast"
            else:
                new, objective = self._plan_rebalance(self._collect_load(), limits)
            finish = self._change(new, list(self.shard_names), now, reason=f"rebalance ({reason}; {objective})",
                                  proactive=toward is not None)
        return finish()

    def shard_lost(self, index: int | None, seen_epoch: int) -> EpochRecord:
        """A replica saw shard `index` (None: some shard) fail on epoch `seen_epoch`. Replace it
        (once, however many replicas report it) and answer the epoch to switch to."""
        with self.lock:
            if index is not None and index >= len(self.shard_names):
                return self._epoch_record()  # reported on an older, larger epoch: the shard is gone anyway
            current = self.shard_names if index is None else [self.shard_names[index]]
            if self.placement.epoch > seen_epoch and self.shard_group.alive(current):
                return self._epoch_record()  # already replaced (another replica reported it first)
            self._replace_shards(set(range(len(self.shard_names))) if index is None else {index})
            return self._epoch_record()

    def _replace_shards(self, lost: set[int]) -> None:
        """Fresh shards take the lost indices; they copy experts from peers holding them, else read
        the checkpoint. Replicas switch without the caller's acknowledgement being awaited (the
        reporting replica's engine thread is waiting for this answer)."""
        names = list(self.shard_names)
        for i, name in zip(sorted(lost), self._take_shards(sorted(lost))):
            names[i] = name
        placement = Placement(self.placement.epoch + 1, self.placement.num_experts, self.placement.shard_experts)
        finish = self._change(placement, names, time.time(), lost=lost, reason=f"replace lost shards {sorted(lost)}")

        def finish_then_refill():
            finish()
            self._refill_standby()

        threading.Thread(target=finish_then_refill, daemon=True).start()

    def _epoch_record(self) -> EpochRecord:
        return EpochRecord(self.placement, tuple(self.shard_names))

    def _change(self, new: Placement, names: list[str], now: float, lost: set[int] = frozenset(),
                reason: str = "", proactive: bool = False) -> Callable[[], dict]:
        """Diff, stage and commit `new` over the shards `names` (none: the replicas' own); call
        with the lock held. Returns finish(), which switches the replicas, waits for their
        acknowledgements and retires the old epoch: call it without the lock, because a replica
        whose engine thread waits in `shard_lost` for the lock cannot acknowledge meanwhile."""
        old, old_names = self.placement, self.shard_names
        if names:  # diff: a shard whose experts stay where they are keeps its slot maps, untouched
            new = replace(new, shard_epochs=layout_epochs(old, old_names, new, names, lost))
        restaged = [names[s] for s in new.restaged_shards()] if names else []
        started = time.monotonic()
        try:
            reports = self.shard_group.stage(old_names, names, old, new, lost, self.config.engine.expert_source == "peer",
                                             self.config.stage_pace_s) if names else []
            self._commit(new, names, now, proactive)
        except BaseException:
            self.shard_group.stop([name for name in names if name not in old_names])
            raise
        staged = time.monotonic()
        record = self._epoch_record()
        removed = [name for name in old_names if name not in names]
        summary = {"epoch": new.epoch, "reason": reason, "shards": new.num_shards, "shards_staged": len(restaged),
                   "from_checkpoint": sum(r["from_checkpoint"] for r in reports),
                   "from_peers": sum(r["from_peers"] for r in reports), "stage_s": round(staged - started, 3)}

        def finish() -> dict:
            acks = self.replica_group.install(list(self.replica_ids), record, wait=True)
            acked = time.monotonic()
            # acked_at (CLOCK_MONOTONIC, one clock for the machine's processes): the new epoch
            # serves everywhere from here; what follows is cleanup.
            summary.update(acks=acks, switch_s=round(acked - staged, 3), acked_at=acked)
            self.shard_group.stop(removed)
            try:  # free the slots of older epochs (every replica has moved on); unstaged shards have none
                self.shard_group.retire_before(restaged, new.epoch, self.config.stage_pace_s)
            except Exception as e:
                log.warning("retiring before epoch %s: %s", new.epoch, e)
            summary["retire_s"] = round(time.monotonic() - acked, 3)
            self._log("epoch-committed", **summary)
            return summary

        return finish

    def _commit(self, placement: Placement, names: list[str], now: float, proactive: bool = False) -> None:
        """Persist: compare-and-set the epoch in the store, then adopt it here (`proactive`: a change
        the proactive rule made, watched from now on)."""
        if not self._store(self.store.commit_epoch, self.generation, placement):
            self._reseed_lost_store()
            if not self._store(self.store.commit_epoch, self.generation, placement):
                raise ControlUnavailableError("another controller committed an epoch meanwhile; this one stands down")
        self.generation += 1
        if names != self.shard_names or len(self._shard_node_ids) != len(names):
            self._shard_node_ids = self._shard_nodes(names)
        self.placement, self.shard_names = placement, list(names)
        self.policy = self.policy.changed(now, proactive)
        self._save_deployment()
        self._best_effort(self.store.put_rebalance_state, self.policy)

    def _shard_nodes(self, names: list[str]) -> list[str]:
        """The node of each shard, for locality; "unknown" where one does not answer (it is being
        replaced, and the next change asks again)."""
        try:
            return self.shard_group.nodes(names) if names else []
        except Exception as e:
            log.warning("shard nodes: %s", e)
            return ["unknown"] * len(names)

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

    # ----- collect, monitor, decide -----
    def _collect_load(self) -> np.ndarray:
        """Tokens per expert per MoE layer, summed over the replicas' windows: [L, E]."""
        total = np.zeros((len(self.moe_layers), self.num_experts))
        for rid in list(self.replica_ids):
            try:
                total += np.asarray(self.replica_group.load_window(rid))
            except Exception:
                pass  # a replica that does not answer is the monitor's to handle
        return total

    def start_monitor(self) -> None:
        """Run `check` every monitor_interval_s on a thread of its own, until shutdown."""
        threading.Thread(target=self._monitor_forever, name="moefleet-controller", daemon=True).start()

    def _monitor_forever(self) -> None:
        while not self._stopped.wait(self.config.monitor_interval_s):
            try:
                self.check(time.time())
            except Exception as e:  # keep watching whatever one round hit
                log.warning("controller monitor: %s", e)

    def check(self, now: float) -> None:
        """One monitoring round at wall-clock time `now`: drop dead replicas (and start
        replacements), retire drained ones, learn the routing the replicas sampled, sample the
        imbalance, rebalance when the rule says so, heartbeat into the store."""
        states = []
        for rid in list(self.replica_ids):
            try:
                state = self.replica_group.stats(rid)
            except Exception as e:
                self._replica_lost(rid, e)
                continue
            states.append(state)
            self._replica_node_ids[rid] = state.node_id
            if rid in self.draining and state.requests == 0:
                self._retire_replica(rid)
        self._learn_routing(now)
        load = self._collect_load() if self.placement is not None and self.replica_ids else None
        arriving = self._arriving_load(now) if load is not None and self._predicts_load() else None
        if load is not None:
            if load.sum() > 0:
                with self.lock:  # a change committed meanwhile resets the samples: not to be overwritten
                    self.policy = self.policy.sampled(now, imbalance(load, self.placement, self.moe_layers),
                                                      self.config.auto_rebalance.window_s)
                    self._best_effort(self.store.put_rebalance_state, self.policy)
                self._best_effort(self.store.put_load, load.astype(int).tolist())
            rule = self.config.auto_rebalance
            bet_at = self.policy.unchecked_proactive_at
            missed = None if bet_at is None else proactive_change_missed(list(self.policy.samples), now, bet_at,
                                                                         rule.proactive_settings())
            if missed:
                try:
                    self._rebalance(f"the proactive rebalance {now - bet_at:.0f}s ago missed: imbalance above "
                                    f"{rule.proactive_threshold} within {rule.proactive_check_s:g}s of it", now)
                except ControlUnavailableError as e:
                    log.warning("correcting a proactive rebalance waits: %s", e)
            elif missed is False:
                with self.lock:
                    self.policy = self.policy.checked()
                self._best_effort(self.store.put_rebalance_state, self.policy)
            elif rebalance_due(list(self.policy.samples), now, rule, self.policy.last_change_at):
                try:
                    self._rebalance(f"imbalance above {rule.threshold} for {rule.window_s}s", now)
                except ControlUnavailableError as e:
                    log.warning("automatic rebalance waits: %s", e)
            elif rule.enabled and rule.proactive and load.sum() > 0:
                self._rebalance_ahead(load, now, arriving)
        if self.autoscaler is not None and self.started:  # not before the first replicas and epoch
            self.autoscaler.round(now, states, load,
                                  arriving if arriving is not None and self.speculation.can_plan() else None)
        for rid in list(self.replica_ids):
            self._best_effort(self.store.heartbeat, "replica", rid, {"draining": rid in self.draining}, now,
                              self.config.monitor_interval_s * 10)

    def _arriving_load(self, now: float) -> ArrivingLoad:
        """The affinity model's predicted load float64[L, E] of the requests the replicas admitted
        since the last round, and of those admitted over the rebalance window before it."""
        arrived = []
        for rid in list(self.replica_ids):
            try:
                tokens, _ = self.replica_group.arrived_prompts(rid)
            except Exception:  # a replica that does not answer is the monitor's to handle
                continue
            arrived.append(tokens)
        tokens = np.concatenate(arrived) if arrived else np.zeros(0, dtype=np.int64)
        coming = self.affinity.expected_load(tokens)
        since, self._prompts_taken_at = self._prompts_taken_at or now - self.config.monitor_interval_s, now
        window = self.config.auto_rebalance.window_s
        while self._arrived and self._arrived[0][1] <= now - window:
            self._arrived.popleft()
        seen = sum((load for _, _, load in self._arrived), np.zeros_like(coming))
        seen_span_s = sum(end - start for start, end, _ in self._arrived)
        self._arrived.append((since, now, coming))
        return ArrivingLoad(seen, seen_span_s, coming, now - since, len(tokens))

    def _predicts_load(self) -> bool:
        """Whether anyone reads the arriving requests' predicted load: proactive rebalancing, or an
        autoscaling policy that sizes shards or copies experts by it."""
        rule = self.config.auto_rebalance
        return bool((rule.enabled and rule.proactive) or (self.autoscaler and self.autoscaler.wants_predicted_load()))

    def _rebalance_ahead(self, observed: np.ndarray, now: float, arriving: ArrivingLoad) -> None:
        """Proactive rebalancing: toward the forecast of the coming requests' expert load, before
        their experts turn hot (needs an affinity model that has learned enough)."""
        if not arriving.coming_tokens or not self.speculation.can_plan():
            return
        ahead = proactive_rebalance(observed, arriving.seen, arriving.coming, arriving.coming_tokens, self.placement,
                                    self.moe_layers, now, self.policy.last_change_at,
                                    self.config.auto_rebalance.proactive_settings())
        if ahead.due:
            try:
                self._rebalance(f"proactive: {ahead.reason}", now, toward=ahead.forecast)
            except ControlUnavailableError as e:
                log.warning("proactive rebalance waits: %s", e)

    # ----- the autoscaler's view and levers (cluster/control/autoscaling_actuator.py) -----
    def serving_replicas(self) -> list[str]:
        return self._serving()

    def num_shards(self) -> int:
        """Shard actors the controller owns (0: each replica keeps its experts in process)."""
        return len(self.shard_names)

    def owns_shards(self) -> bool:
        return bool(self.shard_names)

    def interval_s(self) -> float:
        return self.config.monitor_interval_s

    def _dtype_bytes(self) -> int:
        """Bytes of one number as the engines hold weights and send hidden rows."""
        return TORCH_DTYPES[self.config.engine.dtype].itemsize

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what one copy moves): three projections."""
        spec = self.spec
        return 3 * spec.hidden_size * spec.moe.intermediate_size * self._dtype_bytes()

    def expert_load_view(self, load: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None, float]:
        """(load float64[L, E] over the window or None, copies int64[L, E], imbalance) for the
        autoscaler, from this round's `load` (None: no placement or no replica yet)."""
        if self.placement is None:
            return None, None, 1.0
        copies = self.placement.holder_matrix(self.moe_layers).sum(axis=2)
        if load is None or load.sum() == 0:
            return None, copies, 1.0
        return load, copies, imbalance(load, self.placement, self.moe_layers)

    def busy_nodes(self) -> set[str]:
        """Ray node ids running a replica (serving, draining or standby) or a shard (serving or
        standby) of this deployment: nodes a cluster scale-down must keep."""
        nodes = set(self._replica_node_ids.values()) | set(self._shard_node_ids)
        for rid in list(self.standby_replicas):
            try:
                nodes.add(self.replica_group.stats(rid).node_id)
            except Exception:  # gone: its node holds nothing of ours
                pass
        try:
            nodes |= set(self.shard_group.nodes(list(self.standby)))
        except Exception:
            pass
        return nodes

    def set_standby_shards(self, count: int) -> None:
        self.standby_target = count
        self._refill_standby_later()

    def persist_autoscaler(self, record: dict) -> None:
        self._best_effort(self.store.put_autoscaler, record)

    def log_action(self, action: str, **details) -> None:
        self._log(action, **details)

    def note_waiting(self, gateway_id: str, count: int) -> None:
        """A gateway holds `count` requests for want of a serving replica (scale from zero)."""
        if self.autoscaler is not None:
            self.autoscaler.note_waiting(gateway_id, count, time.time())

    def _autoscaler(self):
        if self.autoscaler is None:
            raise NotImplementedError("this deployment runs no autoscaler: start it with "
                                      "--autoscaling-policy FILE (or autoscaling_policy in cluster.yaml)")
        return self.autoscaler

    def get_autoscaling_policy(self) -> str:
        return dump_policy(self._autoscaler().autoscaling.policy)

    def set_autoscaling_policy(self, text: str) -> str:
        return self._autoscaler().set_policy_yaml(text)

    def autoscaler_status(self) -> dict:
        return self._autoscaler().status()

    def autoscaler_history(self, limit: int = 100) -> list[dict]:
        return self._autoscaler().history(limit)

    def deployment_gauges(self) -> dict:
        """What gateways add to /metrics for the deployment as a whole."""
        return {"speculation": self.speculation.quality.gauges(),
                "pools": self.autoscaler.gauges() if self.autoscaler is not None else None}

    def _replica_lost(self, rid: str, error: Exception) -> None:
        with self.lock:
            if rid not in self.replica_ids:
                return
            self.replica_ids.remove(rid)
            self._replica_node_ids.pop(rid, None)
            self.draining.discard(rid)
            self._log("replica-lost", replica=rid, error=type(error).__name__)
            serving = len(self._serving())
            if self.config.replace_lost_replicas and serving < self.target_replicas:
                self._start_replicas(self.target_replicas - serving)
            try:
                self._save_deployment()
            except ControlUnavailableError:
                pass

    def _retire_replica(self, rid: str) -> None:
        with self.lock:
            if rid not in self.replica_ids:
                return
            self.replica_ids.remove(rid)
            self._replica_node_ids.pop(rid, None)
            self.draining.discard(rid)
        self.replica_group.shutdown(rid)
        self._log("replica-retired", replica=rid)
        try:
            self._save_deployment()
        except ControlUnavailableError:
            pass

    # ----- views -----
    def health(self) -> dict:
        return {"ok": self.store_error is None, "store": self.store_error or "reachable",
                "epoch": self.placement.epoch if self.placement else None, "generation": self.generation,
                "replicas": sorted(self.replica_ids), "draining": sorted(self.draining), "shards": len(self.shard_names),
                "recovered": self.recovered, "incarnation": self.incarnation}

    def state(self) -> dict:
        return {**self.health(), "placement": placement_to_dict(self.placement) if self.placement else None,
                "shard_names": list(self.shard_names), "events": list(self.events)[:20]}

    def shutdown(self) -> None:
        """Stop the monitor, the replicas and the shards (the store keeps its record)."""
        self._stopped.set()
        with self.lock:
            replicas, self.replica_ids = self.replica_ids + self.standby_replicas, []
            self.standby_replicas, self.standby_replicas_target = [], 0
            shards, self.shard_names, self.standby = self.shard_names + self.standby, [], []
        for rid in replicas:
            self.replica_group.shutdown(rid)
        self.shard_group.stop(shards)


def _new_shard_name() -> str:
    return f"moefleet-shard-{uuid.uuid4().hex[:8]}"
