"""The controller's autoscaler, over plain data: it turns what the controller observes each round
(the replicas' states, the gateways' waiting requests, the shards' load) into the policy's
AutoscalingContext, runs the pure `decide` (autoscaler/policy.py) every spec.interval_s, and keeps
the policy's state and a history of every decision that changed something, with its reasons and
the signals behind them. The controller acts on the decision (cluster/control/controller.py) and
persists `record()` in the state store, so a restarted controller continues where this one was."""

from collections import deque
from dataclasses import dataclass

import numpy as np

from moefleet.autoscaler.counter_total import CounterTotal
from moefleet.autoscaler.latency_window import LatencyWindow
from moefleet.autoscaler.policy import Decision, PolicyState, decide
from moefleet.autoscaler.policy_file import AutoscalingPolicy, dump_policy, parse_policy
from moefleet.autoscaler.signals import AutoscalingContext, PoolSignals
from moefleet.cluster.engine.serving_stats import INTER_TOKEN_LATENCY_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS
from moefleet.cluster.messages import ReplicaState

HISTORY = 500  # decisions kept in memory (the state store's decision log keeps more)


@dataclass(frozen=True)
class Observation:
    """One monitoring round, as the controller sees it. replicas: the serving replicas' states;
    starting/standby: units asked for and not serving yet, and warm ones; gateway_waiting:
    requests held at gateways because no replica serves (scale from zero); expert_load float64[L, E]
    over the load window, expert_copies int64[L, E] under the current placement."""

    now_s: float
    replicas: tuple[ReplicaState, ...]
    replicas_starting: int
    replicas_standby: int
    shards: int
    shards_standby: int
    gateway_waiting: int
    expert_load: np.ndarray | None
    expert_copies: np.ndarray | None
    imbalance: float
    expert_bytes: int
    predicted_expert_load: np.ndarray | None = None


class Autoscaling:
    def __init__(self, policy: AutoscalingPolicy, record: dict | None = None):
        """`policy`: the deployment's (its file). `record`: what record() gave a previous
        controller: its state carries on, and so does a policy set over the Admin API since, unless
        the deployment's own policy changed meanwhile (a new file, or a Helm upgrade, wins)."""
        self.configured = dump_policy(policy)
        same_file = record is not None and record.get("configured") == self.configured
        self.policy = parse_policy(record["policy"], "the stored autoscaling policy") if same_file else policy
        self.state = PolicyState.from_dict(record["state"]) if record and record.get("state") else PolicyState()
        self.history: deque[dict] = deque(maxlen=HISTORY)
        self.last: Decision | None = None
        keep_s = self.policy.spec.slo.window_s * 2
        self.ttft = LatencyWindow(TIME_TO_FIRST_TOKEN_BUCKETS, keep_s)
        self.itl = LatencyWindow(INTER_TOKEN_LATENCY_BUCKETS, keep_s)
        self._compute: deque[tuple[float, float]] = deque()  # (time, total shard compute seconds)
        self._compute_total = CounterTotal()  # across the replicas' counter restarts at placement changes
        self._decided_at: float | None = None

    def set_policy(self, policy: AutoscalingPolicy) -> None:
        """Hot reload: the new policy decides from the next round on, with the state kept."""
        self.policy = policy

    def record(self) -> dict:
        return {"policy": dump_policy(self.policy), "configured": self.configured, "state": self.state.to_dict()}

    def observe(self, seen: Observation) -> None:
        """Every monitoring round: the latency and compute windows move on."""
        self.ttft.add(seen.now_s, _summed([r.ttft_counts for r in seen.replicas], len(TIME_TO_FIRST_TOKEN_BUCKETS) + 1))
        self.itl.add(seen.now_s, _summed([r.itl_counts for r in seen.replicas], len(INTER_TOKEN_LATENCY_BUCKETS) + 1))
        self._compute.append((seen.now_s, self._compute_total.add(
            {r.replica_id: sum(r.shard_compute_s) for r in seen.replicas})))
        while len(self._compute) > 2 and self._compute[1][0] <= seen.now_s - self.policy.spec.slo.window_s:
            self._compute.popleft()

    def due(self, now_s: float) -> bool:
        return self._decided_at is None or now_s - self._decided_at >= self.policy.spec.interval_s

    def context(self, seen: Observation) -> AutoscalingContext:
        spec = self.policy.spec
        quantile = spec.slo.percentile / 100
        ttft = self.ttft.quantile(quantile, spec.slo.window_s, seen.now_s)
        itl = self.itl.quantile(quantile, spec.slo.window_s, seen.now_s)
        served = self.ttft.snapshots
        rate = 0.0
        if len(served) >= 2 and served[-1].at_s > served[0].at_s:
            rate = (sum(served[-1].counts) - sum(served[0].counts)) / (served[-1].at_s - served[0].at_s)
        utilization = 0.0
        if len(self._compute) >= 2 and seen.shards and self._compute[-1][0] > self._compute[0][0]:
            (t0, c0), (t1, c1) = self._compute[0], self._compute[-1]
            utilization = min(1.0, max(0.0, (c1 - c0) / (t1 - t0) / seen.shards))
        ready = [r for r in seen.replicas if r.status == "serving"]
        return AutoscalingContext(
            now_s=seen.now_s,
            replicas=PoolSignals(ready=len(ready), starting=seen.replicas_starting, standby=seen.replicas_standby),
            expert_shards=PoolSignals(ready=seen.shards, standby=seen.shards_standby),
            waiting_requests=sum(r.waiting for r in seen.replicas) + seen.gateway_waiting,
            running_requests=sum(r.running for r in seen.replicas),
            kv_cache_usage=float(np.mean([r.kv_cache_usage for r in ready])) if ready else 0.0,
            shard_utilization=utilization, expert_load_imbalance=max(1.0, seen.imbalance),
            ttft_ms=None if ttft is None else ttft * 1e3, itl_ms=None if itl is None else itl * 1e3,
            request_rate=rate, expert_load=seen.expert_load, predicted_expert_load=seen.predicted_expert_load,
            expert_copies=seen.expert_copies, expert_bytes=seen.expert_bytes)

    def decide(self, seen: Observation) -> Decision:
        """The policy's decision now; one that changes something goes into the history."""
        decision, self.state = decide(self.policy, self.context(seen), self.state)
        self._decided_at, self.last = seen.now_s, decision
        if decision.changes:
            self.history.appendleft(decision.to_dict())
        return decision

    def status(self, actual: dict[str, int]) -> dict:
        """Current (actual) and desired sizes per pool, the policy, and the last decision."""
        last = self.last
        return {"policy": self.policy.metadata.name, "mode": self.policy.spec.mode, "decides": self.policy.spec.policy,
                "actual": actual,
                "desired": {"replicas": last.replicas, "expert_shards": last.expert_shards} if last else None,
                "standby": {"replicas": last.standby_replicas, "expert_shards": last.standby_shards} if last else None,
                "last_decision": last.to_dict() if last else None}


def _summed(counts: list[tuple[int, ...]], buckets: int) -> tuple[int, ...]:
    """Per-bucket sums over the replicas (a replica that reports none counts nothing)."""
    total = [0] * buckets
    for row in counts:
        for i, count in enumerate(row[:buckets]):
            total[i] += count
    return tuple(total)
