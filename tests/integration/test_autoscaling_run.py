"""The autoscaler for real, as a user runs it: `moefleet serve --autoscaling-policy` under a short
bursty load (low -> burst -> low) from the `openai` client. Replicas and expert shards scale up and
then down, no request fails, the greedy outputs are the in-process engine's, and the history gives
a reason and the signals behind every change. (benchmarks/autoscaling_run.py runs the longer load
and compares it with `moefleet simulate`.)"""

import asyncio
import os
import subprocess
import sys
import time

import pytest
import yaml

from benchmarks.autoscaling_run import (
    POLICY,
    SizePoller,
    autoscaler_report,
    bursty_trace,
    greedy_texts,
    replay,
    start_serve,
    stop_serve,
    token_requests,
)
from moefleet.autoscaler.performance_model import load_profile
from moefleet.client import Client

SHORT_PHASES = ((0, 5, 0.4), (5, 25, 4.0), (25, 30, 0.3))


@pytest.mark.timeout(600)
def test_serve_scales_replicas_and_shards_up_then_down_under_a_burst(model_dir, engines, tmp_path):
    model = model_dir("mixtral")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY % {"shard_utilization": 0.08})
    llm = engines("mixtral")
    requests = token_requests(bursty_trace(0, SHORT_PHASES), llm.engine.spec.vocab_size, seed=1)
    expected = greedy_texts(llm, requests)
    proc, grpc_address, http_url = start_serve(model, str(policy_path), str(tmp_path / "serve.log"))
    try:
        poller = SizePoller(grpc_address).start()
        results = asyncio.run(replay(http_url, os.path.basename(model), requests))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not poller.samples or poller.samples[-1][1:3] != (1, 1)):
            time.sleep(1)  # the low phase: back to one replica and one shard (windows and cooldowns)
        sizes = poller.stop()
        history, status = autoscaler_report(grpc_address)
    finally:
        stop_serve(proc)

    assert [r for r in results if "error" in r] == []
    assert [r["text"] for r in results] == expected
    assert sizes[:, 1].max() >= 2 and sizes[-1, 1] == 1, sizes  # replicas up, then down
    assert sizes[:, 2].max() >= 2 and sizes[-1, 2] == 1, sizes  # expert shards up, then down
    changes = [change for decision in history for change in decision["changes"]]
    for pool in ("replicas", "expert_shards"):
        assert {c["action"] for c in changes if c["pool"] == pool} >= {"scale_up", "scale_down"}
    for change in changes:
        assert change["reason"] and change["signals"], change  # every action explained
    assert status["failures"] == [] and status["actual"] == {"replicas": 1, "expert_shards": 1, "standby_replicas": 0,
                                                                "standby_shards": 0}


@pytest.mark.timeout(600)
def test_profile_measures_a_running_deployment_at_each_shard_count_and_puts_it_back(model_dir, tmp_path):
    """`moefleet profile --address` with the admin token: what a step takes there beyond the modelled one at
    1 and 2 expert shards, the compute the shards report against the shard table, how two replicas slow each
    other, what a first token takes through the HTTP API beyond the replicas' own count of it, and the
    deployment back at its shard and replica counts with its autoscaler active again."""
    model = model_dir("mixtral")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY % {"shard_utilization": 0.08})
    out = tmp_path / "profile.json"
    proc, grpc_address, http_url = start_serve(model, str(policy_path), str(tmp_path / "serve.log"))
    try:
        subprocess.run([sys.executable, "-m", "moefleet.cli", "profile", "--model", model, "--out", str(out),
                        "--address", grpc_address, "--admin-token", "bench-admin", "--batch-sizes", "1,2",
                        "--contexts", "16", "--prefill-tokens", "32", "--shard-rows", "1,8", "--decode-steps", "1",
                        "--remote-shards", "1,2", "--shared-cores", "2", "--openai-url", http_url],
                       check=True, timeout=420)
        with Client(grpc_address, token="bench-admin", timeout=30) as client:
            policy = yaml.safe_load(client.get_autoscaling_policy())
            shards = [s for s in client.cluster_state().replicas[0].shards if s.node_id != "local"]
            serving = sum(r.status == "serving" for r in client.cluster_state().replicas)
    finally:
        stop_serve(proc)
    profile = load_profile(str(out))
    assert profile.remote.shards == [1, 2] and profile.remote.tokens == [1, 2]
    assert all(s >= 0 for row in profile.remote.seconds for s in row) and profile.remote_step_s > 0
    # Measured from what the shards reported (the default 1.0 only where nothing was reported).
    assert len(profile.remote.compute_scale) == 2 and profile.shard_compute_scale == profile.remote.compute_scale[0]
    assert profile.shard_compute_scale != 1.0 and "reported" in profile.notes["remote"]
    assert "then back to 1" in profile.notes["remote"]
    # --shared-cores: measured with two replicas stepping at once (the deployment scaled to two, then back).
    assert profile.step_cores > 0 and "two stepping at once" in profile.notes["step_cores"] and serving == 1
    # --openai-url: the client's first token less the replicas' (from /metrics), after a replica was retired.
    assert profile.request_overhead_s > 0 and "/metrics" in profile.notes["request_overhead_s"]
    assert profile.request_overhead.requests == [1, 2] and len(profile.request_overhead.seconds) == 2
    assert policy["spec"].get("mode", "active") == "active"
    assert shards and all(s.compute_seconds >= 0 for s in shards)
