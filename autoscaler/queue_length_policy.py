"""Ray Serve's default autoscaling policy (replica_queue_length_autoscaling_policy), rebuilt over the same
signals and state as ours for comparison: it scales the replicas only, from the requests running and
queued, and leaves the expert shards at their initial size.

Each round:
 - the ongoing requests (waiting + running) are averaged over look_back_period_s;
 - desired = that average / target_ongoing_requests (Serve's error ratio × running replicas), moved
   from the running replicas by the smoothing factor of its direction (a downscale smoothed to no change
   still removes one replica);
 - a change is made once wished continuously for upscale_delay_s (up) or downscale_delay_s (down;
   downscale_to_zero_delay_s from one replica to none); a change of direction restarts the delay;
 - with no replica running and a request ongoing, at least one replica is asked for at once;
 - min ≤ desired ≤ max (spec.pools.replicas)."""

import math
from dataclasses import replace

from moefleet.autoscaler.policy import Change, Decision, PolicyState
from moefleet.autoscaler.policy_file import AutoscalingPolicy
from moefleet.autoscaler.signals import AutoscalingContext


def decide(policy: AutoscalingPolicy, ctx: AutoscalingContext,
           state: PolicyState | None = None) -> tuple[Decision, PolicyState]:
    """One round of the queue-length policy, whatever spec.policy says (same signature as policy.decide)."""
    state = state or PolicyState()
    spec = policy.spec
    settings, pool = spec.queue_length, spec.pools.replicas
    now = ctx.now_s
    samples = tuple((t, v) for t, v in state.demand_samples if now - t < settings.look_back_period_s)
    samples += ((now, float(ctx.demand)),)
    ongoing = sum(v for _, v in samples) / len(samples)
    running, target = ctx.replicas.ready, ctx.replicas.size
    memory = state.replicas
    signals = {"ongoing_requests": round(ongoing, 3), "target_ongoing_requests": settings.target_ongoing_requests,
               "ready": running, "starting": ctx.replicas.starting}

    if running == 0 and ctx.demand > 0:
        wanted = max(math.ceil(settings.upscale_smoothing_factor), target)
        after = min(pool.max, max(pool.min, wanted))
        reason = f"cold start: {ctx.demand} requests and no replica running"
        memory = replace(memory, wish=0, wish_since_s=None)
    else:
        wanted = _smoothed(ongoing / settings.target_ongoing_requests, running, settings) if running else target
        wanted = min(pool.max, max(pool.min, wanted))
        after, memory = _delayed(wanted, target, now, memory, settings)
        reason = (f"{ongoing:.3g} ongoing requests (mean over {settings.look_back_period_s:g}s) for "
                  f"{settings.target_ongoing_requests:g} per replica: {wanted} replicas")
    changes = []
    if after != target:
        changes.append(Change("scale_up" if after > target else "scale_down", "replicas", target, after, reason,
                              signals))
        memory = replace(memory, last_change_s=now)
    shards = spec.pools.expert_shards
    decision = Decision(at_s=now, policy="queue_length", advisory=spec.mode == "advisory", replicas=after,
                        expert_shards=shards.initial_size if shards.enabled else ctx.expert_shards.size,
                        standby_replicas=0, standby_shards=0, changes=tuple(changes))
    return decision, replace(state, replicas=memory, demand_samples=samples)


def _smoothed(desired: float, running: int, settings) -> int:
    """Serve's scaling factors: move `smoothing factor × (desired - running)` from the running replicas."""
    delta = desired - running
    factor = settings.upscale_smoothing_factor if delta > 0 else settings.downscale_smoothing_factor
    scaled = math.ceil(running + factor * delta)
    if math.ceil(desired) < running and scaled == running:
        scaled -= 1  # a downscale smoothed to nothing would never happen
    return max(0, scaled)


def _delayed(wanted: int, target: int, now: float, memory, settings):
    """Serve's delay: a change is made once wished in the same direction for its whole delay."""
    direction = (wanted > target) - (wanted < target)
    if direction == 0:
        return target, replace(memory, wish=0, wish_since_s=None)
    since = memory.wish_since_s if memory.wish == direction and memory.wish_since_s is not None else now
    if direction > 0:
        delay = settings.upscale_delay_s
    elif target == 1 and settings.downscale_to_zero_delay_s is not None:
        delay = settings.downscale_to_zero_delay_s
    else:
        delay = settings.downscale_delay_s
        wanted = max(1, wanted) if target > 1 else wanted
    if now - since + 1e-6 >= delay:
        return wanted, replace(memory, wish=0, wish_since_s=None)
    return target, replace(memory, wish=direction, wish_since_s=since)
