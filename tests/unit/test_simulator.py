"""The trace-replay simulator (autoscaler/simulator.py) and the performance profile it runs against
(autoscaler/performance_model.py): golden timings worked out by hand on a flat profile (every step 10 ms),
time scaling, clipping, batching limits, scale-from-zero, scaling with a burst, and the shard pool."""

import json
import math

import numpy as np
import pytest

from moefleet.autoscaler.performance_model import (
    DEFAULT_PROFILE,
    PerformanceProfile,
    RemoteTable,
    RequestOverheadTable,
    ShardTable,
    StartTimes,
    StepTable,
    interpolate,
    load_profile,
    parse_profile,
    save_profile,
)
from moefleet.autoscaler.policy_file import parse_policy
from moefleet.autoscaler.simulator import SERIES, simulate
from moefleet.cluster.workload.request_trace import TraceEntry

HEADER = "apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: sim}\n"
STATIC_ONE = parse_policy(HEADER + "spec: {pools: {replicas: {min: 1, max: 1}}}")


def flat_profile(**changes) -> PerformanceProfile:
    """Every step 10 ms whatever its size; replicas start in 30 s (2 s from standby)."""
    fields = dict(source="test", model="flat", max_model_len=1024, kv_cache_tokens=4096, max_num_seqs=8,
                  max_num_batched_tokens=512, num_experts=4, num_moe_layers=2, top_k=2, expert_bytes=1000,
                  step=StepTable(tokens=[1, 4096], context=[1, 8192], seconds=[[0.01, 0.01], [0.01, 0.01]]),
                  shard=ShardTable(rows=[1, 100000], seconds=[0.004, 0.004]), remote_step_s=0.0,
                  replica_start=StartTimes(cold_s=30.0, standby_s=2.0),
                  shard_start=StartTimes(cold_s=10.0, standby_s=1.0))
    return PerformanceProfile(**{**fields, **changes})


def test_one_request_by_hand():
    # Prompt 100 fits one step's budget: its first token comes with the first step (10 ms); the 4 other tokens
    # take one step each: finished at 50 ms, ITL (50 - 10) / 4 = 10 ms. One replica for 50 ms.
    result = simulate(STATIC_ONE, [TraceEntry(0.0, 100, 5)], flat_profile())
    assert result.ttft_ms.tolist() == pytest.approx([10.0])
    assert result.itl_ms.tolist() == pytest.approx([10.0])
    assert result.duration_s == pytest.approx(0.05) and result.replica_seconds == pytest.approx(0.05)
    summary = result.summary()
    assert summary["slo_attainment"] == 1.0 and summary["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert summary["shard_seconds"] == 0 and summary["decisions"] == 0
    json.dumps(summary)


def test_steps_are_drawn_around_the_modelled_time_with_the_measured_spread():
    # One request, one prefill step: 10 ms x exp(0.5 z), z the seed's first standard normal draw.
    z = np.random.default_rng(7).standard_normal()
    one = simulate(STATIC_ONE, [TraceEntry(0.0, 100, 1)], flat_profile(step_spread=0.5), seed=7)
    assert one.ttft_ms.tolist() == pytest.approx([10.0 * math.exp(0.5 * z)])
    # 400 lone requests: their first tokens spread as a log-normal of sigma 0.5 around 10 ms; a seed replays.
    alone = [TraceEntry(float(i), 100, 1) for i in range(400)]
    ttft = simulate(STATIC_ONE, alone, flat_profile(step_spread=0.5), seed=1).ttft_ms
    assert np.median(ttft) == pytest.approx(10.0, rel=0.1) and np.std(np.log(ttft)) == pytest.approx(0.5, rel=0.15)
    assert simulate(STATIC_ONE, alone, flat_profile(step_spread=0.5), seed=1).ttft_ms.tolist() == ttft.tolist()
    assert simulate(STATIC_ONE, alone, flat_profile(), seed=1).ttft_ms.tolist() == pytest.approx([10.0] * 400)


def test_long_prompts_are_chunked_by_the_token_budget():
    # 1000 prompt tokens with a 512-token budget: two prefill steps, first token at 20 ms.
    result = simulate(STATIC_ONE, [TraceEntry(0.0, 1000, 2)], flat_profile())
    assert result.ttft_ms.tolist() == pytest.approx([20.0])


def test_time_scale_multiplies_arrival_times():
    entries = [TraceEntry(0.0, 10, 2), TraceEntry(10.0, 10, 2)]
    assert simulate(STATIC_ONE, entries, flat_profile()).duration_s == pytest.approx(10.02)
    assert simulate(STATIC_ONE, entries, flat_profile(), time_scale=2).duration_s == pytest.approx(20.02)
    assert simulate(STATIC_ONE, entries, flat_profile(), time_scale=0.5).duration_s == pytest.approx(5.02)
    with pytest.raises(ValueError, match="time_scale must be > 0, got 0"):
        simulate(STATIC_ONE, entries, flat_profile(), time_scale=0)


def test_requests_beyond_the_context_are_clipped_and_counted():
    entries = [TraceEntry(0.0, 5000, 10), TraceEntry(0.0, 10, 2000), TraceEntry(0.0, 10, 10)]
    result = simulate(STATIC_ONE, entries, flat_profile())
    assert result.clipped == 2 and result.summary()["clipped"] == 2 and result.summary()["unfinished"] == 0


def test_a_full_batch_makes_the_next_request_wait():
    # The first arrival starts a step at once; the second, arriving at the same instant, joins the next step
    # (20 ms). With max_num_seqs 1 it waits until the first has finished at 30 ms: first token at 40 ms.
    entries = [TraceEntry(0.0, 10, 3), TraceEntry(0.0, 10, 3)]
    assert simulate(STATIC_ONE, entries, flat_profile()).ttft_ms.tolist() == pytest.approx([10, 20])
    assert simulate(STATIC_ONE, entries, flat_profile(max_num_seqs=1)).ttft_ms.tolist() == pytest.approx([10, 40])
    # KV cache of 4096 tokens: two requests of 2048 + 10 do not fit together.
    big = [TraceEntry(0.0, 10, 1000), TraceEntry(0.0, 10, 1000)]
    result = simulate(STATIC_ONE, big, flat_profile(kv_cache_tokens=2000))
    assert result.ttft_ms[1] == pytest.approx(10 + 1000 * 10)


def test_scale_from_zero_the_first_request_waits_and_never_fails():
    # No replica. The first request (t=0) waits at the gateway; the policy's round at t=0 sees it and asks for
    # a replica, which starts cold in 30 s: first token at 30.01 s. The second (t=1) waits too and joins the
    # next step: first token at 30.02 s, TTFT 29.02 s. Both are served.
    p = parse_policy(HEADER + "spec: {pools: {replicas: {min: 0, max: 2, scale_to_zero: {enabled: true, "
                              "idle_s: 20}}}}")
    result = simulate(p, [TraceEntry(0.0, 10, 2), TraceEntry(1.0, 10, 2)], flat_profile())
    assert result.ttft_ms.tolist() == pytest.approx([30010.0, 29020.0])
    assert result.summary()["unfinished"] == 0
    assert result.decisions[0].changes[0].reason == "scale from zero: 1 requests wait for a replica"


def test_scale_to_zero_after_idle_then_back():
    p = parse_policy(HEADER + "spec: {interval_s: 5, pools: {replicas: {min: 0, max: 2, initial: 1, "
                              "scale_to_zero: {enabled: true, idle_s: 20}}}}")
    result = simulate(p, [TraceEntry(0.0, 10, 2), TraceEntry(100.0, 10, 2)], flat_profile())
    # Served at once by the initial replica; idle from the round at 5 s: at 25 s it goes; the request at 100 s
    # is seen by the round at 100 s and served when a replica is ready at 130 s.
    assert result.ttft_ms.tolist() == pytest.approx([10.0, 30010.0])
    replicas = dict(zip(result.series["t"].tolist(), result.series["replicas"].tolist()))
    assert replicas[20.0] == 1 and replicas[30.0] == 0 and replicas[130.0] == 1
    # Cost: the first replica from 0 to 25 s, the second from 100 to its end at 130.02 s.
    assert result.replica_seconds == pytest.approx(25 + 30.02)


def burst(seconds_low: int = 300, seconds_burst: int = 300, low: float = 1.0, high: float = 8.0) -> list[TraceEntry]:
    """Evenly spaced arrivals: low rate, burst, low rate."""
    entries, t = [], 0.0
    for duration, rate in ((seconds_low, low), (seconds_burst, high), (seconds_low, low)):
        end = t + duration
        while t < end:
            entries.append(TraceEntry(t, 200, 100))
            t += 1 / rate
    return entries


def test_the_replicas_follow_a_burst_up_and_down_and_cost_less_than_static_peak():
    # 50 ms steps: 8 req/s × 100 tokens each need more than one replica's 20 tokens/s per sequence slot.
    profile = flat_profile(step=StepTable(tokens=[1, 4096], context=[1, 8192], seconds=[[0.05, 0.05], [0.05, 0.05]]),
                           max_num_seqs=16)
    ours = parse_policy(HEADER + "spec: {pools: {replicas: {max: 8, targets: {running_requests: 12}, "
                                 "scale_down: {stabilization_window_s: 60, cooldown_s: 30}}}}")
    result = simulate(ours, burst(), profile)
    series = result.series
    assert set(series) == set(SERIES)
    during = series["replicas"][(series["t"] > 400) & (series["t"] < 600)]
    after = series["replicas"][series["t"] > 850]
    assert during.max() >= 3 and after[-1] <= 2
    static = parse_policy(HEADER + f"spec: {{pools: {{replicas: {{min: {int(during.max())}, "
                                   f"max: {int(during.max())}}}}}}}")
    peak = simulate(static, burst(), profile)
    assert result.replica_seconds < 0.8 * peak.replica_seconds
    assert result.summary()["decisions"] == len(result.decisions) >= 2
    assert all(change.reason for d in result.decisions for change in d.changes)


def test_advisory_mode_decides_but_does_not_act():
    p = parse_policy(HEADER + "spec: {mode: advisory, pools: {replicas: {max: 8, targets: {running_requests: 2}}}}")
    result = simulate(p, burst(60, 60), flat_profile(step=StepTable(tokens=[1], context=[1], seconds=[[0.05]])))
    assert set(result.series["replicas"].tolist()) == {1}
    assert result.decisions and all(d.advisory for d in result.decisions)
    assert result.series["replicas_desired"].max() > 1


def test_a_skewed_expert_mix_slows_shared_shards_and_replication_relieves_it():
    # One hot expert of 4 in both layers: 2 shards hold 2 experts each, so the hottest shard gets
    # (0.7 + 0.1) / 0.5 = 1.6x the mean.
    mixes = np.array([[[0.7, 0.1, 0.1, 0.1]] * 2])
    profile = flat_profile(shard=ShardTable(rows=[1, 1000], seconds=[0.001, 0.101]))
    base = ("spec: {pools: {replicas: {min: 1, max: 1}, expert_shards: {min: 2, max: 2}}, "
            "expert_replication: {enabled: %s, window_s: 10, trigger: {load_ratio: 1.5}}}")
    entries = [TraceEntry(t * 0.5, 100, 200) for t in range(120)]
    plain = simulate(parse_policy(HEADER + base % "false"), entries, profile, expert_mixes=mixes)
    assert plain.series["imbalance"].max() == pytest.approx(1.6)
    copied = simulate(parse_policy(HEADER + base % "true"), entries, profile, expert_mixes=mixes)
    assert any(d.replications for d in copied.decisions)
    assert copied.series["imbalance"][-1] < 1.6
    assert copied.summary()["ttft_ms"]["p95"] < plain.summary()["ttft_ms"]["p95"]
    assert plain.shard_seconds == pytest.approx(2 * plain.duration_s)


def test_bad_expert_mixes_are_refused():
    with pytest.raises(ValueError, match=r"expert_mixes must be float64\[M, L, E\]"):
        simulate(STATIC_ONE, [TraceEntry(0, 1, 1)], flat_profile(), expert_mixes=np.ones(4))
    with pytest.raises(ValueError, match=r"mix_of_request must be int64\[1\]"):
        simulate(STATIC_ONE, [TraceEntry(0, 1, 1)], flat_profile(), expert_mixes=np.ones((2, 1, 4)),
                 mix_of_request=np.array([2]))


# ---------------------------------------------------------------- the profile


def test_tables_interpolate_and_extrapolate_along_the_edges():
    assert interpolate(5, [0, 10], [1.0, 2.0]) == 1.5
    assert interpolate(20, [0, 10], [1.0, 2.0]) == 3.0  # along the last segment
    assert interpolate(7, [3], [4.0]) == 4.0
    table = StepTable(tokens=[1, 101], context=[100, 1100], seconds=[[0.01, 0.02], [0.11, 0.22]])
    # tokens 51 (halfway), context 600 (halfway): rows at context 600: 0.015, 0.165 -> halfway 0.09.
    assert table.time(51, 600) == pytest.approx(0.09)


def test_shared_shards_replace_the_experts_share_of_a_step():
    # Step 10 ms measured with experts in process; 100 tokens × top-2 = 200 rows: in process 4 ms (flat shard
    # table), on 2 shards 4 ms each too (flat), × imbalance rows don't matter on a flat table; slowdown 2: 6 + 8.
    profile = flat_profile()
    assert profile.step_time(100, 10) == (0.01, 0.0)
    assert profile.step_time(100, 10, shards=2, shard_slowdown=2.0) == pytest.approx((0.014, 0.004))


def test_a_measured_remote_table_replaces_the_constant_overhead_by_shards_and_tokens():
    # Beyond the modelled step: 2 ms at 1 shard and 1 token, 12 ms at 3 shards and 9 tokens (more processes
    # on the same cores); bilinear between, along the edges outside, never negative.
    remote = RemoteTable(shards=[1, 3], tokens=[1, 9], seconds=[[0.002, 0.004], [0.006, 0.012]])
    assert remote.time(2, 5) == pytest.approx((0.003 + 0.009) / 2)
    assert remote.time(5, 1) == pytest.approx(0.010)  # along the shards edge: +2 ms per shard
    assert remote.time(1, 500) == remote.time(1, 9) == pytest.approx(0.004)  # tokens held to the measured range
    assert RemoteTable(shards=[1, 2], tokens=[1], seconds=[[0.004], [0.001]]).time(9, 1) == 0.0
    profile = flat_profile(remote_step_s=0.5, remote=remote)
    # The flat profile's step with shards: 10 ms measured - 4 ms in-process experts + 4 ms hottest shard.
    assert profile.step_time(1, 10, shards=1)[0] == pytest.approx(0.010 + 0.002)
    assert profile.step_time(9, 10, shards=3)[0] == pytest.approx(0.010 + 0.012)
    assert flat_profile(remote_step_s=0.5).step_time(9, 10, shards=3)[0] == pytest.approx(0.510)
    with pytest.raises(ValueError, match="seconds must be 2 rows of 2 values"):
        RemoteTable(shards=[1, 2], tokens=[1, 4], seconds=[[0.1, 0.2]])


def test_the_shards_reported_compute_scales_the_utilisation_the_policy_sees_and_the_hottest_shard():
    assert flat_profile().step_time(100, 10, shards=2)[1] == pytest.approx(0.004)
    assert flat_profile(shard_compute_scale=3.0).step_time(100, 10, shards=2)[1] == pytest.approx(0.012)
    # ... and the hottest shard's share of the step: 10 ms - 4 ms in-process experts + 3 x 4 ms.
    assert flat_profile().step_time(100, 10, shards=2)[0] == pytest.approx(0.010)
    assert flat_profile(shard_compute_scale=3.0).step_time(100, 10, shards=2)[0] == pytest.approx(0.018)
    # Measured at each shard count: it follows the count (linear between, along the edge beyond).
    remote = RemoteTable(shards=[1, 3], tokens=[1], seconds=[[0.0], [0.0]], compute_scale=[2.0, 4.0])
    by_count = flat_profile(shard_compute_scale=3.0, remote=remote)
    assert [by_count.step_time(100, 10, shards=n)[1] for n in (1, 2, 4)] == pytest.approx([0.008, 0.012, 0.020])
    with pytest.raises(ValueError, match="compute_scale must be 2 values > 0"):
        RemoteTable(shards=[1, 3], tokens=[1], seconds=[[0.0], [0.0]], compute_scale=[2.0])


def test_replicas_sharing_cores_slow_each_other():
    # Two replicas, a request each at t=0. Own cores: both first tokens at 10 ms. Sharing one core: the
    # second starts its step while the first steps, so at half speed (20 ms); two cores: no slowdown.
    two = parse_policy(HEADER + "spec: {pools: {replicas: {min: 2, max: 2}}}")
    requests = [TraceEntry(0.0, 100, 2), TraceEntry(0.0, 100, 2)]
    assert simulate(two, requests, flat_profile()).ttft_ms.tolist() == pytest.approx([10.0, 10.0])
    assert simulate(two, requests, flat_profile(shared_cores=1.0)).ttft_ms.tolist() == pytest.approx([10.0, 20.0])
    assert simulate(two, requests, flat_profile(shared_cores=2.0)).ttft_ms.tolist() == pytest.approx([10.0, 10.0])


def test_the_request_overhead_slows_with_the_replicas_sharing_the_cores():
    # 5 ms beyond the engine. A lone request: 10 ms step + 5. Two one-token requests on two replicas sharing
    # one core: the first's step ends while the other steps (10 ms, then 2 x 5 ms overhead); the second's step
    # began while the first stepped (20 ms) and ends alone (+ 5).
    two = parse_policy(HEADER + "spec: {pools: {replicas: {min: 2, max: 2}}}")
    requests = [TraceEntry(0.0, 100, 1), TraceEntry(0.0, 100, 1)]
    assert simulate(STATIC_ONE, requests[:1], flat_profile(request_overhead_s=0.005)).ttft_ms.tolist() == \
        pytest.approx([15.0])
    shared = simulate(two, requests, flat_profile(shared_cores=1.0, request_overhead_s=0.005))
    assert shared.ttft_ms.tolist() == pytest.approx([20.0, 25.0])
    assert simulate(two, requests, flat_profile(request_overhead_s=0.005)).ttft_ms.tolist() == \
        pytest.approx([15.0, 15.0])


def test_a_measured_overhead_table_grows_with_the_requests_in_flight():
    table = RequestOverheadTable(requests=[1, 4], seconds=[0.005, 0.020])
    assert [table.time(n) for n in (0, 1, 2, 4, 9)] == pytest.approx([0.005, 0.005, 0.010, 0.020, 0.020])
    # Three one-token requests at once on one replica: the first is stepping alone when the others arrive
    # (first token at 10 ms, 3 in flight: 15 ms overhead), the other two share the next step (20 ms, 2 in flight:
    # 10 ms); a lone request later: 1 in flight (5 ms).
    requests = [TraceEntry(0.0, 100, 1)] * 3 + [TraceEntry(1.0, 100, 1)]
    profile = flat_profile(request_overhead_s=0.5, request_overhead=table)  # the table, not the scalar
    assert simulate(STATIC_ONE, requests, profile).ttft_ms.tolist() == pytest.approx([25.0, 30.0, 30.0, 15.0])
    with pytest.raises(ValueError, match="seconds must be 2 values >= 0"):
        RequestOverheadTable(requests=[1, 4], seconds=[0.005])
    with pytest.raises(ValueError, match="requests must be >= 1"):
        RequestOverheadTable(requests=[0, 4], seconds=[0.0, 0.01])


def test_starting_units_take_their_cores_from_the_steps():
    profile = flat_profile(shared_cores=2.0, step_cores=1.0)
    assert profile.core_slowdown(1, 0.0) == 1.0
    assert profile.core_slowdown(2, 1.0) == pytest.approx(1.5)  # two replicas stepping and one start: 3 on 2
    assert flat_profile().core_slowdown(4, 3.0) == 1.0  # cores of their own
    # Two requests of 1,000 tokens on one replica ask for a second (1 running each); while it starts cold
    # (30 s, keeping a whole core busy), the serving replica's steps share its one core with the start.
    up = parse_policy(HEADER + "spec: {pools: {replicas: {min: 1, max: 2, targets: {running_requests: 1, "
                               "waiting_requests: null, kv_cache_usage: null, ttft_slo_fraction: null, "
                               "itl_slo_fraction: null}}}}")
    requests = [TraceEntry(0.0, 100, 1000), TraceEntry(0.0, 100, 1000)]
    light = simulate(up, requests, flat_profile(shared_cores=1.0))  # a start that takes no CPU
    heavy = simulate(up, requests, flat_profile(shared_cores=1.0, replica_start=StartTimes(cold_s=30.0,
                                                                                           standby_s=2.0, cores=1.0)))
    assert max(d.replicas for d in light.decisions) == max(d.replicas for d in heavy.decisions) == 2
    assert light.itl_ms.tolist() == pytest.approx([10.0, 10.0])
    # Decoding takes 9.99 s alone; from the scale-up on (the start outlasts the requests) at half speed.
    began = next(d.at_s for d in heavy.decisions if d.replicas == 2)
    assert 0 < began < 9.99
    assert heavy.itl_ms.tolist() == pytest.approx([(began + 2 * (9.99 - began)) / 999 * 1000] * 2, rel=0.01)


def test_profiles_round_trip_through_json_and_bad_ones_name_the_key(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(DEFAULT_PROFILE, str(path))
    assert load_profile(str(path)) == DEFAULT_PROFILE and not DEFAULT_PROFILE.measured
    data = json.loads(path.read_text())
    data["step"]["seconds"][0] = [0.01]
    data["replica_start"]["cold_s"] = -1
    data["kv_cache_tokens"] = 10
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as caught:
        load_profile(str(path))
    assert str(caught.value).splitlines() == [
        f"{path}: step: Value error, seconds must be 5 rows of 3 values, got [1, 3, 3, 3, 3]".replace(
            "Value error, ", ""),
        f"{path}: replica_start.cold_s: Input should be greater than or equal to 0 (got -1)"]
    with pytest.raises(ValueError, match=r"^p.json:1: not valid JSON"):
        parse_profile("{", "p.json")
    with pytest.raises(ValueError, match=r"kv_cache_tokens \(10\) must hold one request of max_model_len"):
        parse_profile(json.dumps({**json.loads(DEFAULT_PROFILE.model_dump_json()), "kv_cache_tokens": 10}))
