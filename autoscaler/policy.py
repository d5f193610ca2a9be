"""The autoscaling policy: `decide(policy, ctx, state) -> (Decision, PolicyState)`, a pure function of the
policy file, the signals at ctx.now_s and its own memory (no clock, no I/O), so the controller and the
simulator run the same code and a restarted controller carries on from the state it kept in the store.

Each round, for each pool (model replicas; expert shards):
 1. recommend: every target signal says how many units would carry the load predicted for when a unit
    asked for now would join (Kubernetes HPA's ceil(units × observed / target), computed from totals
    so starting units are not counted twice); ratios within the tolerance say "as many as now"; the
    largest wins. The waiting queue lags capacity (queued requests stay at the replica holding them): it
    asks for more units only while none are starting, never for fewer. So does latency: a TTFT or ITL
    percentile over its share of the SLO asks for more units of one pool only, the pool under the most
    load pressure (when both are alike, the one quicker to start), and only while none of its units are
    starting.
 2. stabilize: scaling up takes the smallest recommendation over the up window, scaling down the
    largest over the down window (HPA's behavior), so a noisy steady load does not flap;
 3. limit: at most max_step units per decision; no change in a direction within its cooldown of the
    pool's last change;
 4. consolidate: before scaling down, the survivors must carry the (predicted, if higher) load under
    headroom × each target and the latency must be within its share of the SLO; else fewer go;
 5. bound: min ≤ size ≤ max. Replicas go to zero only after scale_to_zero.idle_s without a request,
    and come back from zero at once (no window, no cooldown) as soon as a request waits.
Expert replication copies experts that carried more than trigger.load_ratio × their layer's mean load
per copy for the whole window, hottest first, within the migration budget.

`spec.policy: queue_length` hands the round to Ray Serve's policy (queue_length_policy.py)."""

import math
from dataclasses import dataclass, field, replace

import numpy as np

from moefleet.autoscaler import predictor
from moefleet.autoscaler.policy_file import AutoscalingPolicy, AutoscalingSpec
from moefleet.autoscaler.predictor import TrendState
from moefleet.autoscaler.signals import POOLS, AutoscalingContext

HOUR_S = 3600.0
LATENCY_SIGNALS = ("ttft", "itl")


@dataclass(frozen=True)
class Change:
    """One action of a decision (or one held back), and why: `signals` are the observations behind it."""

    action: str  # "scale_up", "scale_down", "standby", "replicate"
    pool: str  # "replicas" or "expert_shards"
    before: int
    after: int
    reason: str
    signals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"action": self.action, "pool": self.pool, "before": self.before, "after": self.after,
                "reason": self.reason, "signals": dict(self.signals)}

    @classmethod
    def from_dict(cls, data: dict) -> "Change":
        return cls(**data)


@dataclass(frozen=True)
class ExpertCopy:
    """One more copy of expert `expert` of MoE layer row `layer` (the row of ctx.expert_load)."""

    layer: int
    expert: int
    load_ratio: float  # its load per copy / its layer's mean load, when decided
    copies: int  # copies it will have


@dataclass(frozen=True)
class Decision:
    """Desired pool sizes and standby counts, the expert copies to make, every change with its reason
    (`changes`) and the recommended changes held back, with theirs (`held`). An advisory decision is the
    same decision, to be logged and not acted on."""

    at_s: float
    policy: str  # "moefleet" or "queue_length"
    advisory: bool
    replicas: int
    expert_shards: int
    standby_replicas: int
    standby_shards: int
    replications: tuple[ExpertCopy, ...] = ()
    changes: tuple[Change, ...] = ()
    held: tuple[Change, ...] = ()

    def desired(self, pool: str) -> int:
        return getattr(self, pool)

    def standby(self, pool: str) -> int:
        return self.standby_replicas if pool == "replicas" else self.standby_shards

    def to_dict(self) -> dict:
        return {"at_s": self.at_s, "policy": self.policy, "advisory": self.advisory, "replicas": self.replicas,
                "expert_shards": self.expert_shards, "standby_replicas": self.standby_replicas,
                "standby_shards": self.standby_shards,
                "replications": [vars(copy) for copy in self.replications],
                "changes": [c.to_dict() for c in self.changes], "held": [c.to_dict() for c in self.held]}

    @classmethod
    def from_dict(cls, data: dict) -> "Decision":
        return cls(**{**data, "replications": tuple(ExpertCopy(**c) for c in data["replications"]),
                      "changes": tuple(map(Change.from_dict, data["changes"])),
                      "held": tuple(map(Change.from_dict, data["held"]))})


@dataclass(frozen=True)
class PoolMemory:
    """What the policies remember of one pool. recommendations: (time, size) within the longest
    stabilization window, oldest first. wish / wish_since_s: the queue-length policy's pending direction
    (+1 up, -1 down, 0 none) and since when it has been wished."""

    recommendations: tuple[tuple[float, int], ...] = ()
    last_change_s: float | None = None
    standby: int | None = None
    wish: int = 0
    wish_since_s: float | None = None

    def to_dict(self) -> dict:
        return {"recommendations": [list(r) for r in self.recommendations], "last_change_s": self.last_change_s,
                "standby": self.standby, "wish": self.wish, "wish_since_s": self.wish_since_s}

    @classmethod
    def from_dict(cls, data: dict) -> "PoolMemory":
        return cls(**{**data, "recommendations": tuple((t, int(n)) for t, n in data["recommendations"])})


@dataclass(frozen=True)
class PolicyState:
    """The policies' memory between rounds; to_dict() is JSON-able, for the state store.
    hot_since: (layer, expert, since) of experts over the replication trigger; copies_made_at: times of
    the expert copies made in the last hour; demand_samples: (time, waiting + running) over the
    queue-length policy's look-back period."""

    replicas: PoolMemory = PoolMemory()
    expert_shards: PoolMemory = PoolMemory()
    trend: TrendState = TrendState()
    idle_since_s: float | None = None
    hot_since: tuple[tuple[int, int, float], ...] = ()
    copies_made_at: tuple[float, ...] = ()
    demand_samples: tuple[tuple[float, float], ...] = ()

    def pool(self, name: str) -> PoolMemory:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"replicas": self.replicas.to_dict(), "expert_shards": self.expert_shards.to_dict(),
                "trend": self.trend.to_dict(), "idle_since_s": self.idle_since_s,
                "hot_since": [list(h) for h in self.hot_since], "copies_made_at": list(self.copies_made_at),
                "demand_samples": [list(s) for s in self.demand_samples]}

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyState":
        return cls(replicas=PoolMemory.from_dict(data["replicas"]),
                   expert_shards=PoolMemory.from_dict(data["expert_shards"]),
                   trend=TrendState.from_dict(data["trend"]), idle_since_s=data["idle_since_s"],
                   hot_since=tuple((int(la), int(e), t) for la, e, t in data["hot_since"]),
                   copies_made_at=tuple(data["copies_made_at"]),
                   demand_samples=tuple((t, v) for t, v in data["demand_samples"]))


def decide(policy: AutoscalingPolicy, ctx: AutoscalingContext,
           state: PolicyState | None = None) -> tuple[Decision, PolicyState]:
    """One round of the policy the file names (spec.policy). `state` None: the first round."""
    state = state or PolicyState()
    if policy.spec.policy == "queue_length":
        # Imported here: queue_length_policy builds the Decision and PolicyState defined in this module.
        from moefleet.autoscaler.queue_length_policy import decide as decide_queue_length

        return decide_queue_length(policy, ctx, state)
    spec = policy.spec
    trend = predictor.observe(spec.predictor, state.trend, ctx)
    idle_since_s = (state.idle_since_s if state.idle_since_s is not None else ctx.now_s) if ctx.demand == 0 else None

    needs = {pool: _needs(spec, ctx, pool, predictor.load_factor(spec.predictor, trend, ctx, pool))
             for pool in POOLS}
    _assign_latency(spec, ctx, needs)
    changes, held, desired, memories = [], [], {}, {}
    for pool in POOLS:
        size, memory, pool_changes, pool_held = _scale_pool(spec, ctx, state.pool(pool), pool, needs[pool],
                                                            idle_since_s)
        desired[pool], memories[pool] = size, memory
        changes += pool_changes
        held += pool_held
    standby = {}
    for pool in POOLS:
        settings = getattr(spec.pools, pool)
        standby[pool] = min(settings.standby, max(0, settings.max - desired[pool]))
        if standby[pool] != (memories[pool].standby or 0):
            changes.append(Change("standby", pool, memories[pool].standby or 0, standby[pool],
                                  f"keep {standby[pool]} warm (standby {settings.standby}, at most max - desired)"))
        memories[pool] = replace(memories[pool], standby=standby[pool])
    copies, hot_since, copies_made_at, copy_changes, copy_held = _replicate(spec, ctx, state)
    decision = Decision(at_s=ctx.now_s, policy="moefleet", advisory=spec.mode == "advisory",
                        replicas=desired["replicas"], expert_shards=desired["expert_shards"],
                        standby_replicas=standby["replicas"], standby_shards=standby["expert_shards"],
                        replications=copies, changes=tuple(changes + copy_changes), held=tuple(held + copy_held))
    return decision, PolicyState(replicas=memories["replicas"], expert_shards=memories["expert_shards"], trend=trend,
                                 idle_since_s=idle_since_s, hot_since=hot_since, copies_made_at=copies_made_at,
                                 demand_samples=state.demand_samples)


@dataclass(frozen=True)
class _Need:
    """What one signal asks of a pool: `units` needed (fractional) to hold it under target (None: no opinion),
    with the observation and the target it was read from. `up_only`: a signal that can ask for more units
    but says nothing about fewer (latency is not proportional to units)."""

    signal: str
    observed: float
    target: float
    units: float | None
    up_only: bool = False


def _needs(spec: AutoscalingSpec, ctx: AutoscalingContext, pool: str, factor: float) -> list[_Need]:
    """Every load signal of `pool` that is turned on, with the units it asks for (load × predictor factor)."""
    signals = ctx.pool(pool)
    targets = getattr(spec.pools, pool).targets
    ready = signals.ready
    if pool == "replicas":
        loads = {"waiting_requests": (ctx.waiting_requests, ctx.waiting_requests),
                 "running_requests": (ctx.demand, ctx.demand),
                 "kv_cache_usage": (ctx.kv_cache_usage, ctx.kv_cache_usage * ready)}
    else:
        # The hottest shard carries mean × imbalance: against imbalance × the utilization target.
        hottest = ctx.shard_utilization * ctx.expert_load_imbalance
        loads = {"shard_utilization": (ctx.shard_utilization, ctx.shard_utilization * ready),
                 "expert_load_imbalance": (ctx.expert_load_imbalance,
                                           hottest * ready / (targets.shard_utilization or 1.0))}
    needs = []
    for name, (observed, total) in loads.items():
        target = getattr(targets, name)
        if target is None:
            continue
        if name == "waiting_requests":
            # A queue lags capacity like latency does: requests queued at busy replicas stay there while new
            # ones start, so the queue asks for more only when nothing is starting, and never for fewer.
            units = total / target if not signals.starting else None
            needs.append(_Need(name, observed, target, units, up_only=True))
        else:
            needs.append(_Need(name, observed, target, total * factor / target))
    return needs


def _assign_latency(spec: AutoscalingSpec, ctx: AutoscalingContext, needs: dict[str, list[_Need]]) -> None:
    """A latency percentile over its share of the SLO asks one pool for more units: of the pools that target
    it, the one under the most load pressure, or, when their pressures are alike, the one quicker to start;
    nothing while that pool's new units start."""
    for latency in LATENCY_SIGNALS:
        observed = getattr(ctx, f"{latency}_ms")
        if observed is None:
            continue
        candidates = []
        for pool in POOLS:
            settings = getattr(spec.pools, pool)
            fraction = getattr(settings.targets, f"{latency}_slo_fraction")
            if fraction is None or (pool == "expert_shards" and not spec.pools.expert_shards.enabled):
                continue
            target = fraction * getattr(spec.slo, f"{latency}_ms")
            ratio = observed / target
            units = ctx.pool(pool).size * ratio if ratio > 1 + settings.targets.tolerance else None
            candidates.append((pool, _Need(f"{latency}_ms", observed, target, units, up_only=True)))
        breached = [pool for pool, need in candidates if need.units is not None]
        owner = breached[0] if len(breached) == 1 else None
        if len(breached) > 1:
            pressure = {pool: _pressure(needs[pool], ctx.pool(pool).size) for pool in breached}
            low, high = sorted(pressure.values())
            if high > low * (1 + spec.pools.replicas.targets.tolerance):
                owner = max(pressure, key=pressure.get)
            else:
                owner = min(pressure, key=lambda pool: ctx.pool(pool).next_start_s)
        for pool, need in candidates:
            # Latency lags capacity: while the owner's new units start, it says nothing of what they will do.
            asks = pool == owner and not ctx.pool(pool).starting
            needs[pool].append(need if asks or need.units is None else replace(need, units=None))


def _pressure(needs: list[_Need], size: int) -> float:
    """The pool's largest load ratio (units needed / units there)."""
    units = [n.units for n in needs if n.units is not None and not n.up_only]
    if not units:
        return 0.0
    return max(units) / size if size else math.inf


def _recommend(needs: list[_Need], size: int, tolerance: float) -> tuple[int, _Need | None]:
    """The units the most demanding signal asks for (ratios within 1 ± tolerance ask for `size`), and that
    signal; (size, None) when no signal has an opinion."""
    best, driver = None, None
    for need in needs:
        if need.units is None:
            continue
        ratio = need.units / size if size else (math.inf if need.units > 0 else 1.0)
        units = size if abs(ratio - 1) <= tolerance else math.ceil(need.units - 1e-9)
        if need.up_only and units <= size:
            continue  # says nothing about fewer units
        if best is None or units > best:
            best, driver = units, need
    return (size, None) if best is None else (best, driver)


def _signals(needs: list[_Need], ctx: AutoscalingContext, pool: str) -> dict:
    observed = {n.signal: round(n.observed, 6) for n in needs}
    asked = {f"units_for_{n.signal}": round(n.units, 3) for n in needs if n.units is not None}
    signals = ctx.pool(pool)
    return {**observed, **asked, "ready": signals.ready, "starting": signals.starting, "standby": signals.standby}


def _scale_pool(spec: AutoscalingSpec, ctx: AutoscalingContext, memory: PoolMemory, pool: str, needs: list[_Need],
                idle_since_s: float | None) -> tuple[int, PoolMemory, list[Change], list[Change]]:
    """The desired size of one pool: recommend, stabilize, step, cool down, consolidate, bound."""
    settings = getattr(spec.pools, pool)
    size = ctx.pool(pool).size
    now = ctx.now_s
    signals = _signals(needs, ctx, pool)
    if pool == "expert_shards" and not settings.enabled:
        return size, memory, [], []
    scale_to_zero = pool == "replicas" and settings.scale_to_zero.enabled
    floor = max(settings.min, 1) if pool == "replicas" else settings.min

    if scale_to_zero and size == 0:
        if ctx.waiting_requests == 0:
            return 0, memory, [], []
        recommended, _ = _recommend(needs, 0, settings.targets.tolerance)
        after = min(settings.max, max(1, recommended))
        reason = f"scale from zero: {ctx.waiting_requests} requests wait for a replica"
        return after, replace(memory, recommendations=((now, after),), last_change_s=now), [
            Change("scale_up", pool, 0, after, reason, signals)], []

    recommended, driver = _recommend(needs, size, settings.targets.tolerance)
    idle_for = now - idle_since_s if idle_since_s is not None else 0.0
    to_zero = scale_to_zero and idle_since_s is not None and idle_for >= settings.scale_to_zero.idle_s
    recommended = 0 if to_zero else min(settings.max, max(floor, recommended))
    horizon = max(settings.scale_up.stabilization_window_s, settings.scale_down.stabilization_window_s)
    history = tuple((t, n) for t, n in memory.recommendations if now - t < horizon)
    memory = replace(memory, recommendations=history + ((now, recommended),))

    up = min([n for t, n in history if now - t < settings.scale_up.stabilization_window_s] + [recommended])
    down = max([n for t, n in history if now - t < settings.scale_down.stabilization_window_s] + [recommended])
    held = []
    if to_zero:  # idle_s was the window
        after, direction = 0, "scale_down"
    elif size < up:
        after, direction = min(up, size + settings.max_step), "scale_up"
    elif size > down:
        after, direction = max(down, size - settings.max_step), "scale_down"
    else:
        after, direction = size, None
        if recommended != size:
            window = settings.scale_up if recommended > size else settings.scale_down
            held.append(Change("scale_up" if recommended > size else "scale_down", pool, size, recommended,
                               f"within the {window.stabilization_window_s:g}s stabilization window", signals))
    if direction is not None and memory.last_change_s is not None and not to_zero:
        cooldown = (settings.scale_up if direction == "scale_up" else settings.scale_down).cooldown_s
        if now - memory.last_change_s < cooldown:
            held.append(Change(direction, pool, size, after, f"cooling down: last change "
                               f"{now - memory.last_change_s:g}s ago, cooldown {cooldown:g}s", signals))
            after = size
    if after < size and after > 0 and settings.consolidation.enabled:
        survivors, blocker = _consolidate(spec, ctx, pool, needs, after, size)
        if survivors != after:
            held.append(Change("scale_down", pool, size, after, f"consolidation: {blocker}", signals))
            after = survivors
    bounded = min(settings.max, max(0 if to_zero else settings.min, after))
    if after != bounded:
        reason = f"bounds: min {settings.min}, max {settings.max}"
    elif to_zero:
        reason = f"scale to zero: no request for {idle_for:g}s (idle_s {settings.scale_to_zero.idle_s:g})"
    else:
        reason = _reason(driver, needs, size, recommended, bounded)
    if bounded == size:
        return size, memory, [], held
    change = Change("scale_up" if bounded > size else "scale_down", pool, size, bounded, reason, signals)
    return bounded, replace(memory, last_change_s=now), [change], held


def _reason(driver: _Need | None, needs: list[_Need], size: int, recommended: int, after: int) -> str:
    step = f"; {after} for now (max_step, window)" if after != recommended else ""
    if driver is None or recommended < size:
        return (f"every signal under target: {recommended} units would carry the load "
                f"({_summary(needs)}){step}")
    return (f"{driver.signal} {driver.observed:g} against target {driver.target:g}: {recommended} units needed"
            f"{step}")


def _summary(needs: list[_Need]) -> str:
    return ", ".join(f"{n.signal} {n.observed:g}/{n.target:g}" for n in needs) or "no signal"


def _consolidate(spec: AutoscalingSpec, ctx: AutoscalingContext, pool: str, needs: list[_Need], after: int,
                 size: int) -> tuple[int, str]:
    """The fewest survivors, from `after` up to `size`, that would carry every load signal under
    headroom × target (the load spread over them, the predicted load when higher); (size, why) when
    latency is over its share of the SLO already, since fewer units would only add to it."""
    settings = getattr(spec.pools, pool)
    headroom = settings.consolidation.headroom
    for need in needs:
        if need.up_only and need.observed > need.target:
            return size, f"{need.signal} {need.observed:g} is over its target {need.target:g}"
    blocker = ""
    for survivors in range(after, size):
        over = [n for n in needs if not n.up_only and n.units is not None and
                n.units * n.target / survivors > headroom * n.target]
        if not over:
            return survivors, blocker
        worst = over[0]
        blocker = (f"{survivors} units would carry {worst.units * worst.target / survivors:.3g} "
                   f"{worst.signal} each, over {headroom:g} x target {worst.target:g}")
    return size, blocker


def _replicate(spec: AutoscalingSpec, ctx: AutoscalingContext, state: PolicyState):
    """Expert copies to make: experts over the trigger for the whole window, hottest first, within the
    migration budget. Returns (copies, hot_since, copies_made_at, changes, held)."""
    settings = spec.expert_replication
    recent = tuple(t for t in state.copies_made_at if ctx.now_s - t < HOUR_S)
    if not settings.enabled or ctx.expert_load is None:
        return (), (), recent, [], []
    predicted = settings.trigger.source == "predicted" and ctx.predicted_expert_load is not None
    load = np.asarray(ctx.predicted_expert_load if predicted else ctx.expert_load, dtype=np.float64)
    copies = np.ones(load.shape, dtype=np.int64) if ctx.expert_copies is None else np.asarray(ctx.expert_copies)
    mean = load.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mean > 0, load / copies / mean, 0.0)
    # A shard holds at most one copy of an expert: with fewer shards than max_copies, the shards are the cap
    # (one shard: nothing to copy to), so no copy is asked for that no placement could hold.
    shards = ctx.expert_shards.ready
    most = min(settings.max_copies, shards) if shards >= 1 else settings.max_copies
    hot = (ratio > settings.trigger.load_ratio) & (copies < most)
    since = {(layer, expert): t for layer, expert, t in state.hot_since}
    hot_since = {(int(la), int(e)): since.get((int(la), int(e)), ctx.now_s) for la, e in zip(*np.nonzero(hot))}
    due = sorted((key for key, t in hot_since.items() if ctx.now_s - t >= settings.window_s),
                 key=lambda key: -ratio[key])
    allowance = settings.budget.moves_per_hour - len(recent)
    if settings.budget.bytes_per_change is not None and ctx.expert_bytes > 0:
        allowance = min(allowance, settings.budget.bytes_per_change // ctx.expert_bytes)
    chosen, waiting = due[:max(0, allowance)], due[max(0, allowance):]
    made = tuple(ExpertCopy(la, e, round(float(ratio[la, e]), 4), int(copies[la, e]) + 1) for la, e in chosen)
    source = "predicted" if predicted else "observed"
    changes = [Change("replicate", "expert_shards", int(copies[c.layer, c.expert]), c.copies,
                      f"layer {c.layer} expert {c.expert}: {source} load per copy {c.load_ratio:g}x its layer's "
                      f"mean for {settings.window_s:g}s (trigger {settings.trigger.load_ratio:g}x)",
                      {"layer": c.layer, "expert": c.expert, "load_ratio": c.load_ratio}) for c in made]
    held = [Change("replicate", "expert_shards", int(copies[la, e]), int(copies[la, e]) + 1,
                   f"migration budget: {len(recent)} copies in the last hour of {settings.budget.moves_per_hour}, "
                   f"{settings.budget.bytes_per_change} bytes per change of {ctx.expert_bytes}-byte experts",
                   {"layer": la, "expert": e, "load_ratio": round(float(ratio[la, e]), 4)}) for la, e in waiting]
    for key in chosen:
        del hot_since[key]  # judged afresh with its new copy
    return (made, tuple((la, e, t) for (la, e), t in sorted(hot_since.items())),
            recent + (ctx.now_s,) * len(made), changes, held)
