"""Golden cases of the autoscaling policy (autoscaler/policy.py), its predictor and the queue-length policy
beside it: every expected size is worked out by hand in the comments from the policy's rule
(units a signal needs = total load / target per unit, HPA-style, the largest wins)."""

import dataclasses
import json
import random

import numpy as np
import pytest

from moefleet.autoscaler import predictor
from moefleet.autoscaler.policy import Decision, PolicyState, decide
from moefleet.autoscaler.policy_file import parse_policy
from moefleet.autoscaler.queue_length_policy import decide as decide_queue_length
from moefleet.autoscaler.signals import AutoscalingContext, PoolSignals

HEADER = "apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: golden}\n"
# Only the running-requests signal (32 per replica), no windows, no cooldowns: each case turns on what it tests.
PLAIN_REPLICAS = ("targets: {waiting_requests: null, kv_cache_usage: null, ttft_slo_fraction: null, "
                  "itl_slo_fraction: null}, scale_up: {stabilization_window_s: 0, cooldown_s: 0}, "
                  "scale_down: {stabilization_window_s: 0, cooldown_s: 0}")


def policy(replicas: str = "", spec: str = ""):
    return parse_policy(HEADER + f"spec: {{pools: {{replicas: {{{PLAIN_REPLICAS}{', ' if replicas else ''}"
                                 f"{replicas}}}}}{', ' if spec else ''}{spec}}}\n")


def ctx(now: float = 0.0, ready: int = 1, running: int = 0, waiting: int = 0, **kwargs) -> AutoscalingContext:
    return AutoscalingContext(now_s=now, replicas=PoolSignals(ready=ready, cold_start_s=30.0, standby_start_s=2.0),
                              expert_shards=kwargs.pop("expert_shards", PoolSignals(ready=0)),
                              running_requests=running, waiting_requests=waiting, **kwargs)


def run(p, contexts, state=None) -> list[Decision]:
    decisions = []
    for c in contexts:
        decision, state = decide(p, c, state)
        decisions.append(decision)
    return decisions


# ---------------------------------------------------------------- bounds and steps


@pytest.mark.parametrize("running, ready, expected", [
    (100, 1, 4),  # 100 / 32 = 3.125 units -> 4, within max 4 and step 4
    (1000, 1, 4),  # 31.25 units -> 32, capped at max 4
    (0, 3, 2),  # no load: 0 units -> min 2
    (0, 1, 2),  # below min already: bounds lift it to 2
])
def test_the_size_stays_within_min_and_max(running, ready, expected):
    p = policy("min: 2, max: 4, max_step: 4")
    decision, _ = decide(p, ctx(ready=ready, running=running))
    assert decision.replicas == expected
    assert decision.changes[0].pool == "replicas" and decision.changes[0].after == expected


def test_a_step_adds_at_most_max_step_units():
    # 320 / 32 = 10 units needed from 1: max_step 2 allows 3 now, 5 in the next round.
    p = policy("max: 20, max_step: 2")
    first, state = decide(p, ctx(running=320))
    second, _ = decide(p, ctx(now=5, ready=3, running=320), state)
    assert (first.replicas, second.replicas) == (3, 5)
    assert first.changes[0].reason == ("running_requests 320 against target 32: 10 units needed; "
                                       "3 for now (max_step, window)")


def test_ratios_within_the_tolerance_change_nothing():
    # 3 replicas, 100 requests: 3.125 units, ratio 1.04 within 1 ± 0.1: stay at 3 (no ceil to 4).
    decision, _ = decide(policy("max: 8"), ctx(ready=3, running=100))
    assert decision.replicas == 3 and decision.changes == ()


def test_the_most_demanding_signal_wins():
    # running + waiting 64/32 = 2 units; waiting 30/8 = 3.75 units; KV 0.9 × 1 / 0.8 = 1.125 units -> 4, driven
    # by the queue.
    p = parse_policy(HEADER + "spec: {pools: {replicas: {max: 8, max_step: 8}}}")
    decision, _ = decide(p, ctx(running=34, waiting=30, kv_cache_usage=0.9))
    assert decision.replicas == 4
    assert decision.changes[0].reason.startswith("waiting_requests 30 against target 8: 4 units needed")
    assert decision.changes[0].signals["units_for_kv_cache_usage"] == pytest.approx(1.125)
    # With a replica starting, the queue (stuck at the busy replica) asks nothing: 2 units, already there.
    starting = AutoscalingContext(now_s=0, replicas=PoolSignals(ready=1, starting=1), expert_shards=PoolSignals(0),
                                  running_requests=34, waiting_requests=30, kv_cache_usage=0.9)
    decision, _ = decide(p, starting)
    assert decision.replicas == 2 and decision.changes == ()


# ---------------------------------------------------------------- hysteresis


def noisy_steady_load(seconds: int, seed: int = 0) -> list[int]:
    """Running requests every 5 s, uniform in [55, 100]: 1.7 to 3.1 replicas' worth at 32 each."""
    rng = random.Random(seed)
    return [rng.randint(55, 100) for _ in range(0, seconds, 5)]


def changes_under(p, loads: list[int], start: int = 3) -> list[int]:
    """Sizes over the rounds, the controller carrying out every decision at once."""
    state, size, sizes = None, start, []
    for i, running in enumerate(loads):
        decision, state = decide(p, ctx(now=5.0 * i, ready=size, running=running), state)
        size = decision.replicas
        sizes.append(size)
    return sizes


def test_no_flapping_on_a_noisy_steady_load():
    loads = noisy_steady_load(1200)
    # Without windows or consolidation the size follows the noise: 55 -> ceil(1.72) = 2, 100 -> ceil(3.125)
    # = 4 from 2 (ratio 1.56), so it flaps between 2, 3 and 4.
    flapping = changes_under(policy("max: 8, consolidation: {enabled: false}"), loads)
    flaps = sum(a != b for a, b in zip(flapping, flapping[1:]))
    assert flaps > 20
    # With the default 120 s down window, a scale-down needs 24 rounds in a row all recommending fewer, which
    # the noise never gives (about half the rounds ask for 3 or more); and 3 -> 4 needs > 3.3 units
    # (tolerance), more than 100 requests give: the size holds at 3 all along.
    steady = changes_under(policy("max: 8, scale_down: {stabilization_window_s: 120, cooldown_s: 60}"), loads)
    assert set(steady) == {3}


def test_scale_down_waits_for_the_whole_window():
    # Load drops from 96 (3 units) to 20 (1 unit) after t=-5; the down window is 30 s: rounds at 0..20 still
    # see the 3 recommended at t=-5 (less than 30 s ago); at t=25 it is 30 s old and out of the window.
    p = policy("scale_down: {stabilization_window_s: 30, cooldown_s: 0}")
    _, state = decide(p, ctx(now=-5, ready=3, running=96))
    sizes = [d.replicas for d in run(p, [ctx(now=t, ready=3, running=20) for t in range(0, 30, 5)], state)]
    assert sizes == [3, 3, 3, 3, 3, 1]


def test_cooldown_holds_a_second_change():
    # Up cooldown 15 s: a scale-up at t=0 (1 -> 2), at t=5 and t=10 another (2 -> 3) is held, at t=15 made.
    p = policy("max: 8, max_step: 1, scale_up: {stabilization_window_s: 0, cooldown_s: 15}")
    decisions = run(p, [ctx(now=0, ready=1, running=96)] + [ctx(now=t, ready=2, running=96) for t in (5, 10, 15)])
    assert [d.replicas for d in decisions] == [2, 2, 2, 3]
    assert decisions[1].held[0].reason == "cooling down: last change 5s ago, cooldown 15s"


# ---------------------------------------------------------------- consolidation


def test_consolidation_keeps_units_the_survivors_could_not_carry():
    # 3 replicas, 60 requests: 60 / 32 = 1.875 -> 2 recommended; 2 survivors would carry 30 each, over
    # 0.9 × 32 = 28.8: the scale-down is held at 3.
    decision, _ = decide(policy(), ctx(ready=3, running=60))
    assert decision.replicas == 3 and decision.changes == ()
    assert decision.held[0].reason == ("consolidation: 2 units would carry 30 running_requests each, "
                                       "over 0.9 x target 32")
    # 56 requests: 28 each <= 28.8, so 3 -> 2 goes ahead.
    decision, _ = decide(policy(), ctx(ready=3, running=56))
    assert decision.replicas == 2 and decision.changes[0].action == "scale_down"


def test_consolidation_lets_fewer_go_when_all_would_be_too_many():
    # 6 replicas, 60 requests: 2 recommended, max_step 4 allows 2, but 2 would carry 30 > 28.8: 3 go instead.
    decision, _ = decide(policy("max: 8, max_step: 4"), ctx(ready=6, running=60))
    assert decision.replicas == 3


def test_no_scale_down_while_latency_is_over_its_share_of_the_slo():
    # TTFT p95 1700 ms against 0.8 × 2000 = 1600 ms: fewer replicas would only make it worse.
    p = policy("targets: {waiting_requests: null, kv_cache_usage: null, itl_slo_fraction: null}")
    decision, _ = decide(p, ctx(ready=3, running=20, ttft_ms=1700.0))
    assert decision.replicas == 3 and "ttft_ms 1700 is over its target 1600" in decision.held[0].reason


# ---------------------------------------------------------------- scale to zero and back


def test_scale_to_zero_after_idle_and_back_at_once_for_a_waiting_request():
    p = policy("min: 0, scale_to_zero: {enabled: true, idle_s: 60}, "
               "scale_up: {stabilization_window_s: 60, cooldown_s: 300}")
    idle = run(p, [ctx(now=t, ready=1) for t in range(0, 65, 5)])
    # Idle since t=0: the floor is 1 replica until idle_s has passed, then 0.
    assert [d.replicas for d in idle] == [1] * 12 + [0]
    assert idle[-1].changes[0].reason == "scale to zero: no request for 60s (idle_s 60)"
    _, state = decide(p, ctx(now=60, ready=1))
    nobody, state = decide(p, ctx(now=65, ready=0), state)
    assert nobody.replicas == 0
    # A request arrives: one replica at once, despite the 60 s up window and the 300 s cooldown.
    first, state = decide(p, ctx(now=70, ready=0, waiting=1, request_rate=0.2), state)
    assert first.replicas == 1
    assert first.changes[0].reason == "scale from zero: 1 requests wait for a replica"
    # While it starts (starting counts toward the size) nothing more is asked.
    starting = AutoscalingContext(now_s=75, replicas=PoolSignals(ready=0, starting=1), expert_shards=PoolSignals(0),
                                  waiting_requests=1, request_rate=0.2)
    again, _ = decide(p, starting, state)
    assert again.replicas == 1 and again.changes == ()


# ---------------------------------------------------------------- which pool: latency and start cost


SHARDS = ("expert_shards: {min: 1, max: 8, max_step: 8, targets: {shard_utilization: 0.7, itl_slo_fraction: 0.8}, "
          "scale_up: {stabilization_window_s: 0, cooldown_s: 0}}")


def shard_ctx(utilization: float, running: int, shard_start_s: float = 20.0) -> AutoscalingContext:
    return AutoscalingContext(now_s=0.0, replicas=PoolSignals(ready=2, cold_start_s=60.0),
                              expert_shards=PoolSignals(ready=2, cold_start_s=shard_start_s),
                              running_requests=running, shard_utilization=utilization, itl_ms=400.0)


def itl_policy():
    return parse_policy(HEADER + "spec: {pools: {replicas: {max: 8, max_step: 8, targets: {waiting_requests: null, "
                                 "kv_cache_usage: null, ttft_slo_fraction: null, itl_slo_fraction: 0.8}, "
                                 f"scale_up: {{stabilization_window_s: 0, cooldown_s: 0}}}}, {SHARDS}}}}}")


def test_an_itl_breach_goes_to_the_pool_under_more_pressure():
    # ITL 400 ms against 0.8 × 200 = 160 ms: ratio 2.5, 2 units × 2.5 = 5 for the pool that takes it.
    # Shards at 0.84 / 0.7 = 1.2 of target; replicas 40 / (2 × 32) = 0.625: the shards take it.
    decision, _ = decide(itl_policy(), shard_ctx(utilization=0.84, running=40))
    assert (decision.replicas, decision.expert_shards) == (2, 5)
    # Replicas at 96 / 64 = 1.5, shards 1.2: the replicas take it.
    decision, _ = decide(itl_policy(), shard_ctx(utilization=0.84, running=96))
    assert (decision.replicas, decision.expert_shards) == (5, 3)  # the shards' own 2 × 1.2 = 2.4 -> 3


def test_when_the_pressures_are_alike_the_quicker_to_start_takes_a_latency_breach():
    # Both at 1.0 (44.8 / 64 = 0.7 vs 0.49 / 0.7 = 0.7): the shards start in 20 s, replicas in 60 s.
    decision, _ = decide(itl_policy(), shard_ctx(utilization=0.49, running=45))
    assert (decision.replicas, decision.expert_shards) == (2, 5)
    decision, _ = decide(itl_policy(), shard_ctx(utilization=0.49, running=45, shard_start_s=90.0))
    assert (decision.replicas, decision.expert_shards) == (5, 2)


# ---------------------------------------------------------------- standby and replication


def test_standby_targets_and_their_change_are_in_the_decision():
    p = policy("max: 4, standby: 2")
    decision, state = decide(p, ctx(ready=3, running=96))
    # max 4 - desired 3 leaves room for 1 warm replica of the 2 asked.
    assert decision.standby_replicas == 1
    assert [(c.action, c.before, c.after) for c in decision.changes] == [("standby", 0, 1)]
    again, _ = decide(p, ctx(now=5, ready=3, running=96), state)
    assert again.changes == ()


def replication_policy(budget: str = "{moves_per_hour: 12}"):
    return parse_policy(HEADER + "spec: {pools: {expert_shards: {min: 2, max: 4}}, expert_replication: "
                                 f"{{enabled: true, window_s: 10, trigger: {{load_ratio: 2}}, budget: {budget}}}}}\n")


def replication_ctx(now: float, load: list[list[float]]) -> AutoscalingContext:
    return AutoscalingContext(now_s=now, replicas=PoolSignals(ready=1), expert_shards=PoolSignals(ready=2),
                              shard_utilization=0.7, expert_load=np.array(load), expert_bytes=100)


def test_an_expert_hot_for_the_whole_window_is_copied_hottest_first():
    # Layer 0: mean 4, expert 0 at 10 = 2.5x; layer 1: mean 3, expert 2 at 9 = 3x; hot from t=0, due at t=10.
    load = [[10, 2, 2, 2], [1, 1, 9, 1]]
    decisions = run(replication_policy(), [replication_ctx(t, load) for t in (0, 5, 10)])
    assert decisions[0].replications == decisions[1].replications == ()
    copies = decisions[2].replications
    assert [(c.layer, c.expert, c.load_ratio, c.copies) for c in copies] == [(1, 2, 3.0, 2), (0, 0, 2.5, 2)]
    assert decisions[2].changes[0].reason == ("layer 1 expert 2: observed load per copy 3x its layer's mean "
                                              "for 10s (trigger 2x)")


def test_no_copy_is_asked_that_the_shards_could_not_hold():
    load = [[10, 2, 2, 2], [1, 1, 9, 1]]
    # One shard: a second copy of an expert has nowhere to go; nothing turns hot, nothing spends the budget.
    one = [dataclasses.replace(replication_ctx(t, load), expert_shards=PoolSignals(ready=1)) for t in (0, 10)]
    decisions = run(replication_policy(), one)
    assert [d.replications for d in decisions] == [(), ()]
    assert [c for d in decisions for c in d.changes + d.held if c.action == "replicate"] == []
    # Two shards, expert 2 of layer 1 already on both: only layer 0's expert 0 gets a copy.
    two = [dataclasses.replace(replication_ctx(t, load), expert_copies=np.array([[1, 1, 1, 1], [1, 1, 2, 1]]))
           for t in (0, 10)]
    assert [(c.layer, c.expert) for c in run(replication_policy(), two)[1].replications] == [(0, 0)]


def test_the_migration_budget_limits_copies():
    load = [[10, 2, 2, 2], [1, 1, 9, 1]]
    # 150 bytes per change of 100-byte experts: one copy per change; the other waits in `held`.
    decisions = run(replication_policy("{moves_per_hour: 12, bytes_per_change: 150}"),
                    [replication_ctx(t, load) for t in (0, 10)])
    assert [(c.layer, c.expert) for c in decisions[1].replications] == [(1, 2)]
    assert decisions[1].held[0].signals == {"layer": 0, "expert": 0, "load_ratio": 2.5}
    # One move per hour: after the first copy at t=10 nothing more until t=3610.
    p = replication_policy("{moves_per_hour: 1}")
    decisions = run(p, [replication_ctx(t, load) for t in (0, 10, 20, 3609, 3610)])
    assert [len(d.replications) for d in decisions] == [0, 1, 0, 0, 1]


# ---------------------------------------------------------------- advisory and the state


def test_advisory_decides_the_same_and_says_so():
    active, _ = decide(policy("max: 8"), ctx(running=200))
    advisory, _ = decide(policy("max: 8", "mode: advisory"), ctx(running=200))
    assert advisory.advisory and not active.advisory
    assert advisory.replicas == active.replicas == 3  # 200 / 32 = 6.25 -> 7, step 2 from 1
    assert advisory.changes == active.changes


def test_the_state_survives_json_and_a_restarted_controller_carries_on():
    p = parse_policy(HEADER + "spec: {pools: {replicas: {max: 8}, expert_shards: {min: 1, max: 4}}, "
                              "expert_replication: {enabled: true, window_s: 10}, "
                              "predictor: {kind: ewma_trend, alpha: 0.5, beta: 0.5}}")
    rounds = [AutoscalingContext(now_s=5.0 * i, replicas=PoolSignals(ready=2), expert_shards=PoolSignals(ready=2),
                                 running_requests=40 + 10 * i, request_rate=1.0 + i, shard_utilization=0.5,
                                 expert_load=np.array([[8.0, 1, 1, 1]])) for i in range(8)]
    state = None
    for c in rounds[:4]:
        _, state = decide(p, c, state)
    restored = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    for c in rounds[4:]:
        kept, state = decide(p, c, state)
        resumed, restored = decide(p, c, restored)
        assert resumed == kept and restored == state
    assert Decision.from_dict(json.loads(json.dumps(kept.to_dict()))) == kept


# ---------------------------------------------------------------- the predictor


def test_holt_trend_by_hand():
    # alpha 0.5, beta 0.5. t=0: level 10. t=10, rate 20: level 0.5 × 20 + 0.5 × (10 + 0) = 15,
    # trend 0.5 × (15 - 10) / 10 + 0 = 0.25/s. 30 s ahead: 15 + 0.25 × 30 = 22.5, factor on 20 now: 1.125.
    state = predictor.update_trend(predictor.TrendState(), 10.0, 0.0, 0.5, 0.5)
    state = predictor.update_trend(state, 20.0, 10.0, 0.5, 0.5)
    assert (state.level, state.trend) == (15.0, 0.25)
    assert predictor.forecast(state, 30.0) == 22.5
    assert predictor.rate_factor(state, 20.0, 30.0) == 1.125
    assert predictor.rate_factor(predictor.TrendState(), 20.0, 30.0) == 1.0


def test_a_rising_rate_scales_up_before_the_load_arrives():
    # 60 requests on 2 replicas is 1.875 units: 2 is enough now. The rate doubled (5 -> 10/s over 10 s, alpha 1,
    # beta 1: trend 0.5/s); the replica start (30 s) ahead it will be 25/s, factor 2.5: 4.69 units -> 5.
    p = policy("max: 8, max_step: 4", "predictor: {kind: ewma_trend, alpha: 1, beta: 1}")
    _, state = decide(p, ctx(now=0, ready=2, running=60, request_rate=5.0))
    decision, _ = decide(p, ctx(now=10, ready=2, running=60, request_rate=10.0), state)
    assert decision.replicas == 5
    constant, _ = decide(policy("max: 8, max_step: 4"), ctx(now=10, ready=2, running=60, request_rate=10.0))
    assert constant.replicas == 2


def test_predicted_expert_load_sizes_the_shards():
    # Shards at 0.7 of 0.7 target on 2 shards: 2 units. Predicted load 1.5x the observed: 3 units.
    p = parse_policy(HEADER + "spec: {pools: {expert_shards: {min: 1, max: 8, scale_up: {cooldown_s: 0}}}, "
                              "predictor: {kind: predicted_expert_load}}")
    c = AutoscalingContext(now_s=0, replicas=PoolSignals(ready=1), expert_shards=PoolSignals(ready=2),
                           shard_utilization=0.7, expert_load=np.array([[4.0, 4.0]]),
                           predicted_expert_load=np.array([[6.0, 6.0]]))
    decision, _ = decide(p, c)
    assert decision.expert_shards == 3


def test_arriving_expert_load_reshapes_and_rescales_the_observed_window():
    from moefleet.autoscaler.predictor import arriving_expert_load

    observed = np.array([[3.0, 1.0], [2.0, 2.0]])  # 4 per layer, 8 in all
    seen = np.array([[1.0, 1.0], [1.0, 1.0]])  # 4 predicted over 2 s before: 2 per second
    coming = np.array([[6.0, 0.0], [3.0, 3.0]])  # 12 predicted over the last 1 s: 12 per second, 6x
    load = arriving_expert_load(observed, seen, 2.0, coming, 1.0)
    assert load.tolist() == [[24.0, 0.0], [12.0, 12.0]]  # coming's shape, 6 x the observed total
    assert arriving_expert_load(observed, np.zeros((2, 2)), 0.0, coming, 1.0) is None  # nothing earlier
    assert arriving_expert_load(observed, seen, 2.0, np.zeros((2, 2)), 1.0) is None  # nothing arriving
    assert arriving_expert_load(np.zeros((2, 2)), seen, 2.0, coming, 1.0) is None  # nothing observed
    assert arriving_expert_load(None, seen, 2.0, coming, 1.0) is None


# ---------------------------------------------------------------- the queue-length policy


def test_queue_length_policy_waits_its_delays():
    # target 2 ongoing per replica; 10 ongoing on 1 replica: 5 wanted. upscale_delay 30 s: made at t=30.
    p = parse_policy(HEADER + "spec: {policy: queue_length, pools: {replicas: {max: 8}}, queue_length: "
                              "{look_back_period_s: 1, upscale_delay_s: 30, downscale_delay_s: 60}}")
    sizes = [d.replicas for d in run(p, [ctx(now=t, ready=1, running=10) for t in range(0, 35, 5)])]
    assert sizes == [1, 1, 1, 1, 1, 1, 5]
    # 2 ongoing on 5 replicas: 1 wanted, after 60 s.
    sizes = [d.replicas for d in run(p, [ctx(now=t, ready=5, running=2) for t in range(0, 65, 5)])]
    assert sizes == [5] * 12 + [1]
    # policy.decide hands the round over when the file says queue_length.
    direct, _ = decide_queue_length(p, ctx(ready=1, running=10))
    assert decide(p, ctx(ready=1, running=10))[0] == direct and direct.policy == "queue_length"


def test_queue_length_policy_smooths_and_averages_over_its_look_back():
    # look_back 30 s: ongoing samples 2, 2, 14 -> mean 6 on 1 replica: 3 wanted; no delay.
    p = parse_policy(HEADER + "spec: {policy: queue_length, pools: {replicas: {max: 8}}, queue_length: "
                              "{upscale_delay_s: 0, downscale_delay_s: 0, downscale_smoothing_factor: 0.5}}")
    decisions = run(p, [ctx(now=0, running=2), ctx(now=5, running=2), ctx(now=10, running=14)])
    assert [d.replicas for d in decisions] == [1, 1, 3]
    # Down from 4 with 2 ongoing: 1 wanted, smoothed by 0.5: ceil(4 - 0.5 × 3) = 3.
    decision, _ = decide(p, ctx(now=100, ready=4, running=2))
    assert decision.replicas == 3


def test_queue_length_policy_starts_a_replica_at_once_from_zero():
    p = parse_policy(HEADER + "spec: {policy: queue_length, pools: {replicas: {min: 0, max: 4, "
                              "scale_to_zero: {enabled: true}}}}")
    decision, _ = decide(p, ctx(ready=0, waiting=3))
    assert decision.replicas == 1 and decision.changes[0].reason == "cold start: 3 requests and no replica running"
