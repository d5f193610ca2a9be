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
                its replica target (12 running requests) is what one replica of the profiled model holds within
                the TTFT target with long prompts; shards scale on their utilisation;
  queue_length  Ray Serve's default policy with its default delays and smoothing, shards at their initial size:
                at the same requests per replica as ours, and swept over --queue-targets (its own default of 2
                would simply run at max) to show what it attains at each cost;
  static peak   both pools fixed at the largest sizes ours reached on that trace.
Each trace is drawn from --seeds seeds (the same seeds for every policy): the table gives the mean over seeds
(attainment also its worst seed); the plot shows the first seed.

Usage: python benchmarks/autoscaling.py [--trace FILE] [--time-scale X] [--routing-trace FILE] [--profile P.json]
                                        [--seeds 5] [--queue-targets 8,24,48] [--no-docs]
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
SLO_TTFT_MS, SLO_ITL_MS, SLO_ATTAINMENT = 2000, 150, 0.99
SLO = (f"slo: {{ttft_ms: {SLO_TTFT_MS}, itl_ms: {SLO_ITL_MS}, percentile: 95, attainment: {SLO_ATTAINMENT}, "
       "window_s: 30}")
REQUESTS_PER_REPLICA = 12
POLICY = HEADER % "moefleet" + f"""spec:
  interval_s: 5
  {SLO}
  pools:
    replicas:
      min: 2
      max: 16
      max_step: 4
      standby: 1
      targets: {{running_requests: {REQUESTS_PER_REPLICA}, waiting_requests: 8, kv_cache_usage: 0.7,
                ttft_slo_fraction: 0.5, itl_slo_fraction: 0.8}}
      scale_up: {{stabilization_window_s: 0, cooldown_s: 10}}
      scale_down: {{stabilization_window_s: 180, cooldown_s: 60}}
    expert_shards:
      min: 1
      max: 12
      max_step: 4
      targets: {{shard_utilization: 0.8}}
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
  queue_length: {{target_ongoing_requests: %d}}
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


def traces_for(seed: int, args) -> dict:
    """name -> (entries, expert mixes, mix of each request, time scale) of the three traces drawn from `seed`."""
    if args.trace:
        with open(args.trace) as f:
            production = (parse_trace(args.trace, f.read()), None, None, args.time_scale)
    else:
        production = (production_trace(seed), None, None, 1.0)
    return {"production": production, "burst": (burst_trace(seed), None, None, 1.0),
            "expert-mix": (*mix_shift_trace(seed, args.routing_trace), 1.0)}


def queue_length_label(target: int) -> str:
    return f"queue_length ({target}{', as ours' if target == REQUESTS_PER_REPLICA else ''})"


def summarise(results: list) -> dict:
    """The mean over seeds of one policy's runs on one trace (attainment also its worst seed)."""
    summaries = [r.summary() for r in results]
    attainment = [s["slo_attainment"] for s in summaries]
    return {"slo_attainment": float(np.mean(attainment)), "slo_attainment_worst": float(min(attainment)),
            "ttft_p95_ms": float(np.mean([s["ttft_ms"]["p95"] for s in summaries])),
            "itl_p95_ms": float(np.mean([s["itl_ms"]["p95"] for s in summaries])),
            "replica_seconds": float(np.mean([r.replica_seconds for r in results])),
            "shard_seconds": float(np.mean([r.shard_seconds for r in results])),
            "unit_seconds": float(np.mean([r.replica_seconds + r.shard_seconds for r in results])),
            "decisions": float(np.mean([s["decisions"] for s in summaries])), "per_seed": summaries}


def findings(data: dict) -> str:
    """Per trace: ours against the SLO, static peak and every queue-length target that spends as much or more."""
    lines = []
    for trace, policies in data.items():
        ours, static = policies["moefleet"], policies["static_peak"]
        queue = {name: p for name, p in policies.items() if name.startswith("queue_length")}
        costlier = [p for p in queue.values() if p["unit_seconds"] >= ours["unit_seconds"]]
        best = max((p["slo_attainment"] for p in costlier), default=None)
        meeting = [(p["unit_seconds"], name) for name, p in queue.items()
                   if p["slo_attainment_worst"] >= SLO_ATTAINMENT]
        lines.append(
            f"{trace}: ours {ours['slo_attainment']:.4f} (worst seed {ours['slo_attainment_worst']:.4f}) at "
            f"{1 - ours['unit_seconds'] / static['unit_seconds']:.0%} fewer unit-seconds than static peak; "
            + (f"the queue-length targets spending as much or more attain at best {best:.4f}" if costlier
               else "no queue-length target spends as much")
            + "; " + (f"the cheapest one holding {SLO_ATTAINMENT} on every seed: {min(meeting)[1]} at "
                      f"{min(meeting)[0] / ours['unit_seconds']:.2f}x ours' unit-seconds" if meeting
                      else f"none holds {SLO_ATTAINMENT} on every seed") + ".")
    return " ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", help="production trace: Azure .csv or Mooncake .jsonl (default: synthetic)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies the production trace's times")
    parser.add_argument("--routing-trace", help="routing trace for the expert-mix shift (default: synthetic mixes)")
    parser.add_argument("--profile", help="performance profile JSON (default: the placeholder profile)")
    parser.add_argument("--seeds", type=int, default=5, help="draws of each synthetic trace (default 5)")
    parser.add_argument("--queue-targets", default="8,24,48",
                        help="target_ongoing_requests of the queue-length policy, besides ours' requests per replica")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "autoscaling.png"))
    parser.add_argument("--no-docs", action="store_true", help="print only: no results JSON, no docs section")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    targets = sorted({REQUESTS_PER_REPLICA, *(int(t) for t in args.queue_targets.split(",") if t.strip())})
    policies = {"moefleet": parse_policy(POLICY),
                **{queue_length_label(t): parse_policy(QUEUE_LENGTH % t) for t in targets}}

    results, runs, started = {}, {}, time.perf_counter()
    for seed in range(args.seeds):
        for name, (entries, mixes, mix_of_request, scale) in traces_for(seed, args).items():
            if name == "production" and args.trace and seed:
                continue  # a trace file is the same on every seed

            def run(policy):
                return simulate(policy, entries, profile, time_scale=scale, expert_mixes=mixes,
                                mix_of_request=mix_of_request, seed=seed)

            seed_results = {label: run(policy) for label, policy in policies.items()}
            peak = seed_results["moefleet"].summary()
            seed_results["static_peak"] = run(parse_policy(STATIC % (
                SLO, peak["peak_replicas"], peak["peak_replicas"], peak["peak_expert_shards"],
                peak["peak_expert_shards"])))
            for label, result in seed_results.items():
                results.setdefault(name, {}).setdefault(label, []).append(result)
            if seed == 0:
                shown = ("moefleet", queue_length_label(REQUESTS_PER_REPLICA), "static_peak")
                runs[f"{name} ({len(entries)} requests)"] = {label: seed_results[label] for label in shown}
            print(f"  seed {seed} {name}: done", file=sys.stderr, flush=True)

    data, rows = {}, []
    for name, by_policy in results.items():
        data[name] = {label: summarise(runs_of) for label, runs_of in by_policy.items()}
        static_cost = data[name]["static_peak"]["unit_seconds"]
        for label, s in data[name].items():
            rows.append([name, label, f"{s['slo_attainment']:.4f} ({s['slo_attainment_worst']:.4f})",
                         f"{s['ttft_p95_ms']:.0f}", f"{s['itl_p95_ms']:.1f}", f"{s['replica_seconds']:.0f}",
                         f"{s['shard_seconds']:.0f}", f"{s['unit_seconds']:.0f}",
                         f"{1 - s['unit_seconds'] / static_cost:+.1%}", f"{s['decisions']:.0f}"])
    header = ["trace", "policy", "SLO attainment (worst seed)", "TTFT p95 ms", "ITL p95 ms", "replica-s", "shard-s",
              "unit-s", "savings vs static", "decisions"]
    table = markdown_table(header, rows)
    found = findings(data)
    print(table)
    print(found)
    print(f"profile: {profile.source}; simulated in {time.perf_counter() - started:.1f}s")
    plot_runs(runs, args.plot)
    print(f"plot: {args.plot}")
    seeds = "one production trace file" if args.trace else f"{args.seeds} seeds of each trace"
    note = (f"Simulated, not measured on a cluster: profile `{profile.source}` (kept in "
            f"benchmarks/results/autoscaling.json). SLO: TTFT {SLO_TTFT_MS / 1000:g} s and ITL {SLO_ITL_MS} ms at "
            f"p95, attainment {SLO_ATTAINMENT}. Means over {seeds}; TTFT and ITL: the mean of each seed's p95. "
            "Static peak holds both pools at the largest sizes `moefleet` reached on the trace. queue_length (N): "
            "Ray Serve's queue-length policy at target_ongoing_requests N. Plot (first seed): docs/autoscaling.png."
            f"\n\nFindings. {found}")
    record("autoscaling", "Autoscaling policies (simulated)", table, note,
           {"profile": profile.model_dump(), "seeds": args.seeds, "results": data}, write=not args.no_docs)


if __name__ == "__main__":
    main()
