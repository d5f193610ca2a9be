"""Elasticity under the controller: adding an expert shard while serving vs a cold restart of
the deployment with the larger shard count, and what serving looks like during the change — one
run, side by side.

  add-shard time  = from controller.scale_shards(N+1) to every replica acknowledging the new
                    epoch (staging on the shards, store commit, switch between two steps): the
                    change. Retiring the old epoch's experts follows (cleanup, while the new
                    epoch serves); "control s" is the whole call, retire included
  cold restart    = a new deployment (controller, N+1 shard actors, one replica) from nothing to
                    its first generated token (Ray already running in both cases)
  throughput      = tokens/s the replica produced during the change / in the steady state before
                    it; also over the 1 s from the request, which holds the change and what follows
                    (the retire calls included)
  tokens lost     = steady tokens/s x change time - tokens produced during the change
  during / lower  = throughput during / the lower of the steady states before and after (the
                    --after-s window): what the transition itself costs when the change moves
                    serving between two different steady states (adding a shard on a small
                    machine lowers it for good); "after" starts at the acknowledgement
  step latency    = p99 engine step time during the change vs before it

One change takes a fresh shard actor started for it; then --changes changes in a row each take
a standby shard (started earlier, empty), then --rebalances rebalances. The standby deployment
runs --rounds times with the controller's default pacing of control calls and as many times
unpaced (stage_pace_s = 0), alternating. Each change has a steady window of its own before it.
A change lasts a few engine steps, so one change's ratio moves by 0.1-0.3 with one slow step:
the table lists round 1's changes one by one and pools each round's, and all rounds'.

Usage: python benchmarks/elasticity.py [--shards 2] [--streams 16] [--size tiny] [--rounds 3]
Writes benchmarks/results/elasticity.json and its section of docs/benchmarks.md.
"""

import argparse
import asyncio
import os
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402


def window(step_log, start: float, end: float) -> tuple[float, float, int, float]:
    """(tokens/s, p99 step seconds, steps, tokens) over [start, end). A step spans [t - d, t] and
    counts with the share of it inside the window: a change shorter than two steps would
    otherwise be measured by whether a step happened to end inside it. The gaps between steps
    (the engine idle, or busy switching) count as time without tokens."""
    tokens, durations = 0.0, []
    for t, d, n in step_log:
        overlap = min(t, end) - max(t - d, start)
        if overlap > 0 and d > 0:
            tokens += n * overlap / d
            durations.append(d)
    if not durations:
        return 0.0, 0.0, 0, 0.0
    durations.sort()
    return tokens / (end - start), durations[min(len(durations) - 1, int(0.99 * len(durations)))], len(durations), tokens


def start_deployment(model: str, shards: int, standby: int, name: str, pace_s: float | None = None,
                     staging_when_idle: bool | None = None):
    import ray

    from moefleet.actors.controller_host import remote_controller_class
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig

    engine = EngineConfig(model=model, kv_cache_blocks=2048, enable_prefix_caching=False, transport="actor",
                          **({"shard_staging_when_idle": staging_when_idle} if staging_when_idle is not None else {}))
    controller = remote_controller_class().options(name=name).remote(ControllerConfig(
        engine=engine, model_id="bench", expert_shards=shards, standby_shards=standby, monitor_interval_s=5.0,
        **({"stage_pace_s": pace_s} if pace_s is not None else {})))
    ray.get(controller.start.remote(1))
    return controller


def stop_deployment(controller) -> None:
    import ray

    ray.get(controller.shutdown.remote(), timeout=120)
    ray.kill(controller, no_restart=True)


async def changes_while_serving(args, model: str, standby: int, changes: int, rebalances: int = 0,
                                pace_s: float | None = None) -> list[dict]:
    """`changes` add-shard changes in a row, then `rebalances` rebalances, each after a steady window."""
    import ray

    from moefleet.cluster.gateway.replica_pool import RayReplicaHandle
    from moefleet.cluster.messages import GenerateRequest
    from moefleet.cluster.sampling_params import SamplingParams

    controller = start_deployment(model, args.shards, standby, f"bench-elastic-{uuid.uuid4().hex[:8]}", pace_s,
                                  args.staging_when_idle)
    rid, actor, _ = ray.get(controller.replicas.remote())[0]
    handle = RayReplicaHandle(actor, rid)
    sampling = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    stop = asyncio.Event()

    async def stream(i: int):
        while not stop.is_set():
            async for _ in handle.stream(GenerateRequest(prompt_token_ids=[10 + i] * 16, sampling_params=sampling)):
                if stop.is_set():
                    break

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    windows = []
    for k in range(changes + rebalances):
        steady_start = time.perf_counter()
        await asyncio.sleep(args.steady_s)
        change_start = time.perf_counter()
        if k < changes:
            summary = await controller.scale_shards.remote(args.shards + k + 1)
        else:
            summary = await controller.rebalance.remote()
        returned = time.perf_counter()
        await asyncio.sleep(args.after_s)
        windows.append((steady_start, change_start, returned, time.perf_counter(), summary))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    # perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine.
    log = await actor.step_log.remote()
    stop_deployment(controller)
    results = []
    for k, (steady_start, change_start, returned, after_end, summary) in enumerate(windows):
        change_end = summary["acked_at"]  # the controller's CLOCK_MONOTONIC, as perf_counter here
        steady_tps, steady_p99, _, _ = window(log, steady_start, change_start)
        during_tps, during_p99, during_steps, during_tokens = window(log, change_start, change_end)
        first_second_tps, _, _, _ = window(log, change_start, change_start + 1.0)
        after_tps, _, _, _ = window(log, change_end, after_end)
        results.append({"change": "add shard" if k < changes else "rebalance", "shards": summary["shards"],
                        "add_shard_s": change_end - change_start, "control_s": returned - change_start,
                        "retire_s": summary["retire_s"],
                        "steady_tps": steady_tps, "during_tps": during_tps, "first_second_tps": first_second_tps,
                        "after_tps": after_tps,
                        "during_tokens": during_tokens,
                        "tokens_lost": steady_tps * (change_end - change_start) - during_tokens,
                        "steady_p99_s": steady_p99, "during_p99_s": during_p99, "during_steps": during_steps,
                        "stage_s": summary["stage_s"], "switch_s": summary["switch_s"],
                        "from_peers": summary["from_peers"], "from_checkpoint": summary["from_checkpoint"],
                        "shards_staged": summary["shards_staged"]})
    return results


async def cold_restart(args, model: str) -> float:
    import ray

    from moefleet.cluster.gateway.replica_pool import RayReplicaHandle
    from moefleet.cluster.messages import GenerateRequest
    from moefleet.cluster.sampling_params import SamplingParams

    started = time.perf_counter()
    controller = start_deployment(model, args.shards + 1, 0, "bench-cold")
    rid, actor, _ = ray.get(controller.replicas.remote())[0]
    request = GenerateRequest(prompt_token_ids=[11] * 16, sampling_params=SamplingParams(max_tokens=1))
    async for _ in RayReplicaHandle(actor, rid).stream(request):
        pass
    elapsed = time.perf_counter() - started
    stop_deployment(controller)
    return elapsed


async def measure(args) -> dict:
    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", args.size)
    fresh = await changes_while_serving(args, model, standby=0, changes=1)
    # Rounds alternate paced and unpaced, so that both see the machine's slow and fast spells.
    standby, unpaced = [], []
    for _ in range(args.rounds):
        standby.append(await changes_while_serving(args, model, standby=args.changes, changes=args.changes,
                                                   rebalances=args.rebalances))
        unpaced.append(await changes_while_serving(args, model, standby=args.changes, changes=args.changes,
                                                   rebalances=args.rebalances, pace_s=0.0))
    cold_s = await cold_restart(args, model)
    return {"fresh": fresh, "standby": standby, "standby_unpaced": unpaced, "cold_restart_s": cold_s}


def pooled_row(label: str, ms: list[dict]) -> list:
    """One table row adding up changes `ms`: tokens produced during them / what the steady state
    before each would have produced in the same time."""
    seconds = sum(m["add_shard_s"] for m in ms)
    expected = sum(m["steady_tps"] * m["add_shard_s"] for m in ms)
    lower = sum(min(m["steady_tps"], m["after_tps"]) * m["add_shard_s"] for m in ms)
    produced = sum(m["during_tokens"] for m in ms)
    return [label, f"{seconds:.3f}", f"{sum(m['control_s'] for m in ms):.3f}", "-",
            f"**{produced / expected:.2f}**" if expected else "-", f"{produced / lower:.2f}" if lower else "-",
            sum(m["during_steps"] for m in ms), f"{sum(m['tokens_lost'] for m in ms) / len(ms):.1f} per change",
            "-", "-", "-", "-", "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--steady-s", type=float, default=4.0)
    parser.add_argument("--after-s", type=float, default=1.5, help="serving after each change, before the next window")
    parser.add_argument("--changes", type=int, default=3, help="add-shard changes in a row with standby shards")
    parser.add_argument("--rebalances", type=int, default=6,
                        help="rebalances after the add-shard changes (a change lasts ~2 steps: pool several)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="standby deployments of each kind (paced, unpaced), pooled: a change lasts a few steps")
    parser.add_argument("--staging-normal-priority", dest="staging_when_idle", action="store_false", default=None,
                        help="shards stage at serving priority (shard_staging_when_idle = False), for comparison")
    parser.add_argument("--no-docs", action="store_true", help="print only: write neither docs/benchmarks.md nor benchmarks/results/")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from moefleet.actors.ray_runtime import ensure_ray

    ensure_ray()
    r = asyncio.run(measure(args))
    rows = []
    runs = [("fresh shard actor", r["fresh"]), ("standby shard", r["standby"][0]),
            ("standby shard, unpaced", r["standby_unpaced"][0])]
    for label, ms in runs:
        for m in ms:
            ratio = lambda x: f"{x / m['steady_tps']:.2f}" if m["steady_tps"] else "-"  # noqa: E731
            if m["change"] == "add shard":
                name = f"add shard {m['shards'] - 1} -> {m['shards']}, {label}"
                vs_cold = f"{r['cold_restart_s'] / m['add_shard_s']:.1f}x"
            else:
                name, vs_cold = f"rebalance {m['shards']} shards{', unpaced' if 'unpaced' in label else ''}", "-"
            lower = min(m["steady_tps"], m["after_tps"])
            rows.append([name, f"{m['add_shard_s']:.3f}", f"{m['control_s']:.3f}", vs_cold, ratio(m["during_tps"]),
                         f"{m['during_tps'] / lower:.2f}" if lower else "-", m["during_steps"],
                         f"{m['tokens_lost']:.1f}", ratio(m["first_second_tps"]), f"{m['steady_p99_s'] * 1000:.1f}",
                         f"{m['during_p99_s'] * 1000:.1f}", f"{m['shards_staged']} of {m['shards']}",
                         f"{m['from_peers']} / {m['from_checkpoint']}"])
    for label, key in (("", "standby"), (", unpaced", "standby_unpaced")):
        for kind in ("add shard", "rebalance"):  # the standby-path changes of a kind, pooled per round and over all
            rounds = [[m for m in ms if m["change"] == kind] for ms in r[key]]
            for n, ms in enumerate(rounds, 1):
                rows.append(pooled_row(f"{kind} changes (standby path{label}), round {n} of {len(rounds)}, pooled", ms))
            every = [m for ms in rounds for m in ms]
            rows.append(pooled_row(f"**all {len(every)} {kind} changes (standby path{label}), {len(rounds)} rounds, "
                                   f"pooled**", every))
    table = markdown_table(["change", "change s", "control s (retire included)", "cold restart / add", "throughput during / before",
                            "during / lower of before and after", "steps during",
                            "tokens lost", "throughput 1 s from the request / before", "p99 step ms before",
                            "p99 step ms during", "shards staged", "experts from peers / checkpoint"], rows)
    staging = ("Shards stage and export on a thread in Linux's idle scheduling class (shard_staging_when_idle), so "
               "staging takes the CPU serving leaves." if args.staging_when_idle is not False else
               "Shards stage at serving priority in this run (--staging-normal-priority).")
    note = (f"mixtral-{args.size}, one replica under the controller, shard actors reached by actor calls, "
            f"{args.streams} greedy streams running throughout; steady state {r['fresh'][0]['steady_tps']:.0f} tokens/s "
            f"before the first change. Cold restart: {r['cold_restart_s']:.2f} s. "
            f"The new epoch is staged in place, on the shards whose slots it changes only (the others keep their slot "
            f"maps and are not called): the kept shards keep their experts, a shard reads only the experts it "
            f"gains from the memory-mapped checkpoint (expert_source=checkpoint; copying them from peers through the "
            f"object store took 0.25-0.36 s per change in an earlier run here), and the replica switches between two "
            f"steps. "
            f"Cold restart = controller + {args.shards + 1} shard actors + replica to the first token. "
            f"A change is timed from the request to every replica's acknowledgement, the new epoch serving (the "
            f"window the throughput-during columns read); the retire calls that follow free the old epoch's experts "
            f"while the new one serves, and count in 'control s' and in the after-change state. "
            f"A change's control calls (stage on each changed shard, commit, the replica's switch, retire) cost "
            f"~10-30 ms of CPU on this busy 2-core machine; all at once they land in one engine step. By default the "
            f"controller paces them (stage_pace_s = 0.03 s between shards): serving slows a little over several "
            f"steps and the change takes longer; the unpaced rows (stage_pace_s = 0, the same deployment started "
            f"again in this run) show the alternative. "
            f"{staging} "
            f"The rows change by change are round 1's; "
            f"the pooled rows add up each round's changes of a kind, then all {args.rounds} rounds' "
            f"(paced and unpaced deployments alternate). Tokens lost = steady tokens/s x change time - tokens produced "
            f"during it: the change's total cost, which pacing spreads rather than removes. "
            f"'During / lower of before and after' compares with the after-change state too (the {args.after_s} s "
            f"after it): adding a shard moves serving to a lower steady state on this machine, which the "
            f"before-only ratio charges to the transition; the issue's target is read here against the before state. "
            f"Adding a shard also lowers steady throughput for good on "
            f"this 2-core machine (one more process; see the 1-s column), which rebalancing does not. "
            f"Targets (issue #4): cold / add >= 9x, throughput during >= 0.9.")
    print(table + "\n" + note)
    record("elasticity", "Elasticity (`benchmarks/elasticity.py`)", table, note, {"result": r},
           write=not args.no_docs)


if __name__ == "__main__":
    main()
