"""The autoscaler for real (issue 27): `moefleet serve --autoscaling-policy` under a bounded bursty
load (low -> burst -> low, open-loop arrivals from a request trace, sent by the `openai` client,
greedy, streamed), then the same trace and policy replayed by `moefleet simulate` against a
profile `moefleet profile` measured on the same model.

Reported: requests sent and failed, greedy outputs against the in-process engine's, the pool sizes
over time (replicas and expert shards, polled from the Admin API), every decision of the history
with its reason, and the simulator's replica-seconds, shard-seconds and p95 TTFT against the run's.

Usage: python benchmarks/autoscaling_run.py [--model DIR] [--seed 0] [--no-docs]
Writes benchmarks/results/autoscaling_run.json and its section of docs/benchmarks.md; the trace,
policy, profile, plot and logs stay in --workdir (default: a temporary directory)."""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Replicas scale down only after 20 s of wanting fewer: short requests at 4/s keep two replicas near
# their target, and with a 10 s window a lull mid-burst scaled one down and the next clump up again
# two seconds later (one run of three, 19:50 UTC: the client's p95 TTFT 247 ms against 69 simulated).
POLICY = """apiVersion: moefleet.io/v1alpha1
kind: AutoscalingPolicy
metadata: {name: real-run}
spec:
  interval_s: 1
  slo: {ttft_ms: 3000, itl_ms: 300, percentile: 95, attainment: 0.99, window_s: 10}
  pools:
    replicas:
      min: 1
      max: 2
      max_step: 1
      targets: {running_requests: 2, waiting_requests: 2, kv_cache_usage: null, ttft_slo_fraction: null,
                itl_slo_fraction: null}
      scale_up: {stabilization_window_s: 0, cooldown_s: 2}
      scale_down: {stabilization_window_s: 20, cooldown_s: 5}
    expert_shards:
      min: 1
      max: 3
      max_step: 1
      targets: {shard_utilization: %(shard_utilization)s, expert_load_imbalance: null, ttft_slo_fraction: null,
                itl_slo_fraction: null}
      scale_up: {stabilization_window_s: 0, cooldown_s: 2}
      scale_down: {stabilization_window_s: 10, cooldown_s: 5}
"""
# (seconds from, seconds to, requests per second): low, burst, low.
PHASES = ((0, 15, 0.4), (15, 45, 4.0), (45, 90, 0.3))


def bursty_trace(seed: int, phases=PHASES) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens) of Poisson arrivals over the phases."""
    rng = np.random.default_rng(seed)
    entries = []
    for start, end, rate in phases:
        t = start + rng.exponential(1 / rate)
        while t < end:
            entries.append((round(t, 3), int(rng.integers(24, 120)), int(rng.integers(16, 48))))
            t += rng.exponential(1 / rate)
    return entries


def token_requests(entries, vocab_size: int, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt token ids, output tokens) per trace entry: random ids of the entry's length."""
    rng = np.random.default_rng(seed)
    return [(t, rng.integers(3, vocab_size, prompt).tolist(), output) for t, prompt, output in entries]


def greedy_texts(llm, requests) -> list[str]:
    """What the in-process engine (an LLM) generates greedily for each request: the reference."""
    from moefleet import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n) for _, _, n in requests]
    return [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for _, p, _ in requests], params)]


def write_mooncake(path: str, entries) -> None:
    with open(path, "w") as f:
        for t, prompt, output in entries:
            f.write(json.dumps({"timestamp": int(t * 1000), "input_length": prompt, "output_length": output}) + "\n")


def start_serve(model: str, policy_path: str, log_path: str) -> tuple[subprocess.Popen, str, str]:
    """`moefleet serve` as a user starts it; returns (process, gRPC address, HTTP base URL)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MOEFLEET_ADMIN_TOKEN": "bench-admin"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moefleet.cli", "serve", "--model", model, "--grpc-port", "0",
                             "--http-port", "0", "--gateways", "1", "--autoscaling-policy", policy_path],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"moefleet serve exited early; see {log_path}: {''.join(lines)}")
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            text = "".join(lines)
            return proc, re.search(r"gRPC:\s+(\S+)", text).group(1), re.search(r"HTTP:\s+(\S+)", text).group(1)
    raise RuntimeError("moefleet serve did not start in 300 s")


def stop_serve(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class SizePoller:
    """Polls the autoscaler's status and the cluster state every `every_s`: (time, replicas, shards, placement
    epoch, running requests, waiting requests) samples, to read slow requests against."""

    def __init__(self, address: str, every_s: float = 0.5):
        from moefleet.client import Client

        self.client = Client(address, token="bench-admin", timeout=10)
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                actual = self.client.autoscaler_status()["actual"]
                cluster = self.client.cluster_state()
                self.samples.append((time.monotonic() - self.started, actual["replicas"], actual["expert_shards"],
                                     cluster.placement_epoch, sum(r.running for r in cluster.replicas),
                                     sum(r.waiting for r in cluster.replicas)))
            except Exception as e:  # a slow answer under load: the next poll
                print(f"  status poll: {e}", file=sys.stderr)
            self._stop.wait(self.every_s)

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> np.ndarray:
        self._stop.set()
        self.thread.join()
        self.client.close()
        return np.array(self.samples, dtype=float).reshape(-1, 6)


class ServerTtft:
    """The deployment's own time to first token (from a request reaching a replica to its first token: the
    replicas' vllm:time_to_first_token_seconds histograms in the gateway's /metrics), scraped every `every_s`
    so that the counts of replicas retired during the run are kept: per replica, the last counts seen minus
    the first (zero for a replica that appeared after the first scrape)."""

    def __init__(self, http_url: str, every_s: float = 1.0):
        self.url = http_url.rsplit("/v1", 1)[0] + "/metrics"
        self.every_s, self._stop = every_s, threading.Event()
        self.first: dict[str, list[float]] = {}
        self.last: dict[str, list[float]] = {}
        self.scrapes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _counts(self) -> dict[str, list[float]]:
        """replica -> cumulative count per bucket bound (in TIME_TO_FIRST_TOKEN_BUCKETS order, then +Inf)."""
        import urllib.request

        from moefleet.cluster.engine.serving_stats import TIME_TO_FIRST_TOKEN_BUCKETS
        from moefleet.cluster.gateway.replica_metrics import replica_histograms

        bounds = [*TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")]
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        return {replica: [buckets.get(bound, 0.0) for bound in bounds]
                for replica, (buckets, _, _) in replica_histograms(text, "vllm:time_to_first_token_seconds").items()}

    def _run(self):
        while not self._stop.is_set():
            try:
                counts = self._counts()
            except Exception as e:  # a slow answer under load: the next scrape
                print(f"  metrics scrape: {e}", file=sys.stderr)
            else:
                for replica, row in counts.items():
                    self.first.setdefault(replica, row if not self.scrapes else [0.0] * len(row))
                    self.last[replica] = row
                self.scrapes += 1
            self._stop.wait(self.every_s)

    def start(self):
        self.thread.start()
        return self

    def stop_p95_ms(self) -> float | None:
        """The p95 over everything the replicas counted meanwhile (interpolated inside its bucket)."""
        from moefleet.autoscaler.latency_window import histogram_quantile
        from moefleet.cluster.engine.serving_stats import TIME_TO_FIRST_TOKEN_BUCKETS

        self._stop.set()
        self.thread.join()
        if not self.last:
            return None
        cumulative = np.sum([np.subtract(self.last[r], self.first[r]) for r in self.last], axis=0)
        p95 = histogram_quantile(0.95, TIME_TO_FIRST_TOKEN_BUCKETS, np.diff(cumulative, prepend=0.0).tolist())
        return None if p95 is None else p95 * 1e3


async def replay(base_url: str, model_id: str, requests: list[tuple[float, list[int], int]]) -> list[dict]:
    """Open-loop: request i is sent at its arrival time, streamed, and timed as vLLM's client (and
    benchmarks/serving.py) times it: TTFT at the first chunk with a choice, whose text may still be empty
    (an incomplete UTF-8 character is held back until the next token), a gap per later chunk; and its text."""
    from openai import AsyncOpenAI

    from benchmarks.serving_client_metrics import StreamClock

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    start = time.monotonic()

    async def one(at: float, prompt: list[int], max_tokens: int) -> dict:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
        clock, text = StreamClock(), []
        try:
            stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices:
                    clock.chunk()
                    text.append(chunk.choices[0].text)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"[:200]}
        if clock.first is None:
            return {"error": "the stream ended without a token"}
        return {"ttft_ms": (clock.first - clock.start) * 1e3, "itl_ms": [gap * 1e3 for gap in clock.gaps],
                "e2e_ms": (clock.last - clock.start) * 1e3, "text": "".join(text)}

    results = await asyncio.gather(*(one(at, prompt, n) for at, prompt, n in requests))
    await client.close()
    return results


def autoscaler_report(address: str) -> tuple[list[dict], dict]:
    """(the autoscaler's decision history, newest first; its status) over the Admin API."""
    from moefleet.client import Client

    with Client(address, token="bench-admin", timeout=30) as client:
        return client.autoscaler_status(history=True, limit=1000), client.autoscaler_status()


def unit_seconds(samples: np.ndarray, column: int, start: float, end: float) -> float:
    """Integral of a pool's size from `start` to `end` (samples: SizePoller's rows; a step function)."""
    inside = samples[(samples[:, 0] >= start) & (samples[:, 0] <= end)]
    if len(inside) < 2:
        return 0.0
    times = np.append(inside[:, 0], end)
    return float(np.sum(np.diff(times) * inside[:, column]))


def run(model: str, workdir: str, seed: int = 0, phases=PHASES, shard_utilization: float = 0.08) -> dict:
    """The real run and its simulation; returns every figure (see the module docstring)."""
    from moefleet import LLM

    os.makedirs(workdir, exist_ok=True)
    entries = bursty_trace(seed, phases)
    trace_path, policy_path = os.path.join(workdir, "bursty.jsonl"), os.path.join(workdir, "policy.yaml")
    write_mooncake(trace_path, entries)
    with open(policy_path, "w") as f:
        f.write(POLICY % {"shard_utilization": shard_utilization})
    llm = LLM(model)
    requests = token_requests(entries, llm.engine.spec.vocab_size, seed + 1)
    expected = greedy_texts(llm, requests)
    del llm

    proc, grpc_address, http_url = start_serve(model, policy_path, os.path.join(workdir, "serve.log"))
    profile_path = os.path.join(workdir, "profile.json")
    try:
        # The profile: the in-process engine, and the same steps through this deployment (remote_step_s);
        # every unit of this deployment runs on this machine's cores.
        print("  moefleet profile --address ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "moefleet.cli", "profile", "--model", model, "--out", profile_path,
                        "--address", grpc_address, "--batch-sizes", "1,4,8",
                        "--shared-cores", str(len(os.sched_getaffinity(0))), "--admin-token", "bench-admin",
                        "--autoscaling-policy", policy_path, "--openai-url", http_url],
                       check=True, stdout=subprocess.DEVNULL)  # its progress and errors on stderr
        time.sleep(20)  # back to the policy's floor after the profile's load
        model_id = os.path.basename(os.path.normpath(model))
        poller, server_ttft = SizePoller(grpc_address).start(), ServerTtft(http_url).start()
        print(f"  replaying {len(requests)} requests over {phases[-1][1]} s ...", file=sys.stderr, flush=True)
        replay_from = time.monotonic() - poller.started
        results = asyncio.run(replay(http_url, model_id, requests))
        replay_to = time.monotonic() - poller.started
        server_p95 = server_ttft.stop_p95_ms()
        time.sleep(30)  # the low phase's scale-down: windows and cooldowns
        samples = poller.stop()
        history, status = autoscaler_report(grpc_address)
    finally:
        stop_serve(proc)

    # Each request's arrival (on the size samples' clock) and TTFT, to read slow requests against the sizes.
    with open(os.path.join(workdir, "requests.json"), "w") as f:
        json.dump({"sizes": samples.tolist(), "requests": [
            {"arrival_s": replay_from + at, "prompt_len": len(prompt), "max_tokens": n, "ttft_ms": r.get("ttft_ms"),
             "e2e_ms": r.get("e2e_ms"), "error": r.get("error")}
            for (at, prompt, n), r in zip(requests, results)]}, f)
    failed = [r["error"] for r in results if "error" in r]
    ttft = np.array([r["ttft_ms"] for r in results if r.get("ttft_ms") is not None])
    same = sum(r.get("text") == e for r, e in zip(results, expected))
    real = {"requests": len(requests), "failed": len(failed), "errors": failed[:5], "greedy_equal": same,
            "replica_seconds": unit_seconds(samples, 1, replay_from, replay_to),
            "shard_seconds": unit_seconds(samples, 2, replay_from, replay_to), "replay_s": replay_to - replay_from,
            "ttft_p95_ms": float(np.percentile(ttft, 95)) if len(ttft) else None,
            "server_ttft_p95_ms": server_p95,
            "peak_replicas": int(samples[:, 1].max()) if len(samples) else 0,
            "peak_shards": int(samples[:, 2].max()) if len(samples) else 0,
            "final_replicas": int(samples[-1, 1]) if len(samples) else 0,
            "final_shards": int(samples[-1, 2]) if len(samples) else 0,
            "duration_s": float(samples[-1, 0]) if len(samples) else 0.0}

    simulated = json.loads(subprocess.run(
        [sys.executable, "-m", "moefleet.cli", "simulate", "--policy", policy_path, "--trace", trace_path,
         "--profile", profile_path, "--plot", os.path.join(workdir, "simulated.png")],
        check=True, capture_output=True, text=True).stdout)
    return {"real": real, "simulated": simulated, "history": history, "status": status, "sizes": samples.tolist(),
            "workdir": workdir}


def main() -> None:
    from benchmarks.report import markdown_table, record
    from moefleet.models.init_model import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the generated tiny Mixtral)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    model = args.model or default_model_dir("mixtral", "tiny")
    out = run(model, args.workdir or tempfile.mkdtemp(prefix="autoscaling-run-"), args.seed)
    real, sim = out["real"], out["simulated"]
    rows = []
    with open(os.path.join(out["workdir"], "profile.json")) as f:
        overhead_ms = json.load(f)["request_overhead_s"] * 1e3  # the least the simulator adds to a first token
    for name, real_value, sim_value in (("replica-seconds", real["replica_seconds"], sim["replica_seconds"]),
                                        ("shard-seconds", real["shard_seconds"], sim["shard_seconds"]),
                                        ("p95 TTFT (ms)", real["ttft_p95_ms"], sim["ttft_ms"]["p95"]),
                                        ("p95 TTFT at the replicas (ms)", real["server_ttft_p95_ms"],
                                         sim["ttft_ms"]["p95"] - overhead_ms)):
        if real_value is None:
            continue
        error = abs(sim_value - real_value) / real_value if real_value else None
        rows.append([name, f"{real_value:.1f}", f"{sim_value:.1f}",
                     f"{100 * error:.0f}%" if error is not None else "-"])
    table = markdown_table(["figure", "real run", "moefleet simulate", "simulator error"], rows)
    changes = [c for d in out["history"] for c in d["changes"]]
    pools = yaml.safe_load(POLICY % {"shard_utilization": 0})["spec"]["pools"]
    low, burst, after = PHASES
    note = (f"{real['requests']} requests (low {low[2]:g}/s, burst {burst[2]:g}/s for {burst[1] - burst[0]} s, low "
            f"{after[2]:g}/s), {real['failed']} failed, "
            f"{real['greedy_equal']}/{real['requests']} greedy outputs equal to the in-process engine's; replicas "
            f"1 -> {real['peak_replicas']} -> {real['final_replicas']}, expert shards 1 -> {real['peak_shards']} -> "
            f"{real['final_shards']}; {len(changes)} changes in the history, each with its reason. The profile is "
            "`moefleet profile --address --openai-url --admin-token --autoscaling-policy` on the same deployment: its "
            "in-process steps (at the torch threads `moefleet serve` gives a replica under the policy), plus what a "
            "step and a first token take through the API beyond them, measured with the deployment at 1, 2 and 3 "
            "expert shards (the `remote` table); how much longer the shards report computing than in process "
            "(`compute_scale`, which scales the hottest shard's share of a step and the utilisation the policy "
            "sees); how much two replicas stepping at once slow each other (`step_cores`, with `--shared-cores "
            f"{len(os.sched_getaffinity(0))}`: the simulator slows each step by the replicas stepping at once and "
            "the units starting over those cores); and the spread of the inter-token gaps (`step_spread`: the "
            "simulator draws each step's time around the modelled one); and, with `--openai-url`, what a first "
            "token takes through the HTTP API with the openai client beyond the replicas' own count of it (their "
            "/metrics), at each batch (`request_overhead`: the simulator reads it at the requests in flight and "
            "slows it as it does a step where the units share the cores). Not modelled: the shards staging a new "
            "placement, a new replica's first steps beyond its warm-up (one throw-away generation before it "
            "reports ready, inside the start time measured), and the scheduling stalls of a unit starting beyond "
            "its average CPU (a starting process's first second can hold a serving step for a few hundred ms). "
            f"Policy: replicas {pools['replicas']['min']}-{pools['replicas']['max']} (at most "
            f"{pools['replicas']['max_step']} at a time), {pools['replicas']['targets']['running_requests']} running "
            f"requests each; shards {pools['expert_shards']['min']}-{pools['expert_shards']['max']}. TTFT at the "
            "client: at the "
            "first streamed chunk, as vLLM's benchmark client times it. TTFT at the replicas: from a request "
            "reaching a replica to its first token, the p95 of "
            "the replicas' own histograms (vllm:time_to_first_token_seconds, scraped from /metrics every second, "
            "interpolated inside its bucket), against the simulated p95 less the profile's request overhead (as on "
            "unshared cores).")
    print(table + "\n" + note)
    for failure in out["status"]["failures"]:
        print(f"  acting failed: {failure}")
    first = min((d["at_s"] for d in out["history"]), default=0.0)
    for decision in reversed(out["history"]):
        for change in decision["changes"]:
            print(f"  t={decision['at_s'] - first:.0f}s {change['action']} {change['pool']} {change['before']}->"
                  f"{change['after']}: {change['reason']}")
    record("autoscaling_run", "Autoscaling: a real run against the simulator", table, note, out,
           write=not args.no_docs)


if __name__ == "__main__":
    main()
