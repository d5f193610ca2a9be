"""`moefleet serve` run as a user runs it: it prints its addresses, serves gRPC and HTTP through
several gateways on one port, and stops cleanly on SIGTERM leaving no process behind."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from moefleet.client import Client


def start_serve(*flags: str) -> tuple[subprocess.Popen, str]:
    """`moefleet serve` with flags, as a user starts it; returns the process and what it printed."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MOEFLEET_ADMIN_TOKEN": ""}
    env.pop("MOEFLEET_ADMIN_TOKEN")
    proc = subprocess.Popen([sys.executable, "-m", "moefleet.cli", "serve", "--grpc-port", "0", "--http-port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"serve exited early: {lines}")
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return proc, "".join(lines)


@pytest.mark.timeout(300)
def test_serve_end_to_end_and_clean_sigterm(model_dir):
    proc, text = start_serve("--model", model_dir("qwen3_moe"), "--gateways", "2", "--replicas", "2")
    try:
        grpc_address = re.search(r"gRPC:\s+(\S+)", text).group(1)
        http_url = re.search(r"HTTP:\s+(\S+)", text).group(1)
        token = re.search(r"admin token \(generated for this run\): (\S+)", text).group(1)
        assert re.search(r"sample: 'Once upon a time' -> '.+'", text), text  # it generates text at once
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) > 4  # raylet, GCS, workers for the controller, replicas, gateways

        with Client(grpc_address, token=token, timeout=120) as client:
            replies = [client.generate(f"prompt {i}", temperature=0, max_tokens=6, ignore_eos=True) for i in range(6)]
            assert all(len(r.token_ids) == 6 for r in replies)
            streamed = list(client.generate_stream("stream me", temperature=0, max_tokens=6, ignore_eos=True))
            assert sum(len(m.token_ids) for m in streamed) == 6
            state = client.cluster_state()
            assert {r.replica_id for r in state.replicas} == {"replica-0", "replica-1"} and state.gateways == 2
            assert client.scale_replicas(3).accepted
            time.sleep(1.5)  # gateways refresh their replica list every second
            assert len(client.cluster_state().replicas) == 3
        import urllib.request

        assert b'"status": "ok"' in urllib.request.urlopen(http_url.removesuffix("/v1") + "/health").read()
        cli = subprocess.run([sys.executable, "-m", "moefleet.cli", "generate", "--address", grpc_address,
                              "--max-tokens", "4", "hello"], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and "[4 tokens, finish_reason=length]" in cli.stdout
        admin = subprocess.run([sys.executable, "-m", "moefleet.cli", "admin", "state", "--address", grpc_address,
                                "--token", token], capture_output=True, text=True, timeout=120)
        assert admin.returncode == 0 and 'replica_id: "replica-2"' in admin.stdout
        denied = subprocess.run([sys.executable, "-m", "moefleet.cli", "admin", "state", "--address", grpc_address,
                                 "--token", "wrong"], capture_output=True, text=True, timeout=120)
        assert denied.returncode == 2 and "UNAUTHENTICATED" in denied.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        gone, alive = psutil.wait_procs([p for p in descendants if p.is_running()], timeout=30)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_serve_with_controller_owned_shards_scales_them_while_serving(model_dir, tmp_path):
    """--expert-shards: the controller owns the shards; the Admin API's ScaleShards and Rebalance
    go to it, and generation goes on with identical greedy tokens."""
    proc, text = start_serve("--model", model_dir("mixtral"), "--gateways", "1", "--replicas", "1",
                             "--expert-shards", "2")
    try:
        grpc_address = re.search(r"gRPC:\s+(\S+)", text).group(1)
        token = re.search(r"admin token \(generated for this run\): (\S+)", text).group(1)
        with Client(grpc_address, token=token, timeout=120) as client:
            before = client.generate("shards", temperature=0, max_tokens=12, ignore_eos=True).token_ids
            scaled = client.scale_shards(3)
            assert scaled.accepted and "3 expert shards; placement epoch 1 serving" in scaled.message
            # One node: nothing to group by node, so the plan balances load.
            assert "rebalance (asked; load); placement epoch 2" in client.rebalance().message
            assert client.generate("shards", temperature=0, max_tokens=12, ignore_eos=True).token_ids == before
            state = client.cluster_state()
            assert state.placement_epoch == 2 and len(state.replicas[0].shards) == 3
            _record_plan_and_eval_a_live_trace(client, grpc_address, token, tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _record_plan_and_eval_a_live_trace(client, grpc_address: str, token: str, tmp_path) -> None:
    """`moefleet routing record --address` (the Admin API's RecordRouting) while requests run, then
    `routing plan` and `routing eval` on the trace it wrote: the round trip on a live deployment."""
    import json
    import threading

    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.generate("keep routing", temperature=0, max_tokens=16, ignore_eos=True)

    worker = threading.Thread(target=load)
    worker.start()
    trace, plan = str(tmp_path / "live.jsonl.gz"), str(tmp_path / "plan.json")
    try:
        recorded = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "record", "--address", grpc_address,
                                   "--token", token, "--duration", "3", "--sample-rate", "1", "--out", trace],
                                  capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        worker.join()
    assert recorded.returncode == 0, recorded.stderr
    events = int(re.search(r"recorded (\d+) routing events", recorded.stderr).group(1))
    assert events >= 16 * 4  # at least one request's tokens, at each of the 4 MoE layers
    planned = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "plan", "--trace", trace, "--shards",
                              "2", "--objective", "affinity", "--num-experts", "8", "--out", plan],
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr
    evaluated = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "eval", "--trace", trace,
                                "--placement", plan], capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert 1.0 <= result["fanout"] <= 2.0 and result["imbalance"] >= 1.0
    denied = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "record", "--address", grpc_address,
                             "--token", "wrong", "--duration", "1", "--out", trace], capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode == 2 and "UNAUTHENTICATED" in denied.stderr
