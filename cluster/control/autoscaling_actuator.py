"""Acting on the autoscaler's decisions: the controller's own operations, run one change at a time
on a thread of their own so that the monitor keeps watching while a replica or a shard starts.

- replicas: scale_replicas (new ones start, surplus ones drain: no request is dropped; to zero
  when the policy scales to zero, and back from zero when a gateway holds a request);
- expert shards: scale_shards through a placement epoch (only where the controller owns shards);
- standby replicas and shards: the warm counts the decision asks for (a scale-up takes warm
  ones first);
- copies of hot experts: a rebalance with spare slots (the load planner copies hot experts);
- capacity: the cluster is asked for the nodes the new sizes need (`request_capacity`: Ray's
  autoscaler SDK, or the KubeRay actuator on Kubernetes; nothing on a fixed local cluster).

Every decision that changes something is logged to the state store's decision log with its
reasons and signals (what `moefleet admin autoscaler history` shows)."""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from moefleet.autoscaler.policy import Decision
from moefleet.autoscaler.policy_file import AutoscalingPolicy, parse_policy
from moefleet.autoscaler.predictor import arriving_expert_load
from moefleet.cluster.control.autoscaling import Autoscaling, Observation
from moefleet.cluster.control.speculation import ArrivingLoad
from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.messages import ReplicaState

log = logging.getLogger(__name__)


class AutoscalingActuator:
    def __init__(self, controller, policy: AutoscalingPolicy, stored: dict | None,
                 request_capacity: Callable[[int, int, set[str]], None] | None = None):
        self.controller = controller
        self.autoscaling = Autoscaling(policy, stored)
        self.request_capacity = request_capacity
        self.gateway_waiting: dict[str, tuple[int, float]] = {}  # gateway id -> (requests held, when told)
        self._acting: dict[str, threading.Thread] = {}  # pool -> the change in flight (one per pool)
        self._starting = 0  # replicas being started by the change in flight
        self.failures: deque[dict] = deque(maxlen=20)  # acting that failed, newest first (shown in status)

    # ----- what the gateways and the Admin API call -----
    def note_waiting(self, gateway_id: str, count: int, now_s: float) -> None:
        """A gateway holds `count` requests for want of a serving replica."""
        self.gateway_waiting[gateway_id] = (count, now_s)

    def set_policy_yaml(self, text: str) -> str:
        """Validate and hot-reload a policy (Admin SetAutoscalingPolicy); persisted at once."""
        try:
            policy = parse_policy(text, "the policy sent")
        except ValueError as e:
            raise InvalidRequestError("yaml", str(e)) from None
        self.autoscaling.set_policy(policy)
        self.controller.persist_autoscaler(self.autoscaling.record())
        self.controller.log_action("autoscaling-policy-set", name=policy.metadata.name, mode=policy.spec.mode)
        return f"autoscaling policy {policy.metadata.name!r} ({policy.spec.mode}) in force"

    def status(self) -> dict:
        actual = {"replicas": len(self.controller.serving_replicas()), "expert_shards": self.controller.num_shards(),
                  "standby_replicas": len(self.controller.standby_replicas),
                  "standby_shards": len(self.controller.standby)}
        return {**self.autoscaling.status(actual), "acting": self.acting(), "failures": list(self.failures)}

    def history(self, limit: int = 100) -> list[dict]:
        return list(self.autoscaling.history)[:limit]

    def acting(self, pool: str | None = None) -> bool:
        """Whether a change of `pool` (None: of any pool) is in flight."""
        return any(thread.is_alive() for name, thread in self._acting.items() if pool in (None, name))

    def gauges(self) -> dict[str, dict[str, float]]:
        """desired and actual size per pool, for Prometheus."""
        last = self.autoscaling.last
        actual = {"replicas": len(self.controller.serving_replicas()), "expert_shards": self.controller.num_shards()}
        desired = {"replicas": last.replicas, "expert_shards": last.expert_shards} if last else dict(actual)
        return {"desired": desired, "actual": actual}

    # ----- each monitoring round -----
    def round(self, now_s: float, states: list[ReplicaState], load: np.ndarray | None,
              arriving: ArrivingLoad | None = None) -> Decision | None:
        """One monitoring round: `states` of the replicas, `load` float64[L, E] their load window
        (None before there is a placement and a replica), `arriving` the predicted load of the
        requests they admitted (None: no prediction; asked for where wants_predicted_load)."""
        seen = self._observation(now_s, states, load, arriving)
        self.autoscaling.observe(seen)
        if not self.autoscaling.due(now_s):
            return None
        decision = self.autoscaling.decide(seen)
        self.controller.persist_autoscaler(self.autoscaling.record())
        if decision.changes:
            self.controller.log_action("autoscale", advisory=decision.advisory,
                                       changes=[c.to_dict() for c in decision.changes])
        if not decision.advisory:
            if self.request_capacity is not None:
                self._in_background("capacity", self._request_capacity, decision)
            self._in_background("replicas", self._act_on_replicas, decision)
            if self.controller.owns_shards():
                self._in_background("expert_shards", self._act_on_shards, decision)
        return decision

    def _in_background(self, pool: str, act: Callable[[Decision], None], decision: Decision) -> None:
        """Act for one pool on a thread of its own, unless its last change is still in flight (the
        next decision sees that change as starting units and decides again)."""
        if self.acting(pool):
            return
        thread = threading.Thread(target=self._guarded, args=(pool, act, decision), name=f"moefleet-autoscaler-{pool}",
                                  daemon=True)
        self._acting[pool] = thread
        thread.start()

    def wants_predicted_load(self) -> bool:
        """Whether the policy sizes shards or copies experts by the arriving requests' predicted load."""
        spec = self.autoscaling.policy.spec
        return spec.predictor.kind == "predicted_expert_load" or (
            spec.expert_replication.enabled and spec.expert_replication.trigger.source == "predicted")

    def _observation(self, now_s: float, states: list[ReplicaState], load: np.ndarray | None,
                     arriving: ArrivingLoad | None) -> Observation:
        controller = self.controller
        serving = set(controller.serving_replicas())
        waiting = sum(count for count, at in self.gateway_waiting.values() if now_s - at < 10 * controller.interval_s())
        load, copies, imbalance = controller.expert_load_view(load)
        return Observation(now_s=now_s, replicas=tuple(s for s in states if s.replica_id in serving),
                           replicas_starting=self._starting, replicas_standby=len(controller.standby_replicas),
                           shards=controller.num_shards(),
                           shards_standby=len(controller.standby), gateway_waiting=waiting, expert_load=load,
                           expert_copies=copies, imbalance=imbalance, expert_bytes=controller.expert_bytes(),
                           predicted_expert_load=None if arriving is None or load is None else arriving_expert_load(
                               load, arriving.seen, arriving.seen_span_s, arriving.coming, arriving.coming_span_s))

    def _guarded(self, pool: str, act: Callable[[Decision], None], decision: Decision) -> None:
        started = time.monotonic()
        try:
            act(decision)
        except Exception as e:  # the next decision tries again; the failure is in the log and the history
            log.warning("autoscaler: acting on %s failed: %s", pool, e)
            failure = {"at_s": time.time(), "pool": pool, "error": f"{type(e).__name__}: {e}"[:300]}
            self.failures.appendleft(failure)
            self.controller.log_action("autoscale-failed", **failure)
        finally:
            log.info("autoscaler: %s acted in %.1f s", pool, time.monotonic() - started)

    def _request_capacity(self, decision: Decision) -> None:
        self.request_capacity(decision.replicas, decision.expert_shards, self.controller.busy_nodes())

    def _act_on_replicas(self, decision: Decision) -> None:
        change = _change_of(decision, "replicas", len(self.controller.serving_replicas()))
        if change is None:
            self.controller.set_standby_replicas(decision.standby_replicas)
            return
        self._starting = max(0, change.after - change.before)
        try:
            self.controller.scale_replicas_to(change.after)
        finally:
            self._starting = 0
        self.controller.set_standby_replicas(decision.standby_replicas)

    def _act_on_shards(self, decision: Decision) -> None:
        controller = self.controller
        change = _change_of(decision, "expert_shards", controller.num_shards())
        if change is not None and change.after >= 1:
            controller.scale_shards(change.after)
        controller.set_standby_shards(decision.standby_shards)
        if decision.replications:
            controller.rebalance("autoscaler: copies of hot experts "
                                 + ", ".join(f"L{c.layer}/E{c.expert}" for c in decision.replications[:8]))


def _change_of(decision: Decision, pool: str, size_now: int):
    """The decision's size change of `pool`, or None: none was decided, or the pool is no longer
    the size the decision was made at (a change in flight finished meanwhile; acting on it would
    undo that change, so the next decision, on fresh signals, says what to do)."""
    change = next((c for c in decision.changes if c.pool == pool and c.action in ("scale_up", "scale_down")), None)
    return change if change is not None and change.before == size_now else None
