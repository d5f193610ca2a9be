"""Autoscaling policies compared by simulation (autoscaler/simulator.py): each trace is replayed through
each policy against the same performance profile, and the table gives SLO attainment, TTFT/ITL p95,
replica-, shard- and unit-seconds (their sum), and the savings in unit-seconds against static peak
provisioning. No cluster is started: the numbers are the simulator's, only as good as its profile.

Traces:
  production  an Azure LLM inference trace CSV or a Mooncake JSONL given with --trace (times × --time-scale);
              without one, a synthetic Azure-style day-shaped load from --seed (a slow wave with noise and
              short spikes; lognormal prompt and output lengths);
  burst       low, a sudden burst, low again (Poisson arrivals);
  expert-mix  a steady load whose expert mix shifts halfway: requests take the expert load of one half of a
              routing trace's sequences (--routing-trace; grouped by their favourite expert), then of the
              other; without one, two synthetic mixes with different hot experts.
Policies:
  moefleet      ours (POLICY below): both pools toward the SLO, standby, trend predictor, expert replication;
  queue_length  Ray Serve's default policy with its default delays and smoothing, targeting the same requests
                per replica as ours (its own default of 2 would simply run at max); shards at their initial
                size;
  static peak   both pools fixed at the largest sizes ours reached on that trace.

Usage: python benchmarks/autoscaling.py [--trace FILE] [--time-scale X] [--routing-trace FILE] [--profile P.json]
                                        [--seed 0] [--no-docs]
Prints the table, draws docs/autoscaling.png and writes benchmarks/results/autoscaling.json with its section
of docs/benchmarks.md (--no-docs: the table and the plot only).
"""

import argparse
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402
from moefleet.autoscaler.performance_model import DEFAULT_PROFILE, load_profile  # noqa: E402
from moefleet.autoscaler.policy_file import parse_policy  # noqa: E402
from moefleet.autoscaler.simulator import expert_mixes_from_routing, simulate  # noqa: E402
from moefleet.autoscaler_cli import plot_runs  # noqa: E402
from moefleet.cluster.routing.trace import read_trace  # noqa: E402
from moefleet.cluster.workload.request_trace import TraceEntry, parse_trace  # noqa: E402

HEADER = "apiVersion: moefleet.io/v1alpha1\nkind: AutoscalingPolicy\nmetadata: {name: %s}\n"
SLO = "slo: {ttft_ms: 2000, itl_ms: 150, percentile: 95, attainment: 0.99, window_s: 30}"
POLICY = HEADER % "moefleet" + f"""spec:
  interval_s: 5
  {SLO}
  pools:
    replicas:
      min: 2
      max: 16
      max_step: 4
      standby: 1
      targets: {{running_requests: 48, waiting_requests: 8, kv_cache_usage: 0.7, ttft_slo_fraction: 0.5,
                itl_slo_fraction: 0.8}}
      scale_up: {{stabilization_window_s: 0, cooldown_s: 10}}
      scale_down: {{stabilization_window_s: 180, cooldown_s: 60}}
    expert_shards:
      min: 1
      max: 12
      max_step: 4
      targets: {{shard_utilization: 0.6, itl_slo_fraction: 0.8}}
      scale_up: {{stabilization_window_s: 0, cooldown_s: 10}}
      scale_down: {{stabilization_window_s: 180, cooldown_s: 60}}
  expert_replication: {{enabled: true, window_s: 30, max_copies: 3, trigger: {{load_ratio: 1.8}},
                       budget: {{moves_per_hour: 60}}}}
  predictor: {{kind: ewma_trend, alpha: 0.5, beta: 0.3}}
"""
QUEUE_LENGTH = HEADER % "queue_length" + f"""spec:
  interval_s: 5
  {SLO}
  policy: queue_length
  queue_length: {{target_ongoing_requests: 48}}
  pools:
    replicas: {{min: 1, max: 16, initial: 2}}
    expert_shards: {{min: 2, max: 12}}
"""
STATIC = HEADER % "static_peak" + """spec:
  interval_s: 5
  %s
  pools:
    replicas: {min: %d, max: %d}
    expert_shards: {min: %d, max: %d}
"""


def _lengths(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Lognormal prompt and output lengths, medians about 1000 and 180 tokens (the Azure conversation trace's
    shape, not its numbers)."""
    prompts = np.clip(rng.lognormal(math.log(1000), 0.8, count), 16, 7000).astype(int)
    outputs = np.clip(rng.lognormal(math.log(180), 0.7, count), 4, 1000).astype(int)
    return prompts, outputs


def _poisson(rng: np.random.Generator, rate_at, duration_s: float) -> list[float]:
    """Arrival times of a Poisson process with a time-varying rate (thinning against the rate's maximum)."""
    peak = max(rate_at(t) for t in np.arange(0, duration_s, 1.0))
    times, t = [], 0.0
    while True:
        t += rng.exponential(1 / peak)
        if t >= duration_s:
            return times
        if rng.random() < rate_at(t) / peak:
            times.append(t)


def _entries(times: list[float], rng: np.random.Generator) -> list[TraceEntry]:
    prompts, outputs = _lengths(rng, len(times))
    return [TraceEntry(t, int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]


def production_trace(seed: int, duration_s: float = 1200.0) -> list[TraceEntry]:
    """A day-shaped wave compressed into `duration_s` (2 to 12 req/s), with noise and three 60-second spikes
    of 6 req/s more."""
    rng = np.random.default_rng(seed)
    spikes = rng.uniform(0.15, 0.85, 3) * duration_s

    def rate(t: float) -> float:
        wave = 2.0 + 10.0 * (0.5 - 0.5 * math.cos(2 * math.pi * t / duration_s))
        return wave + sum(6.0 for start in spikes if start <= t < start + 60)

    return _entries(_poisson(rng, rate, duration_s), rng)


def burst_trace(seed: int) -> list[TraceEntry]:
    """2 req/s for 8 minutes, up to 12 req/s within a minute, held for 3, down within a minute, 2 req/s for 7."""
    rng = np.random.default_rng(seed + 1)
    return _entries(_poisson(rng, lambda t: float(np.interp(t, [480, 540, 720, 780], [2, 12, 12, 2])), 1200.0), rng)


def mix_shift_trace(seed: int, routing_trace: str | None) -> tuple[list[TraceEntry], np.ndarray, np.ndarray]:
    """A wave from 2 to 16 req/s and back over 20 minutes; requests before the middle take mixes of group A,
    after it group B."""
    rng = np.random.default_rng(seed + 2)
    entries = _entries(_poisson(rng, lambda t: 2.0 + 14.0 * math.sin(math.pi * t / 1200.0), 1200.0), rng)
    if routing_trace:
        mixes = expert_mixes_from_routing(read_trace(routing_trace))
        favourite = mixes[:, 0, :].argmax(axis=1)
        order = np.argsort(favourite, kind="stable")
        groups = (order[: len(order) // 2], order[len(order) // 2:])
    else:
        layers, experts = 4, 8
        mixes = np.full((2, layers, experts), 1.0)
        mixes[0, :, 1] = 6.0  # group A: expert 1 hot in every layer
        mixes[1, :, 6] = 6.0  # group B: expert 6
        groups = (np.array([0]), np.array([1]))
    late = np.array([e.arrival_s >= 600.0 for e in entries])
    mix_of_request = np.where(late, rng.choice(groups[1], len(entries)), rng.choice(groups[0], len(entries)))
    return entries, mixes, mix_of_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", help="production trace: Azure .csv or Mooncake .jsonl (default: synthetic)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies the production trace's times")
    parser.add_argument("--routing-trace", help="routing trace for the expert-mix shift (default: synthetic mixes)")
    parser.add_argument("--profile", help="performance profile JSON (default: the placeholder profile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "autoscaling.png"))
    parser.add_argument("--no-docs", action="store_true", help="print only: no results JSON, no docs section")
    args = parser.parse_args()
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE

    if args.trace:
        with open(args.trace) as f:
            production = (parse_trace(args.trace, f.read()), None, None, args.time_scale)
    else:
        production = (production_trace(args.seed), None, None, 1.0)
    traces = {"production": production, "burst": (burst_trace(args.seed), None, None, 1.0),
              "expert-mix": (*mix_shift_trace(args.seed, args.routing_trace), 1.0)}
    ours, queue_length = parse_policy(POLICY), parse_policy(QUEUE_LENGTH)

    rows, data, runs, started = [], {}, {}, time.perf_counter()
    for name, (entries, mixes, mix_of_request, scale) in traces.items():
        def run(policy):
            return simulate(policy, entries, profile, time_scale=scale, expert_mixes=mixes,
                            mix_of_request=mix_of_request)

        results = {"moefleet": run(ours), "queue_length": run(queue_length)}
        peak = results["moefleet"].summary()
        static = parse_policy(STATIC % (SLO, peak["peak_replicas"], peak["peak_replicas"],
                                        peak["peak_expert_shards"], peak["peak_expert_shards"]))
        results["static_peak"] = run(static)
        static_cost = results["static_peak"].replica_seconds + results["static_peak"].shard_seconds
        runs[f"{name} ({len(entries)} requests)"] = results
        for policy, result in results.items():
            summary = result.summary()
            cost = result.replica_seconds + result.shard_seconds
            rows.append([name, policy, f"{summary['slo_attainment']:.4f}", summary["ttft_ms"]["p95"],
                         summary["itl_ms"]["p95"], f"{result.replica_seconds:.0f}", f"{result.shard_seconds:.0f}",
                         f"{cost:.0f}", f"{1 - cost / static_cost:+.1%}", summary["decisions"]])
            data.setdefault(name, {})[policy] = summary
    header = ["trace", "policy", "SLO attainment", "TTFT p95 ms", "ITL p95 ms", "replica-s", "shard-s", "unit-s",
              "savings vs static", "decisions"]
    table = markdown_table(header, rows)
    print(table)
    print(f"profile: {profile.source}; simulated in {time.perf_counter() - started:.1f}s")
    plot_runs(runs, args.plot)
    print(f"plot: {args.plot}")
    note = (f"Simulated, not measured on a cluster: profile `{profile.source}`. SLO: TTFT 2 s and ITL 100 ms at "
            "p95, attainment 0.99. Static peak holds both pools at the largest sizes `moefleet` reached on the "
            "trace. Plot: docs/autoscaling.png.")
    record("autoscaling", "Autoscaling policies (simulated)", table, note,
           {"profile": profile.source, "results": data}, write=not args.no_docs)


if __name__ == "__main__":
    main()
