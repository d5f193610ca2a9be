"""Trace replay: a discrete-event simulation of a deployment serving a request trace while the autoscaling
policy (the same `decide` the controller runs) resizes it, against a performance profile.

What is modelled:
  - arrivals at the trace's times × time_scale, lengths clipped to the profile's context (counted);
  - the gateway sends each request to the ready replica with the fewest outstanding tokens, or holds it
    while there is none (scale-from-zero: it waits, never fails);
  - each replica batches continuously: it admits waiting requests while a sequence slot is free and the
    KV cache can hold the request's prompt and output, then runs steps of one decode token per running
    sequence plus prefill chunks up to the token budget; a step's time comes from the profile (drawn
    around it with the profile's step_spread, seeded); a run of pure-decode steps with nothing arriving
    in between is computed at once (the same result without the spread, fewer events);
  - expert shards (when the policy scales a shard pool): the experts' share of a step becomes the hottest
    shard's, its rows spread over the ready shards × the expert-load imbalance of the current placement
    (planned by the placement planner from the expert load when the shards or the copies change), slowed
    by 1 / (1 - utilization) for rows of other replicas queued ahead (utilization capped at 0.9);
  - every spec.interval_s the policy decides from signals read off the simulation; in active mode its
    decision is carried out: new units join after their start time (from standby when one is warm),
    removed replicas drain (no new requests; they finish theirs), removed shards go at once, expert
    copies add spare slots to the next placement;
  - cost: unit-seconds of every unit started, starting, serving, draining or kept warm.
What is not: preemption (admission reserves the whole request's KV), prefix caching, network delays
beyond the profile's remote step overhead, the controller's own rebalance rule.

Expert load: each request carries an expert mix (float64[L, E], the share of its tokens' rows per expert,
e.g. from a routing trace's sequences); without mixes the load is uniform."""

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from moefleet.autoscaler.performance_model import PerformanceProfile
from moefleet.autoscaler.policy import Decision, PolicyState, decide
from moefleet.autoscaler.policy_file import AutoscalingPolicy
from moefleet.autoscaler.signals import AutoscalingContext, PoolSignals
from moefleet.cluster.placement.planner import PlacementLimits, imbalance, plan_placement
from moefleet.cluster.routing.trace import RoutingTrace
from moefleet.cluster.workload.request_trace import TraceEntry, clip_to_context

MAX_UTILIZATION_FOR_SLOWDOWN = 0.9
SERIES = ("t", "request_rate", "waiting", "running", "replicas", "replicas_desired", "replicas_starting",
          "expert_shards", "expert_shards_desired", "kv_cache_usage", "shard_utilization", "imbalance",
          "ttft_ms", "itl_ms")


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """One replay. Per request (R, in arrival order): ttft_ms, itl_ms float64[R] (NaN: unfinished; itl NaN for
    single-token outputs). series: one float64[T] column per SERIES name, one row per policy round."""

    policy: str
    slo_ttft_ms: float
    slo_itl_ms: float
    slo_attainment: float
    ttft_ms: np.ndarray
    itl_ms: np.ndarray
    replica_seconds: float
    shard_seconds: float
    decisions: tuple[Decision, ...]  # the rounds that changed something
    clipped: int
    duration_s: float
    series: dict[str, np.ndarray]
    profile_source: str

    @property
    def met_slo(self) -> np.ndarray:
        """bool[R]: TTFT and ITL both within target (a single-token output has no ITL to miss)."""
        ttft_ok = self.ttft_ms <= self.slo_ttft_ms
        itl_ok = np.where(np.isnan(self.itl_ms), ~np.isnan(self.ttft_ms), self.itl_ms <= self.slo_itl_ms)
        return ttft_ok & itl_ok

    def summary(self) -> dict:
        finished = ~np.isnan(self.ttft_ms)
        itl = self.itl_ms[~np.isnan(self.itl_ms)]

        def percentiles(values: np.ndarray) -> dict:
            if not len(values):
                return {"p50": None, "p95": None, "p99": None}
            return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)}

        return {"policy": self.policy, "requests": int(len(self.ttft_ms)), "unfinished": int((~finished).sum()),
                "clipped": self.clipped, "duration_s": round(self.duration_s, 3),
                "slo_attainment": round(float(self.met_slo.mean()), 4) if len(self.ttft_ms) else None,
                "slo_attainment_target": self.slo_attainment,
                "replica_seconds": round(self.replica_seconds, 1), "shard_seconds": round(self.shard_seconds, 1),
                "decisions": len(self.decisions),
                "peak_replicas": int(self.series["replicas"].max(initial=0)),
                "peak_expert_shards": int(self.series["expert_shards"].max(initial=0)),
                "ttft_ms": percentiles(self.ttft_ms[finished]), "itl_ms": percentiles(itl),
                "profile": self.profile_source}


@dataclass(eq=False)
class _Request:
    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    mix: int
    prefilled: int = 0
    generated: int = 0
    first_token_s: float | None = None
    overhead_s: float = 0.0  # the serving path's time beyond the engine, added to the first token as the client sees it
    finish_s: float | None = None

    @property
    def remaining(self) -> int:
        return self.prompt_len - self.prefilled + self.output_len - self.generated

    @property
    def context(self) -> int:
        return self.prefilled + self.generated


@dataclass(eq=False)
class _Replica:
    ready_at: float
    state: str = "starting"  # "starting", "ready", "draining"
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    reserved: int = 0  # KV tokens reserved by running requests
    busy: bool = False  # a step in flight
    outstanding: int = 0  # tokens its requests still have to prefill or generate

    def take(self, request: _Request) -> None:
        self.waiting.append(request)
        self.outstanding += request.remaining

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running


@dataclass
class _Pool:
    """One pool's units by state. starting / warming: times each becomes ready / warm."""

    starting: list = field(default_factory=list)
    ready: int = 0
    warming: list = field(default_factory=list)
    warm: int = 0

    @property
    def standby(self) -> int:
        return len(self.warming) + self.warm


def simulate(policy: AutoscalingPolicy, entries: list[TraceEntry], profile: PerformanceProfile,
             time_scale: float = 1.0, expert_mixes: np.ndarray | None = None,
             mix_of_request: np.ndarray | None = None, max_duration_s: float | None = None,
             seed: int = 0) -> SimulationResult:
    """Replay `entries` (arrivals × time_scale) through `policy` against `profile`.

    expert_mixes: float64[M, L, E], each request's share of routed rows per expert (rows of a layer sum to 1;
      L and E need not match the profile's); mix_of_request: int64[R] (default: request i gets mix i % M).
    max_duration_s: stop then, counting unfinished requests as missing the SLO (default: the last arrival
      plus an hour).
    seed: of the step times drawn from the profile's step_spread (the same seed, the same replay)."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if not entries:
        raise ValueError("entries: the trace has no requests")
    return _Simulation(policy, entries, profile, time_scale, expert_mixes, mix_of_request, max_duration_s,
                       seed).run()


def expert_mixes_from_routing(trace: RoutingTrace) -> np.ndarray:
    """float64[S, L, E]: each of the routing trace's sequences' routed rows per expert and MoE layer (counts;
    simulate normalises them), one expert mix per sequence."""
    counts = np.zeros((trace.num_sequences, trace.num_layers, trace.num_experts))
    chosen = trace.experts >= 0
    event = np.broadcast_to(np.arange(trace.num_events)[:, None], trace.experts.shape)[chosen]
    np.add.at(counts, (trace.seq[event], trace.layer[event], trace.experts[chosen]), 1.0)
    return counts


class _Simulation:
    def __init__(self, policy, entries, profile, time_scale, expert_mixes, mix_of_request, max_duration_s, seed):
        self.policy, self.profile, self.spec = policy, profile, policy.spec
        self.rng = np.random.default_rng(seed)
        self.requests, self.clipped = [], 0
        mixes = (np.full((1, profile.num_moe_layers, profile.num_experts), 1.0 / profile.num_experts)
                 if expert_mixes is None else np.asarray(expert_mixes, dtype=np.float64))
        if mixes.ndim != 3 or (mixes < 0).any():
            raise ValueError(f"expert_mixes must be float64[M, L, E] >= 0, got shape {mixes.shape}")
        self.mixes = mixes / np.maximum(mixes.sum(axis=2, keepdims=True), 1e-12)
        mix_ids = (np.arange(len(entries)) % len(mixes) if mix_of_request is None
                   else np.asarray(mix_of_request, dtype=np.int64))
        if mix_ids.shape != (len(entries),) or mix_ids.min() < 0 or mix_ids.max() >= len(mixes):
            raise ValueError(f"mix_of_request must be int64[{len(entries)}] in [0, {len(mixes)}), got {mix_ids}")
        for i, entry in enumerate(sorted(entries, key=lambda e: e.arrival_s)):
            fitted = clip_to_context(entry.prompt_len, entry.output_len, profile.max_model_len)
            self.clipped += fitted != (entry.prompt_len, entry.output_len)
            self.requests.append(_Request(i, entry.arrival_s * time_scale, fitted[0], fitted[1], int(mix_ids[i])))
        last_arrival = self.requests[-1].arrival_s
        self.end_limit = max_duration_s if max_duration_s is not None else last_arrival + 3600.0
        self.events, self.sequence = [], 0
        self.gateway = deque()
        self.replicas: list[_Replica] = []
        self.replica_standby = _Pool()
        self.shards = _Pool()
        self.shards_enabled = self.spec.pools.expert_shards.enabled
        self.unit_seconds = {"replicas": 0.0, "expert_shards": 0.0}
        self.cost_at = 0.0
        self.next_arrival = 0
        self.finished = 0
        self.state: PolicyState | None = None
        self.decisions: list[Decision] = []
        self.series = {name: [] for name in SERIES}
        window = self.spec.slo.window_s
        self.window = window
        self.ttft_samples, self.itl_samples, self.arrival_times = deque(), deque(), deque()
        self.shard_busy = deque()  # (time, busy seconds of the mean shard)
        self.tokens_by_mix = deque()  # (time, float64[M] rows of tokens by mix)
        self.pending_tokens = [0.0] * len(self.mixes)  # rows of tokens run since the last round, by mix
        self.imbalance = 1.0
        self.recent_utilization = 0.0
        self.extra_copies = np.zeros(self.mixes.shape[1], dtype=np.int64)  # copies asked for, per layer
        self.placement = None
        self.copies = np.ones(self.mixes.shape[1:], dtype=np.int64)
        self.next_tick = 0.0
        self._start_initial()

    # ---------------------------------------------------------------- the clock and the cost

    def _push(self, at: float, kind: str, data=None) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, self.sequence, kind, data))

    def _account(self, now: float) -> None:
        """Unit-seconds up to `now` of every unit that holds resources."""
        elapsed = now - self.cost_at
        if elapsed > 0:
            replicas = len(self.replicas) + self.replica_standby.standby
            shards = len(self.shards.starting) + self.shards.ready + self.shards.standby
            self.unit_seconds["replicas"] += elapsed * replicas
            self.unit_seconds["expert_shards"] += elapsed * shards
            self.cost_at = now

    def _start_initial(self) -> None:
        replicas = self.spec.pools.replicas.initial_size
        for _ in range(replicas):
            self.replicas.append(_Replica(ready_at=0.0, state="ready"))
        if self.shards_enabled:
            self.shards.ready = max(1, self.spec.pools.expert_shards.initial_size)
            self._replan()

    def run(self) -> SimulationResult:
        if self.requests:
            self._push(self.requests[0].arrival_s, "arrival")
        self._push(0.0, "tick")
        now = 0.0
        while self.events and self.finished < len(self.requests):
            now, _, kind, data = heapq.heappop(self.events)
            if now > self.end_limit:
                now = self.end_limit
                break
            self._account(now)
            if kind == "arrival":
                self._arrive(now)
            elif kind == "step":
                self._end_step(now, *data)
            elif kind == "tick":
                self._tick(now)
            elif kind == "replica_ready":
                self._replica_ready(now, data)
            elif kind == "pool_ready":
                self._pool_ready(now, *data)
        self._account(now)
        ttft = np.array([(r.first_token_s - r.arrival_s + r.overhead_s) * 1000 if r.first_token_s is not None
                         else np.nan for r in self.requests])
        itl = np.array([(r.finish_s - r.first_token_s) * 1000 / (r.output_len - 1)
                        if r.finish_s is not None and r.output_len > 1 else np.nan for r in self.requests])
        slo = self.spec.slo
        return SimulationResult(
            policy=self.spec.policy, slo_ttft_ms=slo.ttft_ms, slo_itl_ms=slo.itl_ms, slo_attainment=slo.attainment,
            ttft_ms=ttft, itl_ms=itl, replica_seconds=self.unit_seconds["replicas"],
            shard_seconds=self.unit_seconds["expert_shards"], decisions=tuple(self.decisions), clipped=self.clipped,
            duration_s=now, series={k: np.asarray(v, dtype=np.float64) for k, v in self.series.items()},
            profile_source=self.profile.source)

    # ---------------------------------------------------------------- requests and replicas

    def _arrive(self, now: float) -> None:
        request = self.requests[self.next_arrival]
        self.next_arrival += 1
        if self.next_arrival < len(self.requests):
            self._push(self.requests[self.next_arrival].arrival_s, "arrival")
        self.arrival_times.append(now)
        serving = [rep for rep in self.replicas if rep.state == "ready"]
        if not serving:
            self.gateway.append(request)
            return
        replica = min(serving, key=lambda rep: rep.outstanding)
        replica.take(request)
        if not replica.busy:
            self._start_step(replica, now)

    def _horizon(self) -> float:
        """The next moment anything outside a replica may change its batch."""
        upcoming = self.requests[self.next_arrival].arrival_s if self.next_arrival < len(self.requests) else math.inf
        return min(upcoming, self.next_tick)

    def _start_step(self, replica: _Replica, now: float) -> None:
        profile = self.profile
        while replica.waiting and len(replica.running) < profile.max_num_seqs:
            request = replica.waiting[0]
            need = request.prompt_len + request.output_len
            if replica.reserved + need > profile.kv_cache_tokens:
                break
            replica.waiting.popleft()
            replica.running.append(request)
            replica.reserved += need
        decodes = [r for r in replica.running if r.prefilled == r.prompt_len]
        budget = profile.max_num_batched_tokens - len(decodes)
        chunks = []
        for request in replica.running:
            if budget <= 0:
                break
            if request.prefilled < request.prompt_len:
                chunk = min(budget, request.prompt_len - request.prefilled)
                chunks.append((request, chunk))
                budget -= chunk
        tokens = len(decodes) + sum(chunk for _, chunk in chunks)
        if tokens == 0:
            replica.busy = False
            return
        batch = decodes + [r for r, _ in chunks]
        context = sum(r.context for r in batch) / len(batch) + 1
        seconds, busy = profile.step_time(tokens, context, self.shards.ready if self.shards_enabled else 0,
                                          self.imbalance, self._slowdown())
        sharing = profile.core_slowdown(1 + sum(rep.busy for rep in self.replicas if rep is not replica),
                                        self._starting_cores())
        seconds, busy = seconds * sharing, busy * sharing
        steps = 1
        if not chunks:
            fits = int((self._horizon() - now) // seconds)
            steps = max(1, min(min(r.output_len - r.generated for r in decodes), fits))
        if profile.step_spread > 0:  # a run of steps: their mean's spread (the log-normal's, roughly)
            seconds *= math.exp(profile.step_spread * self.rng.standard_normal() / math.sqrt(steps))
        pending = self.pending_tokens
        for request in decodes:
            pending[request.mix] += steps
        for request, chunk in chunks:
            pending[request.mix] += chunk
        replica.outstanding -= tokens + len(decodes) * (steps - 1)
        if busy:
            self.shard_busy.append((now, busy * steps))
        replica.busy = True
        self._push(now + seconds * steps, "step", (replica, decodes, chunks, steps))

    def _end_step(self, now: float, replica: _Replica, decodes: list, chunks: list, steps: int) -> None:
        for request, chunk in chunks:
            request.prefilled += chunk
            if request.prefilled == request.prompt_len:
                request.generated = 1
                request.first_token_s = now
                # The gateway and the client work through every stream in flight, on the cores the replicas
                # share: their part of a first token grows with the streams and slows as a step does.
                in_flight = self.next_arrival - self.finished
                request.overhead_s = self.profile.request_overhead_time(in_flight) * self.profile.core_slowdown(
                    sum(rep.busy for rep in self.replicas), self._starting_cores())
                self.ttft_samples.append((now, (now - request.arrival_s + request.overhead_s) * 1000))
        for request in decodes:
            request.generated += steps
        for request in decodes + [r for r, _ in chunks]:
            if request.first_token_s is not None and request.generated >= request.output_len:
                request.finish_s = now
                self.finished += 1
                replica.running.remove(request)
                replica.reserved -= request.prompt_len + request.output_len
                if request.output_len > 1:
                    self.itl_samples.append((now, (now - request.first_token_s) * 1000 / (request.output_len - 1)))
        self._start_step(replica, now)
        if replica.state == "draining" and replica.idle:
            self.replicas.remove(replica)

    def _replica_ready(self, now: float, replica: _Replica) -> None:
        if replica not in self.replicas:
            return  # cancelled meanwhile
        replica.state = "ready"
        while self.gateway:
            target = min((rep for rep in self.replicas if rep.state == "ready"), key=lambda rep: rep.outstanding)
            target.take(self.gateway.popleft())
            if not target.busy:
                self._start_step(target, now)

    # ---------------------------------------------------------------- shards, standby and placement

    def _pool_ready(self, now: float, pool: str, what: str) -> None:
        units = self.shards if pool == "expert_shards" else self.replica_standby
        times = units.starting if what == "starting" else units.warming
        if now not in times:
            return  # cancelled meanwhile
        times.remove(now)
        if what == "starting":
            units.ready += 1
            self._replan()
        else:
            units.warm += 1

    def _starting_cores(self) -> float:
        """Cores the units starting (and those warming up for standby) keep busy."""
        profile = self.profile
        replicas = sum(rep.state == "starting" for rep in self.replicas) + len(self.replica_standby.warming)
        shards = len(self.shards.starting) + len(self.shards.warming)
        return replicas * profile.replica_start.cores + shards * profile.shard_start.cores

    def _slowdown(self) -> float:
        return 1.0 / (1.0 - min(self.recent_utilization, MAX_UTILIZATION_FOR_SLOWDOWN))

    def _expert_load(self, now: float) -> np.ndarray:
        """float64[L, E] rows routed to each expert over the window."""
        while self.tokens_by_mix and self.tokens_by_mix[0][0] < now - self.window:
            self.tokens_by_mix.popleft()
        tokens = sum((v for _, v in self.tokens_by_mix), np.zeros(len(self.mixes)))
        return np.tensordot(tokens, self.mixes, axes=1) * self.profile.top_k

    def _replan(self) -> None:
        """A fresh placement over the ready shards, with the spare slots the expert copies asked for."""
        shards = self.shards.ready
        if not self.shards_enabled or shards < 1:
            return
        load = self._expert_load(self.cost_at)
        if load.sum() <= 0:
            load = np.ones_like(load)
        layers, experts = load.shape
        spare = -(-int(self.extra_copies.max()) // shards) if shards > 1 else 0
        limits = PlacementLimits(slots_per_shard=(-(-experts // shards) + spare,) * shards,
                                 max_copies=self.spec.expert_replication.max_copies)
        self.placement = plan_placement(load, None, list(range(layers)), limits)
        copies = np.zeros((layers, experts), dtype=np.int64)
        for layer, per_shard in self.placement.shard_experts.items():
            for held in per_shard:
                np.add.at(copies[layer], list(held), 1)
        self.copies = copies
        self.imbalance = imbalance(load, self.placement, list(range(layers)))

    # ---------------------------------------------------------------- the policy's round

    def _window_percentile(self, samples: deque, now: float) -> float | None:
        while samples and samples[0][0] < now - self.window:
            samples.popleft()
        if not samples:
            return None
        return float(np.percentile([v for _, v in samples], self.spec.slo.percentile))

    def _context(self, now: float) -> AutoscalingContext:
        profile = self.profile
        serving = [rep for rep in self.replicas if rep.state == "ready"]
        starting = [rep for rep in self.replicas if rep.state == "starting"]
        active = [rep for rep in self.replicas if rep.state != "starting"]
        waiting = len(self.gateway) + sum(len(rep.waiting) for rep in active)
        running = sum(len(rep.running) for rep in active)
        kv = (sum(min(1.0, sum(r.context for r in rep.running) / profile.kv_cache_tokens) for rep in serving)
              / len(serving)) if serving else 0.0
        while self.shard_busy and self.shard_busy[0][0] < now - self.window:
            self.shard_busy.popleft()
        utilization = min(1.0, sum(b for _, b in self.shard_busy) / self.window) if self.shards_enabled else 0.0
        interval = self.spec.interval_s
        self.recent_utilization = min(1.0, sum(b for t, b in self.shard_busy if t >= now - interval) / interval)
        while self.arrival_times and self.arrival_times[0] < now - self.window:
            self.arrival_times.popleft()
        observed = self._expert_load(now)
        if self.placement is not None and observed.sum() > 0:
            self.imbalance = imbalance(observed, self.placement, list(range(observed.shape[0])))
        outstanding = np.zeros(len(self.mixes))
        for rep in active:
            for request in list(rep.waiting) + rep.running:
                outstanding[request.mix] += request.remaining
        for request in self.gateway:
            outstanding[request.mix] += request.remaining
        predicted = np.tensordot(outstanding, self.mixes, axes=1) * profile.top_k
        return AutoscalingContext(
            now_s=now,
            replicas=PoolSignals(ready=len(serving), starting=len(starting), standby=self.replica_standby.warm,
                                 cold_start_s=profile.replica_start.cold_s,
                                 standby_start_s=profile.replica_start.standby_s),
            expert_shards=PoolSignals(ready=self.shards.ready, starting=len(self.shards.starting),
                                      standby=self.shards.warm, cold_start_s=profile.shard_start.cold_s,
                                      standby_start_s=profile.shard_start.standby_s),
            waiting_requests=waiting, running_requests=running, kv_cache_usage=kv,
            shard_utilization=utilization,
            expert_load_imbalance=max(1.0, self.imbalance),
            ttft_ms=self._window_percentile(self.ttft_samples, now),
            itl_ms=self._window_percentile(self.itl_samples, now),
            request_rate=len(self.arrival_times) / max(interval, min(now, self.window)),
            expert_load=observed, predicted_expert_load=predicted, expert_copies=self.copies,
            expert_bytes=profile.expert_bytes)

    def _tick(self, now: float) -> None:
        self.tokens_by_mix.append((now, np.array(self.pending_tokens)))
        self.pending_tokens = [0.0] * len(self.mixes)
        ctx = self._context(now)
        decision, self.state = decide(self.policy, ctx, self.state)
        if decision.changes:
            self.decisions.append(decision)
        if not decision.advisory:
            self._apply(decision, now)
        self._record(now, ctx, decision)
        self.next_tick = now + self.spec.interval_s
        self._push(self.next_tick, "tick")

    def _record(self, now: float, ctx: AutoscalingContext, decision: Decision) -> None:
        row = {"t": now, "request_rate": ctx.request_rate, "waiting": ctx.waiting_requests,
               "running": ctx.running_requests, "replicas": ctx.replicas.ready,
               "replicas_desired": decision.replicas, "replicas_starting": ctx.replicas.starting,
               "expert_shards": ctx.expert_shards.ready, "expert_shards_desired": decision.expert_shards,
               "kv_cache_usage": ctx.kv_cache_usage, "shard_utilization": ctx.shard_utilization,
               "imbalance": ctx.expert_load_imbalance,
               "ttft_ms": np.nan if ctx.ttft_ms is None else ctx.ttft_ms,
               "itl_ms": np.nan if ctx.itl_ms is None else ctx.itl_ms}
        for name in SERIES:
            self.series[name].append(row[name])

    def _apply(self, decision: Decision, now: float) -> None:
        self._resize_replicas(decision.replicas, now)
        self._keep_standby(self.replica_standby, decision.standby_replicas, self.profile.replica_start.cold_s,
                           "replicas", now)
        if self.shards_enabled:
            self._resize_shards(max(1, decision.expert_shards), now)
            self._keep_standby(self.shards, decision.standby_shards, self.profile.shard_start.cold_s,
                               "expert_shards", now)
            if decision.replications:
                np.add.at(self.extra_copies, [copy.layer for copy in decision.replications], 1)
                self._replan()

    def _take_standby(self, units: _Pool, now: float) -> float | None:
        """Ready time of a unit taken from standby (a warm one first), None when there is none."""
        start = (self.profile.replica_start if units is self.replica_standby else self.profile.shard_start).standby_s
        if units.warm:
            units.warm -= 1
            return now + start
        if units.warming:
            warm_at = units.warming.pop(units.warming.index(min(units.warming)))
            return max(warm_at, now) + start
        return None

    def _resize_replicas(self, desired: int, now: float) -> None:
        live = [rep for rep in self.replicas if rep.state in ("starting", "ready")]
        for rep in sorted((rep for rep in self.replicas if rep.state == "draining"), key=lambda rep: -rep.outstanding):
            if len(live) >= desired:
                break
            rep.state = "ready"  # a draining replica comes back at once
            live.append(rep)
        while len(live) < desired:
            ready_at = self._take_standby(self.replica_standby, now)
            ready_at = now + self.profile.replica_start.cold_s if ready_at is None else ready_at
            replica = _Replica(ready_at=ready_at)
            self.replicas.append(replica)
            live.append(replica)
            self._push(ready_at, "replica_ready", replica)
        surplus = len(live) - desired
        for rep in sorted((rep for rep in live if rep.state == "starting"), key=lambda rep: -rep.ready_at):
            if surplus <= 0:
                break
            self.replicas.remove(rep)
            surplus -= 1
        for rep in sorted((rep for rep in live if rep.state == "ready"), key=lambda rep: rep.outstanding):
            if surplus <= 0:
                break
            rep.state = "draining"
            if rep.idle:
                self.replicas.remove(rep)
            surplus -= 1

    def _resize_shards(self, desired: int, now: float) -> None:
        units = self.shards
        while len(units.starting) + units.ready < desired:
            ready_at = self._take_standby(units, now)
            ready_at = now + self.profile.shard_start.cold_s if ready_at is None else ready_at
            units.starting.append(ready_at)
            self._push(ready_at, "pool_ready", ("expert_shards", "starting"))
        surplus = len(units.starting) + units.ready - desired
        if surplus > 0:
            cancelled = sorted(units.starting)[len(units.starting) - min(surplus, len(units.starting)):]
            for at in cancelled:
                units.starting.remove(at)
            removed = surplus - len(cancelled)
            if removed:
                units.ready -= removed
                self._replan()

    def _keep_standby(self, units: _Pool, target: int, cold_s: float, pool: str, now: float) -> None:
        while units.standby < target:
            units.warming.append(now + cold_s)
            self._push(now + cold_s, "pool_ready", (pool, "warming"))
        while units.standby > target:
            if units.warming:
                units.warming.remove(max(units.warming))
            else:
                units.warm -= 1
