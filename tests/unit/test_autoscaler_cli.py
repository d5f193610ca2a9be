"""`moefleet simulate` as a user runs it: traces in both public formats written here, one JSON summary on
stdout, a plot on request, and bad inputs refused with exit 2 naming the file, the key path or the line."""

import json

import pytest

from moefleet.autoscaler.performance_model import DEFAULT_PROFILE, StartTimes, load_profile, save_profile
from moefleet.cli import main
from moefleet.cluster.routing.trace import RoutingEvent, write_trace

POLICY = """apiVersion: moefleet.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: cli}
spec:
  pools:
    replicas: {min: 1, max: 4}
"""

# Arrivals at 0, 1, 2.5 and 4 s.
AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.0000000,374,44
2024-05-10 00:00:01.0000000,396,109
2024-05-10 00:00:02.5000000,20000,55
2024-05-10 00:00:04.0000000,91,16
"""

MOONCAKE = """{"timestamp": 1000, "input_length": 6955, "output_length": 52, "hash_ids": [1, 2]}
{"timestamp": 3000, "input_length": 120, "output_length": 30}
{"timestamp": 5000, "input_length": 800, "output_length": 8}
"""


def simulate(capsys, tmp_path, *flags, policy=POLICY, trace=("trace.csv", AZURE)) -> tuple[int, dict | None, str]:
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / trace[0]).write_text(trace[1])
    status = main(["simulate", "--policy", str(tmp_path / "policy.yaml"), "--trace", str(tmp_path / trace[0]),
                   *flags])
    out, err = capsys.readouterr()
    return status, json.loads(out) if status == 0 else None, err


def test_simulate_an_azure_csv_prints_one_json_summary(capsys, tmp_path):
    status, summary, err = simulate(capsys, tmp_path)
    assert status == 0
    assert summary["requests"] == 4 and summary["unfinished"] == 0
    assert summary["clipped"] == 1  # 20000 + 55 tokens exceed the placeholder profile's 8192
    assert summary["replica_seconds"] > 0 and summary["shard_seconds"] == 0
    assert set(summary["ttft_ms"]) == {"p50", "p95", "p99"} and summary["slo_attainment"] is not None
    assert "placeholder" in err  # no --profile: said so


def test_simulate_a_mooncake_jsonl_with_a_time_scale(capsys, tmp_path):
    _, normal, _ = simulate(capsys, tmp_path, trace=("trace.jsonl", MOONCAKE))
    _, stretched, _ = simulate(capsys, tmp_path, "--time-scale", "2", trace=("trace.jsonl", MOONCAKE))
    assert normal["requests"] == stretched["requests"] == 3
    # The last arrival moves from 4 s to 8 s after the first.
    assert stretched["duration_s"] - normal["duration_s"] == pytest.approx(4.0, abs=0.5)


def test_simulate_with_a_profile_a_routing_trace_and_a_plot(capsys, tmp_path):
    profile = DEFAULT_PROFILE.model_copy(update={"source": "test", "replica_start": StartTimes(cold_s=1, standby_s=0)})
    save_profile(profile, str(tmp_path / "profile.json"))
    write_trace(str(tmp_path / "routing.jsonl"),
                [RoutingEvent("a", 0, 5, 0, (0, 1)), RoutingEvent("b", 0, 6, 0, (2, 3))])
    policy = POLICY + "    expert_shards: {min: 2, max: 2}\n"
    status, summary, err = simulate(capsys, tmp_path, "--profile", str(tmp_path / "profile.json"), "--routing-trace",
                                    str(tmp_path / "routing.jsonl"), "--plot", str(tmp_path / "plot.png"),
                                    policy=policy)
    assert status == 0 and summary["profile"] == "test" and "placeholder" not in err
    assert summary["shard_seconds"] > 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_policy_file_exits_2_with_the_key_path(capsys, tmp_path):
    status, _, err = simulate(capsys, tmp_path, policy=POLICY.replace("max: 4", "max: lots"))
    assert status == 2
    assert err.strip() == (f"moefleet: error: {tmp_path / 'policy.yaml'}: spec.pools.replicas.max: Input should be a "
                           "valid integer, unable to parse string as an integer (got 'lots')")
    status, _, err = simulate(capsys, tmp_path, policy=POLICY.replace("min: 1, max: 4", "min: 5, max: 4"))
    assert status == 2 and "spec.pools.replicas: min (5) must not exceed max (4)" in err


def test_bad_traces_and_flags_exit_2_naming_the_problem(capsys, tmp_path):
    status, _, err = simulate(capsys, tmp_path, trace=("trace.csv", AZURE + "2024-05-10 00:00:05,x,1\n"))
    assert status == 2 and f"{tmp_path / 'trace.csv'}: line 6: ContextTokens must be a non-negative integer" in err
    status, _, err = simulate(capsys, tmp_path, trace=("trace.parquet", AZURE))
    assert status == 2 and "unknown trace format" in err
    status, _, err = simulate(capsys, tmp_path, "--time-scale", "0")
    assert status == 2 and "--time-scale must be > 0, got 0.0" in err
    status, _, err = simulate(capsys, tmp_path, "--seed", "-1")
    assert status == 2 and "--seed must be >= 0, got -1" in err
    status, _, err = simulate(capsys, tmp_path, "--profile", str(tmp_path / "missing.json"))
    assert status == 2 and f"{tmp_path / 'missing.json'}: No such file or directory" in err


def test_profile_measures_the_tiny_model_with_few_points(capsys, tmp_path, model_dir):
    out = tmp_path / "profile.json"
    status = main(["profile", "--model", model_dir("mixtral"), "--out", str(out), "--batch-sizes", "1,4",
                   "--contexts", "16,32", "--prefill-tokens", "64", "--decode-steps", "2", "--shard-rows", "1,16"])
    assert status == 0
    profile = load_profile(str(out))
    assert profile.measured and profile.source.startswith("measured by moefleet profile")
    assert profile.step.tokens == [1, 4, 64] and profile.step.context == [16, 32]
    assert (profile.num_experts, profile.top_k, profile.num_moe_layers) == (8, 2, 4)  # the tiny Mixtral
    assert profile.replica_start.cold_s > 0 and profile.shard_start.cold_s >= profile.shard_start.standby_s > 0
    assert profile.shard.rows == [1, 16] and profile.expert_bytes > 0
    assert "not measured" in profile.notes["remote_step_s"]
    status = main(["profile", "--model", model_dir("mixtral"), "--out", str(out), "--batch-sizes", "1,x"])
    assert status == 2 and "--batch-sizes must be integers separated by commas" in capsys.readouterr().err
