"""The autoscaler for real, as a user runs it: `moefleet serve --autoscaling-policy` under a short
bursty load (low -> burst -> low) from the `openai` client. Replicas and expert shards scale up and
then down, no request fails, the greedy outputs are the in-process engine's, and the history gives
a reason and the signals behind every change. (benchmarks/autoscaling_run.py runs the longer load
and compares it with `moefleet simulate`.)"""

import asyncio
import os
import time

import pytest

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
        while time.monotonic() < deadline and (not poller.samples or poller.samples[-1][1:] != (1, 1)):
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
