"""Acting on the autoscaler's decisions: the controller's own operations, run one change at a time
on a thread of their own so that the monitor keeps watching while a replica or a shard starts.

- replicas: scale_replicas (new ones start, surplus ones drain: no request is dropped; to zero
  when the policy scales to zero, and back from zero when a gateway holds a request);
- expert shards: scale_shards through a placement epoch (only where the controller owns shards);
- standby shards: the warm count the decision asks for;
- copies of hot experts: a rebalance with spare slots (the load planner copies hot experts);
- capacity: the cluster is asked for the nodes the new sizes need (`request_capacity`: Ray's
  autoscaler SDK, or the KubeRay actuator on Kubernetes; nothing on a fixed local cluster).

Every decision that changes something is logged to the state store's decision log with its
reasons and signals (what `moefleet admin autoscaler history` shows)."""

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from moefleet.autoscaler.policy import Decision
from moefleet.autoscaler.policy_file import AutoscalingPolicy, parse_policy
from moefleet.cluster.control.autoscaling import Autoscaling, Observation
from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.messages import ReplicaState

log = logging.getLogger(__name__)


class AutoscalingActuator:
    def __init__(self, controller, policy: AutoscalingPolicy, stored: dict | None,
                 request_capacity: Callable[[int, int], None] | None = None):
        self.controller = controller
        self.autoscaling = Autoscaling(policy, stored)
        self.request_capacity = request_capacity
        self.gateway_waiting: dict[str, tuple[int, float]] = {}  # gateway id -> (requests held, when told)
        self._acting: threading.Thread | None = None
        self._starting = 0  # replicas being started by the change in flight

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
                  "standby_shards": len(self.controller.standby)}
        return {**self.autoscaling.status(actual), "acting": self.acting()}

    def history(self, limit: int = 100) -> list[dict]:
        return list(self.autoscaling.history)[:limit]

    def acting(self) -> bool:
        return self._acting is not None and self._acting.is_alive()

    def gauges(self) -> dict[str, dict[str, float]]:
        """desired and actual size per pool, for Prometheus."""
        last = self.autoscaling.last
        actual = {"replicas": len(self.controller.serving_replicas()), "expert_shards": self.controller.num_shards()}
        desired = {"replicas": last.replicas, "expert_shards": last.expert_shards} if last else dict(actual)
        return {"desired": desired, "actual": actual}

    # ----- each monitoring round -----
    def round(self, now_s: float, states: list[ReplicaState]) -> Decision | None:
        seen = self._observation(now_s, states)
        self.autoscaling.observe(seen)
        if not self.autoscaling.due(now_s):
            return None
        decision = self.autoscaling.decide(seen)
        self.controller.persist_autoscaler(self.autoscaling.record())
        if decision.changes:
            self.controller.log_action("autoscale", advisory=decision.advisory,
                                       changes=[c.to_dict() for c in decision.changes])
        if not decision.advisory and not self.acting():
            self._acting = threading.Thread(target=self._act, args=(decision,), name="moefleet-autoscaler",
                                            daemon=True)
            self._acting.start()
        return decision

    def _observation(self, now_s: float, states: list[ReplicaState]) -> Observation:
        controller = self.controller
        serving = set(controller.serving_replicas())
        waiting = sum(count for count, at in self.gateway_waiting.values() if now_s - at < 10 * controller.interval_s())
        load, copies, imbalance = controller.expert_load_view()
        return Observation(now_s=now_s, replicas=tuple(s for s in states if s.replica_id in serving),
                           replicas_starting=self._starting, replicas_standby=0, shards=controller.num_shards(),
                           shards_standby=len(controller.standby), gateway_waiting=waiting, expert_load=load,
                           expert_copies=copies, imbalance=imbalance, expert_bytes=controller.expert_bytes(),
                           predicted_expert_load=None)

    def _act(self, decision: Decision) -> None:
        controller, started = self.controller, time.monotonic()
        try:
            if self.request_capacity is not None:
                self.request_capacity(decision.replicas, decision.expert_shards)
            serving = len(controller.serving_replicas())
            if decision.replicas != serving:
                self._starting = max(0, decision.replicas - serving)
                controller.scale_replicas_to(decision.replicas)
            if controller.owns_shards() and decision.expert_shards >= 1 and \
                    decision.expert_shards != controller.num_shards():
                controller.scale_shards(decision.expert_shards)
            if controller.owns_shards():
                controller.set_standby_shards(decision.standby_shards)
            if decision.replications and controller.owns_shards():
                controller.rebalance("autoscaler: copies of hot experts "
                                     + ", ".join(f"L{c.layer}/E{c.expert}" for c in decision.replications[:8]))
        except Exception as e:  # the next decision tries again; the failure is in the log and the history
            log.warning("autoscaler: acting on the decision failed: %s", e)
            controller.log_action("autoscale-failed", error=f"{type(e).__name__}: {e}"[:300])
        finally:
            self._starting = 0
            log.info("autoscaler: acted in %.1f s", time.monotonic() - started)


def copies_of(placement, moe_layers: list[int]) -> np.ndarray:
    """int64[L, E]: copies of each expert of each MoE layer under `placement`."""
    copies = np.zeros((len(moe_layers), placement.num_experts), dtype=np.int64)
    for row, layer in enumerate(moe_layers):
        for experts in placement.shard_experts[layer]:
            copies[row, list(experts)] += 1
    return copies
