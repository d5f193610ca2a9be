"""Elasticity on one replica: adding a shard while serving vs a cold restart with the larger
shard count, and what serving looks like during the transition — one run.

  add-shard time   = from scale_shards(N+1) to the new epoch serving (prepare + commit)
  cold restart     = a new replica with N+1 shards from nothing to its first generated token
                     (Ray already running in both cases)
  throughput       = tokens/s during the transition / tokens/s in the steady state before it
  step latency     = p99 engine step time during the transition vs before it

Usage: python benchmarks/elasticity.py [--shards 2] [--transport auto] [--streams 16]
Writes benchmarks/results/elasticity.json and its section of docs/benchmarks.md.
"""

import argparse
import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402


def window(step_log, start: float, end: float) -> tuple[float, float]:
    """(tokens/s, p99 step seconds) of the steps that ended in [start, end)."""
    steps = [(d, n) for t, d, n in step_log if start <= t < end]
    if not steps:
        return 0.0, 0.0
    durations = sorted(d for d, _ in steps)
    return sum(n for _, n in steps) / (end - start), durations[min(len(durations) - 1, int(0.99 * len(durations)))]


async def measure(args) -> dict:
    from moefleet.actors.replica import Replica
    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", args.size)
    options = {"model": model, "expert_shards": args.shards, "transport": args.transport, "kv_cache_blocks": 2048,
               "enable_prefix_caching": False}
    replica = Replica("elastic", options)
    sampling = {"temperature": 0, "max_tokens": 1500, "ignore_eos": True}
    stop = asyncio.Event()

    async def stream(i: int):
        while not stop.is_set():
            async for _ in replica.generate_stream({"prompt_token_ids": [10 + i] * 16, "sampling": sampling}):
                if stop.is_set():
                    break

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    steady_start = time.perf_counter()
    await asyncio.sleep(args.steady_s)
    change_start = time.perf_counter()
    await replica.scale_shards(args.shards + 1)
    change_end = time.perf_counter()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    log = list(replica.engine.step_log)
    replica.shutdown()

    steady_tps, steady_p99 = window(log, steady_start, change_start)
    during_tps, during_p99 = window(log, change_start, change_end)
    cold_start = time.perf_counter()
    cold = Replica("cold", {**options, "expert_shards": args.shards + 1})
    await cold.generate({"prompt_token_ids": [11] * 16, "sampling": {"max_tokens": 1}})
    cold_s = time.perf_counter() - cold_start
    cold.shutdown()
    return {"add_shard_s": change_end - change_start, "cold_restart_s": cold_s, "steady_tps": steady_tps,
            "during_tps": during_tps, "steady_p99_s": steady_p99, "during_p99_s": during_p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--steady-s", type=float, default=5.0)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from moefleet.cluster.ray_runtime import ensure_ray

    ensure_ray()
    r = asyncio.run(measure(args))
    rows = [[f"{args.shards} -> {args.shards + 1} shards ({args.transport})", f"{r['add_shard_s']:.2f}",
             f"{r['cold_restart_s']:.2f}", f"{r['cold_restart_s'] / r['add_shard_s']:.2f}x",
             f"{r['during_tps'] / r['steady_tps']:.2f}" if r["steady_tps"] else "-",
             f"{r['steady_p99_s'] * 1000:.1f}", f"{r['during_p99_s'] * 1000:.1f}"]]
    table = markdown_table(["change", "add shard s", "cold restart s", "cold / add", "throughput during / steady",
                            "p99 step ms before", "p99 step ms during"], rows)
    note = (f"mixtral-{args.size}, {args.streams} greedy streams running throughout; steady state {r['steady_tps']:.0f} "
            f"tokens/s. Adding a shard starts a fresh set of shard actors for the new epoch (each loads its experts "
            f"from the memory-mapped checkpoint) while the old set serves, then switches between two steps. Targets "
            f"(issue #4): cold / add >= 9x, throughput during >= 0.9.")
    print(table + "\n" + note)
    record("elasticity", "Elasticity (`benchmarks/elasticity.py`)", table, note, {"result": r},
           write_docs=not args.no_docs)


if __name__ == "__main__":
    main()
