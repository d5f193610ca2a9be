"""`moefleet simulate`: replay a request trace through an autoscaling policy against a performance profile
and print one JSON summary (optionally a plot); `moefleet profile`: measure that profile with the
in-process engine. Errors leave as one line per problem on stderr with exit code 2 (moefleet.cli.main
prints ValueErrors so)."""

import argparse
import contextlib
import json
import math
import os
import sys
from typing import NamedTuple


def add_autoscaler_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers `simulate` and `profile` under the top-level subcommands."""
    sim = sub.add_parser(
        "simulate", help="replay a request trace through an autoscaling policy (prints one JSON summary)",
        description="Replay a request trace (Azure LLM inference CSV: TIMESTAMP,ContextTokens,GeneratedTokens; or "
                    "Mooncake JSONL: timestamp ms, input_length, output_length) through the autoscaling policy's "
                    "decide(), against a performance profile, and print SLO attainment, replica- and shard-seconds, "
                    "decisions and TTFT/ITL percentiles as one JSON object.")
    sim.add_argument("--policy", required=True, help="the AutoscalingPolicy YAML file")
    sim.add_argument("--trace", required=True, help="the request trace: .csv (Azure) or .jsonl (Mooncake)")
    sim.add_argument("--time-scale", type=float, default=1.0,
                     help="multiply every arrival time by X (2 halves the request rate; default 1)")
    sim.add_argument("--profile", help="performance profile JSON (moefleet profile --out); default: the built-in "
                                       "placeholder profile, not a measurement")
    sim.add_argument("--routing-trace", help="routing trace (moefleet routing record/import): request i takes the "
                                             "expert load of the trace's sequence i mod S")
    sim.add_argument("--seed", type=int, default=0, help="seed of the step times drawn around the profile's (its "
                                                          "step_spread); the same seed replays the same (default 0)")
    sim.add_argument("--plot", help="also draw load, pool sizes and latency against time into this PNG")
    sim.set_defaults(func=_simulate)

    prof = sub.add_parser(
        "profile", help="measure a performance profile with the in-process engine (for moefleet simulate)",
        description="Measure step time against batch size and context, expert-shard compute against token rows, "
                    "and the start times of a replica and of a shard, with the in-process engine, and write them "
                    "as a profile JSON (each field's notes say how it was measured).")
    prof.add_argument("--model", required=True, help="checkpoint directory")
    prof.add_argument("--out", required=True, help="the profile JSON to write")
    prof.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    prof.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    prof.add_argument("--contexts", default="64,512", help="context lengths of the decode batches (default 64,512)")
    prof.add_argument("--prefill-tokens", default="256,1024", help="prompt lengths of single prefill steps "
                                                                   "(default 256,1024)")
    prof.add_argument("--decode-steps", type=int, default=4, help="decode steps timed per point (default 4)")
    prof.add_argument("--shards", type=int, default=2, help="shards the experts are spread over: a shard's start "
                                                            "loads 1/N of them (default 2)")
    prof.add_argument("--shard-rows", default="1,64,512", help="token rows per shard per step (default 1,64,512)")
    prof.add_argument("--address", help="also measure a running deployment of this model (gRPC host:port): the "
                                        "time a step takes there beyond the in-process engine's becomes "
                                        "remote_step_s (shards in other processes, the output path, the "
                                        "deployment's other processes on the same cores)")
    prof.add_argument("--openai-url", help="with --address: the same deployment's OpenAI-compatible API (e.g. "
                                           "http://127.0.0.1:8000/v1): request_overhead_s is then measured there "
                                           "with the openai client, as users time a first token, less the time "
                                           "to first token the replicas count (its /metrics) (needs the openai "
                                           "package: the bench extra)")
    prof.add_argument("--token", help="inference token for --address (default: MOEFLEET_INFERENCE_TOKEN)")
    prof.add_argument("--admin-token", help="admin token for --address (default: MOEFLEET_ADMIN_TOKEN): with it the "
                                            "start times are the deployment's own, timed by asking it for one more "
                                            "replica and one more expert shard (then back)")
    prof.add_argument("--remote-shards", default="1,2,3",
                      help="with --address and an admin token: the expert-shard counts the deployment is measured "
                           "at (scaled there over the Admin API, then back), so the simulator knows what a step "
                           "costs beyond the modelled one at each (default 1,2,3; a deployment keeping its experts "
                           "in its replicas is measured as it is)")
    prof.add_argument("--threads", type=int, help="torch threads of the profiled steps (default: what moefleet serve "
                                                  "gives one replica on this machine, for decode and prefill steps)")
    prof.add_argument("--autoscaling-policy", help="the policy file the deployment is served with (moefleet serve "
                                                   "--autoscaling-policy): the default threads are then those serve "
                                                   "gives a replica under it")
    prof.add_argument("--shared-cores", type=float, help="the deployment's units share this many CPU cores (all on "
                                                         "one machine, as moefleet serve without --ray-address): the "
                                                         "simulator then slows steps that share them; omit when "
                                                         "each unit has cores of its own")
    prof.set_defaults(func=_profile)


def _simulate(args) -> int:
    from moefleet.autoscaler.performance_model import DEFAULT_PROFILE, load_profile
    from moefleet.autoscaler.policy_file import load_policy
    from moefleet.autoscaler.simulator import expert_mixes_from_routing, simulate
    from moefleet.cluster.config.validation_errors import read_text
    from moefleet.cluster.routing.trace import read_trace
    from moefleet.cluster.workload.request_trace import TraceFormatError, parse_trace

    if args.time_scale <= 0:
        raise ValueError(f"--time-scale must be > 0, got {args.time_scale}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    policy = load_policy(args.policy)
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    if not profile.measured:
        print("moefleet simulate: no --profile: using placeholder numbers, not measurements "
              "(run moefleet profile)", file=sys.stderr)
    try:
        entries = parse_trace(args.trace, read_text(args.trace))
    except TraceFormatError as e:
        raise ValueError(f"{args.trace}: {e}") from None
    mixes = expert_mixes_from_routing(read_trace(args.routing_trace)) if args.routing_trace else None
    result = simulate(policy, entries, profile, time_scale=args.time_scale, expert_mixes=mixes, seed=args.seed)
    print(json.dumps(result.summary(), indent=2))
    if args.plot:
        plot_runs({args.trace: {policy.metadata.name: result}}, args.plot)
    return 0


def plot_runs(runs: dict, path: str) -> None:
    """runs: {trace label: {policy label: SimulationResult}}: one column per trace; rows: request rate, replicas,
    expert shards, the SLO percentile of TTFT against its target."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'moefleet[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (("request_rate", "requests/s"), ("replicas", "replicas"), ("expert_shards", "expert shards"),
            ("ttft_ms", "TTFT (ms)"))
    fig, axes = plt.subplots(len(rows), len(runs), figsize=(5.5 * len(runs), 9), sharex="col", squeeze=False)
    for column, (trace, results) in enumerate(runs.items()):
        for row, (name, label) in enumerate(rows):
            ax = axes[row][column]
            for policy, result in results.items():
                series = result.series
                ax.step(series["t"], series[name], where="post", label=policy, linewidth=1)
                if name == "request_rate":
                    break  # the load is the same trace under every policy
            if name == "ttft_ms":
                first = next(iter(results.values()))
                ax.axhline(first.slo_ttft_ms, color="black", linestyle="--", linewidth=0.8, label="SLO")
                ax.set_yscale("log")
            if column == 0:
                ax.set_ylabel(label)
        axes[0][column].set_title(trace)
        axes[-1][column].set_xlabel("time (s)")
        axes[1][column].legend(fontsize=7)
    axes[-1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _median(values) -> float:
    """The middle value (of an even count, the higher of the two middle ones: a measured value, not a mean)."""
    return sorted(values)[len(values) // 2]


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be integers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{flag} must be integers >= 1, got {text!r}")
    return values


def _profile(args) -> int:
    import datetime
    import platform
    import resource
    import subprocess
    import time

    import torch

    from moefleet import LLM, SamplingParams
    from moefleet.autoscaler.performance_model import (
        PerformanceProfile,
        ShardTable,
        StartTimes,
        StepTable,
        save_profile,
    )
    from moefleet.cluster.config.serve_config import ServeConfig
    from moefleet.cluster.engine.spare_cores import own_cpu_s
    from moefleet.cluster.experts.expert_shard import ExpertShard

    batch_sizes = _ints(args.batch_sizes, "--batch-sizes")
    contexts = _ints(args.contexts, "--contexts")
    prefills = [p for p in _ints(args.prefill_tokens, "--prefill-tokens") if p > batch_sizes[-1]]
    shard_rows = _ints(args.shard_rows, "--shard-rows")
    if args.shards < 1 or args.decode_steps < 1:
        raise ValueError(f"--shards ({args.shards}) and --decode-steps ({args.decode_steps}) must be >= 1")

    if args.openai_url and not args.address:
        raise ValueError("--openai-url measures a deployment given by --address: give both")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads ({args.threads}) must be >= 1")
    if args.threads:
        threads = {"num_threads": args.threads, "wide_step_threads": args.threads}
    else:
        served = ServeConfig(autoscaling_policy=args.autoscaling_policy).controller_config(
            args.model, "profile", len(os.sched_getaffinity(0))).engine
        threads = {"num_threads": served.num_threads, "wide_step_threads": served.wide_step_threads}

    started, children = time.perf_counter(), own_cpu_s(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import torch, moefleet.cluster.engine.llm_engine"], check=True)
    process_s, process_cpu_s = time.perf_counter() - started, own_cpu_s(resource.RUSAGE_CHILDREN) - children
    LLM(args.model, dtype=args.dtype).shutdown()  # the first build also compiles or loads the CPU kernels
    started, own = time.perf_counter(), time.process_time()
    llm = LLM(args.model, dtype=args.dtype, **threads)
    engine_s, engine_cpu_s = time.perf_counter() - started, time.process_time() - own
    engine = llm.engine
    spec, config = engine.spec, engine.config
    rng = torch.Generator().manual_seed(0)

    def sequences(count: int, length: int, max_tokens: int):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        ids = torch.randint(10, spec.vocab_size, (count, length), generator=rng).tolist()
        return [engine.admit(engine.make_sequence({"prompt_token_ids": p}, params)) for p in ids]

    def timed_steps(count: int) -> float:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return _median(times)

    def finish(seqs) -> None:
        for seq in seqs:
            if seq.finish_reason is None:
                engine.abort(seq.request_id)

    decode = {}
    for context in contexts:
        for batch in batch_sizes:
            if batch > config.max_num_seqs or context + args.decode_steps + 1 > engine.max_model_len:
                raise ValueError(f"batch {batch} at context {context} does not fit the engine (max_num_seqs "
                                 f"{config.max_num_seqs}, max_model_len {engine.max_model_len})")
            seqs = sequences(batch, context, args.decode_steps + 3)
            while any(not seq.output_token_ids for seq in seqs):  # prefill first
                engine.step()
            engine.step()  # and one decode step untimed: the first after a prefill pays for its warm-up
            decode[batch, context] = timed_steps(args.decode_steps)
            finish(seqs)
    prefill = {}
    for tokens in prefills:
        if tokens > config.max_num_batched_tokens or tokens + 2 > engine.max_model_len:
            raise ValueError(f"--prefill-tokens {tokens} exceeds the step budget ({config.max_num_batched_tokens}) "
                             f"or the context ({engine.max_model_len})")
        seqs = sequences(1, tokens, 1)
        prefill[tokens] = timed_steps(1)
        finish(seqs)
    step = StepTable(tokens=batch_sizes + prefills, context=contexts,
                     seconds=[[decode[b, c] for c in contexts] for b in batch_sizes]
                     + [[prefill[p]] * len(contexts) for p in prefills])

    per_shard = -(-spec.moe.num_experts // args.shards)
    layers = spec.moe_layer_indices
    held = {layer: tuple(range(per_shard)) for layer in layers}
    started, own = time.perf_counter(), time.process_time()
    shard = ExpertShard.from_checkpoint(0, engine.reader, held)
    load_s, load_cpu_s = time.perf_counter() - started, time.process_time() - own
    dtype = engine.reader.dtype
    shard_seconds = []
    for rows in shard_rows:
        x = torch.randn(rows, spec.hidden_size, generator=rng).to(dtype)
        experts = torch.randint(0, per_shard, (rows,), generator=rng)
        index, weights = torch.arange(rows), torch.ones(rows, dtype=dtype)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for layer in layers:
                shard.compute(layer, x, index, experts, weights)
            times.append(time.perf_counter() - started)
        shard_seconds.append(sorted(times)[1])
    kv_tokens = engine.blocks.num_blocks * config.block_size
    llm.shutdown()
    replica_start = StartTimes(cold_s=process_s + engine_s, standby_s=0.0,
                               cores=(process_cpu_s + engine_cpu_s) / (process_s + engine_s))
    shard_start = StartTimes(cold_s=process_s + load_s, standby_s=load_s,
                             cores=(process_cpu_s + load_cpu_s) / (process_s + load_s))
    replica_note = (f"a fresh Python process importing torch and the engine ({process_s:.2f}s) plus building the "
                    f"in-process engine, kernels already built ({engine_s:.2f}s); excludes Ray's actor start")
    shard_note = (f"the same process start plus loading {per_shard} experts per MoE layer from the checkpoint "
                  f"({load_s:.2f}s)")
    admin_token = args.admin_token or os.environ.get("MOEFLEET_ADMIN_TOKEN")
    starts_there = bool(args.address and admin_token)
    shard_there, replica_cores = None, None
    cores_note = "the cores this machine kept busy over that start (the deployment idle otherwise)"
    if starts_there:
        (replica_s, replica_cores), shard_there = _deployment_starts(args.address, admin_token)
        replica_start = replica_start.model_copy(update={"cold_s": replica_s, "cores": replica_cores}
                                                 if replica_cores is not None else {"cold_s": replica_s})
        replica_note = (f"Admin ScaleReplicas to one more replica of the deployment at {args.address}, from asking "
                        f"to serving ({replica_s:.2f}s; then back)")
        if shard_there is not None:
            shard_start = shard_start.model_copy(update={"cold_s": shard_there[0], "cores": shard_there[1]}
                                                 if shard_there[1] is not None else {"cold_s": shard_there[0]})
            shard_note = (f"Admin ScaleShards to one more expert shard of the deployment, from asking to its placement "
                          f"epoch serving ({shard_there[0]:.2f}s; then back)")

    cores = len(os.sched_getaffinity(0))
    profile = PerformanceProfile(
        source=f"measured by moefleet profile on {platform.node()} ({cores} cores, torch {torch.__version__}, "
               f"{args.dtype}) at {datetime.datetime.now().isoformat(timespec='seconds')}",
        model=os.path.abspath(args.model), max_model_len=engine.max_model_len, kv_cache_tokens=kv_tokens,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        num_experts=spec.moe.num_experts, num_moe_layers=len(layers), top_k=spec.moe.top_k,
        expert_bytes=shard.nbytes() // (per_shard * len(layers)),
        step=step, shard=ShardTable(rows=shard_rows, seconds=shard_seconds), remote_step_s=0.0,
        shared_cores=args.shared_cores, step_cores=threads["num_threads"],
        replica_start=replica_start, shard_start=shard_start,
        notes={
            "step": f"decode rows: median of {args.decode_steps} engine steps (after one untimed) of a batch of that "
                    "many sequences at that prompt length; prefill rows: one step prefilling one prompt of that "
                    "length, the same for every context column (its context effect is not measured)",
            "shard": f"median of 3 runs of ExpertShard.compute over all {len(layers)} MoE layers, rows routed to "
                     f"random experts of a shard holding {per_shard} experts per layer",
            "remote_step_s": "not measured (no --address; the in-process engine has no remote shards): 0",
            "request_overhead_s": "not measured (no --address): 0",
            "replica_start.cold_s": replica_note,
            "replica_start.standby_s": "not measured: a warm replica only has to be registered with the gateways; 0",
            "shard_start.cold_s": shard_note,
            "shard_start.standby_s": "loading the experts only: a standby shard's process is already running",
            "kv_cache_tokens": "the engine's KV blocks × block size",
            "step_cores": f"the engine's torch threads: {threads['num_threads']} in decode steps, "
                          f"{threads['wide_step_threads']} in steps that prefill"
                          + ("" if args.threads else " (what moefleet serve gives one replica on this machine)"),
            "shared_cores": "--shared-cores" if args.shared_cores else "not given: each unit has cores of its own",
            "replica_start.cores": cores_note if replica_cores is not None else
            "CPU seconds of a process start and an engine build here over their wall time",
            "shard_start.cores": cores_note if shard_there is not None and shard_there[1] is not None else
            "CPU seconds of a process start and an expert load here over their wall time",
        })
    if args.address:
        profile = _with_deployment_steps(profile, args, contexts[0], batch_sizes, admin_token, spec.vocab_size)
    save_profile(profile, args.out)
    fastest, slowest = min(map(min, step.seconds)), max(map(max, step.seconds))
    print(f"wrote {args.out}: step {fastest * 1000:.1f}-{slowest * 1000:.1f} ms, "
          f"replica start {profile.replica_start.cold_s:.1f}s, shard start {profile.shard_start.cold_s:.1f}s",
          file=sys.stderr)
    return 0


@contextlib.contextmanager
def _autoscaler_held(client):
    """An autoscaler at the deployment is made advisory meanwhile (its policy restored after), so that it does
    not scale the pools under a probe. Yields whether one runs there."""
    import grpc
    import yaml

    try:
        policy = client.get_autoscaling_policy()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        policy = None  # no autoscaler: nothing else scales the pools
    if policy is not None:
        advisory = yaml.safe_load(policy)
        advisory["spec"]["mode"] = "advisory"
        client.set_autoscaling_policy(yaml.safe_dump(advisory))
    try:
        yield policy is not None
    finally:
        if policy is not None:
            client.set_autoscaling_policy(policy)


def _remote_shards(client) -> int:
    """Expert shards the deployment's replicas use outside their own process (0: experts inside them)."""
    replicas = client.cluster_state().replicas
    return sum(shard.node_id != "local" for shard in replicas[0].shards) if replicas else 0


def _shard_compute_s(client) -> float:
    """Expert compute inside the remote shards so far, summed over the replicas and shards."""
    return sum(shard.compute_seconds for replica in client.cluster_state().replicas for shard in replica.shards)


def _timed_on_cores(run) -> tuple[object, float, float | None]:
    """(run()'s result, its wall seconds, the cores this machine kept busy meanwhile or None where the
    machine's busy time cannot be read)."""
    import time

    from moefleet.cluster.engine.spare_cores import machine_busy_s

    busy, started = machine_busy_s(), time.perf_counter()
    result = run()
    seconds, after = time.perf_counter() - started, machine_busy_s()
    return result, seconds, None if busy is None or after is None else (after - busy) / seconds


def _deployment_starts(address: str, admin_token: str) -> tuple[tuple[float, float | None],
                                                                tuple[float, float | None] | None]:
    """((seconds, cores) for the deployment at `address` to serve one more replica, the same for one more
    expert shard or None where it keeps its experts inside the replicas), each scaled back after, with its
    autoscaler held. cores: what this machine kept busy meanwhile (the new unit's process, Ray starting it,
    the controller's epoch), for a deployment on this machine's cores."""
    from moefleet.client import Client

    def timed(scale) -> tuple[float, float | None]:
        _, seconds, cores = _timed_on_cores(scale)
        return seconds, cores

    with Client(address, token=admin_token, timeout=600) as client, _autoscaler_held(client):
        replicas = sum(r.status == "serving" for r in client.cluster_state().replicas)
        replica = timed(lambda: client.scale_replicas(replicas + 1))
        client.scale_replicas(replicas)
        shards, shard = _remote_shards(client), None
        if shards:
            shard = timed(lambda: client.scale_shards(shards + 1))
            client.scale_shards(shards)
    return replica, shard


STREAM_TOKENS = 48  # tokens each probe stream generates: one prefill step, then STREAM_TOKENS - 1 decode steps
NORMAL_P90 = 1.2815515655446004  # the standard normal's 90th percentile


def _probe_prompts(batch: int, context: int, vocab_size: int) -> list[list[int]]:
    """The `batch` prompts of `context` random token ids a probe of that batch sends (the same for each probe)."""
    import random

    return [[random.Random(batch * 1000 + i).randrange(10, vocab_size) for _ in range(context)]
            for i in range(batch)]


class _Served(NamedTuple):
    """What `batch` concurrent greedy streams took through a deployment."""

    gap_s: float  # median seconds between tokens
    first_s: float  # median seconds to the first token
    shard_compute_s: float | None  # expert compute the remote shards reported meanwhile (None: no admin client)
    cores: float | None  # cores this machine kept busy meanwhile
    gap_spread: float  # ln(p90 / median) of the gaps over the normal's 90th percentile: a log-normal's sigma


def _served_times(address: str, token: str | None, batch_sizes: list[int], context: int, vocab_size: int,
                  admin=None) -> dict[int, _Served]:
    """batch -> _Served of `batch` concurrent greedy streams (prompts of `context` random tokens, STREAM_TOKENS
    tokens each) through a deployment's gRPC API; `admin`: a Client with the admin token."""
    import asyncio
    import time

    from moefleet.client import AsyncClient

    async def measure(batch: int) -> tuple[list[float], float]:
        gaps, firsts = [], []
        async with AsyncClient(address, token=token, timeout=600) as client:
            async def one(prompt: list[int]):
                last = sent = time.perf_counter()
                async for message in client.generate_stream(prompt, max_tokens=STREAM_TOKENS, temperature=0,
                                                            ignore_eos=True):
                    now = time.perf_counter()
                    if not message.token_ids:
                        continue
                    if last == sent:
                        firsts.append(now - sent)
                    else:
                        gaps.extend([(now - last) / len(message.token_ids)] * len(message.token_ids))
                    last = now

            await asyncio.gather(*(one(prompt) for prompt in _probe_prompts(batch, context, vocab_size)))
        return gaps, _median(firsts)

    served = {}
    for batch in batch_sizes:
        before = _shard_compute_s(admin) if admin is not None else None
        (gaps, first), _, cores = _timed_on_cores(lambda: asyncio.run(measure(batch)))
        gap, p90 = _median(gaps), sorted(gaps)[int(0.9 * (len(gaps) - 1))]
        served[batch] = _Served(gap, first, None if admin is None else _shard_compute_s(admin) - before, cores,
                                math.log(p90 / gap) / NORMAL_P90 if gap > 0 else 0.0)
    return served


def _server_first_token_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """replica -> (seconds summed, requests counted) of its time to first token so far, from a request reaching
    it to its first token: the vllm:time_to_first_token_seconds histograms at `metrics_url`."""
    import urllib.request

    from moefleet.cluster.gateway.replica_metrics import replica_histograms

    text = urllib.request.urlopen(metrics_url, timeout=60).read().decode()
    return {replica: (total, count)
            for replica, (_, total, count) in replica_histograms(text, "vllm:time_to_first_token_seconds").items()}


def _openai_request_overhead_s(base_url: str, token: str | None, batch_sizes: list[int], context: int,
                               vocab_size: int) -> dict[int, tuple[float, float]]:
    """batch -> (mean seconds to the first streamed chunk of `batch` concurrent greedy completions, prompts of
    `context` random tokens, through an OpenAI-compatible API with the openai client; the mean of the same
    requests' time to first token at the replicas, read off the server's /metrics beside that API)."""
    import asyncio
    import time

    try:
        from openai import AsyncOpenAI
    except ImportError:
        raise ValueError("--openai-url needs the openai package (pip install 'moefleet[bench]')") from None
    metrics_url = base_url.rstrip("/").rsplit("/v1", 1)[0] + "/metrics"

    async def measure(batch: int) -> float:
        client = AsyncOpenAI(base_url=base_url, api_key=token or "unused", max_retries=0, timeout=600)
        model = (await client.models.list()).data[0].id

        async def one(prompt: list[int]) -> float:
            sent = time.perf_counter()
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=STREAM_TOKENS,
                                                     temperature=0, stream=True)
            first = None
            async for chunk in stream:
                if chunk.choices and first is None:
                    first = time.perf_counter() - sent
            return first

        try:
            firsts = await asyncio.gather(*(one(prompt) for prompt in _probe_prompts(batch, context, vocab_size)))
            return sum(firsts) / len(firsts)
        finally:
            await client.close()

    measured = {}
    for batch in batch_sizes:
        before = _server_first_token_totals(metrics_url)
        client_s = asyncio.run(measure(batch))
        # Per replica, so that one retired meanwhile (a scale-down finishing its drain) takes nothing away.
        after = _server_first_token_totals(metrics_url)
        total = sum(seconds - before.get(replica, (0.0, 0.0))[0] for replica, (seconds, _) in after.items())
        count = sum(counted - before.get(replica, (0.0, 0.0))[1] for replica, (_, counted) in after.items())
        if count <= 0:
            raise ValueError(f"{metrics_url}: no vllm:time_to_first_token_seconds counted for the probe's requests "
                             "(is --openai-url the API of the deployment at --address?)")
        measured[batch] = (client_s, total / count)
    return measured


def _two_replicas_served(admin, address: str, token: str | None, batch_sizes: list[int], context: int,
                         vocab: int) -> dict | None:
    """_served_times of twice each batch through two serving replicas (the deployment scaled to two over the Admin
    API when it serves one, then back); None when it serves more than one."""
    serving = sum(r.status == "serving" for r in admin.cluster_state().replicas)
    if serving > 2:
        return None
    if serving == 1:
        admin.scale_replicas(2)
    try:
        return _served_times(address, token, [2 * b for b in batch_sizes], context, vocab)
    finally:
        if serving == 1:
            admin.scale_replicas(1)


def _with_deployment_steps(profile, args, context: int, batch_sizes: list[int], admin_token: str | None,
                           vocab: int):
    """The profile with what a step and a first token take through the running deployment at args.address
    beyond the in-process model: remote_step_s and request_overhead_s; with an admin token also `remote` at
    each of --remote-shards shard counts (the deployment scaled there, then back, its autoscaler held) and
    shard_compute_scale from the compute its shards report."""
    from moefleet.autoscaler.performance_model import RemoteTable, RequestOverheadTable
    from moefleet.client import Client

    token = args.token or os.environ.get("MOEFLEET_INFERENCE_TOKEN")
    by_shards, shards_at, two_replicas = {}, None, None
    if admin_token:
        with Client(args.address, token=admin_token, timeout=600) as admin, _autoscaler_held(admin):
            shards_at = _remote_shards(admin)
            counts = _ints(args.remote_shards, "--remote-shards") if shards_at else [0]
            try:
                for count in counts:
                    if count and count != _remote_shards(admin):
                        admin.scale_shards(count)
                    by_shards[count] = _served_times(args.address, token, batch_sizes, context, vocab, admin)
            finally:
                if shards_at and _remote_shards(admin) != shards_at:
                    admin.scale_shards(shards_at)
            if args.shared_cores:
                two_replicas = _two_replicas_served(admin, args.address, token, batch_sizes, context, vocab)
    else:
        by_shards[None] = _served_times(args.address, token, batch_sizes, context, vocab)

    counts = sorted(by_shards)

    def compute_scale(n: int) -> float | None:
        """Median over the batches of (expert compute the shards reported over the streams) / (the shard table's
        time for the same rows: one prefill step and STREAM_TOKENS - 1 decode steps)."""
        ratios = []
        for b in batch_sizes:
            modelled = n * (profile.shard.time(b * context * profile.top_k / n)
                            + (STREAM_TOKENS - 1) * profile.shard.time(b * profile.top_k / n))
            if by_shards[n][b].shard_compute_s and modelled > 0:
                ratios.append(by_shards[n][b].shard_compute_s / modelled)
        return _median(ratios) if ratios else None

    scales = [compute_scale(n) for n in counts] if shards_at else [None]
    # The modelled step at each count, its shards' compute scaled as measured there and no remote overhead yet.
    scaled = profile if None in scales else profile.model_copy(update={"remote": RemoteTable(
        shards=counts, tokens=batch_sizes, seconds=[[0.0] * len(batch_sizes) for _ in counts], compute_scale=scales)})

    def beyond(count, batch) -> float:  # a step's time there beyond the modelled step
        return max(0.0, by_shards[count][batch].gap_s - scaled.step_time(batch, context, count or 0)[0])

    here = shards_at  # the deployment's own shard count (None: not known without the admin token)
    remote_step_s = _median([beyond(here, b) for b in batch_sizes])
    served_at = by_shards[here]
    update = {"remote_step_s": remote_step_s}
    notes = dict(profile.notes)
    notes["remote_step_s"] = (
        f"median over batches {batch_sizes} of (median inter-token gap of that many concurrent streams through the "
        f"deployment at {args.address}, at its {here if here is not None else 'current'} expert shards, minus the "
        f"modelled step at context {context}): " + ", ".join(
            f"{b}: {served_at[b].gap_s * 1e3:.1f} ms" for b in batch_sizes))
    if shards_at:
        update["remote"] = RemoteTable(shards=counts, tokens=batch_sizes,
                                       seconds=[[beyond(n, b) for b in batch_sizes] for n in counts],
                                       compute_scale=scales if None not in scales else None)
        notes["remote"] = (f"the same at {counts} expert shards (the deployment scaled there over the Admin API, "
                           f"then back to {shards_at}); compute_scale: at each count, the median over the batches "
                           "of (expert compute the deployment's shards reported over the streams) / (the shard "
                           f"table's time for the same rows: one prefill step and {STREAM_TOKENS - 1} decode "
                           "steps), which scales the hottest shard's share of each modelled step")
        if shards_at in counts and scales[counts.index(shards_at)] is not None:
            update["shard_compute_scale"] = scales[counts.index(shards_at)]
            notes["shard_compute_scale"] = f"remote.compute_scale at the deployment's own {shards_at} expert shards"
    # The spread of a step's time: of the inter-token gaps where replicas share the cores most (two at once).
    spread_at, spread_batches = (two_replicas, [2 * b for b in batch_sizes]) if two_replicas else (served_at,
                                                                                                    batch_sizes)
    update["step_spread"] = _median([spread_at[b].gap_spread for b in spread_batches])
    notes["step_spread"] = (
        "median over batches " + str(spread_batches) + " of ln(p90 / median) of the inter-token gaps over the normal's "
        f"90th percentile ({NORMAL_P90:.4f}), " + ("through two replicas at once" if two_replicas else
                                                   "through the deployment") + ": " + ", ".join(
            f"{b}: {spread_at[b].gap_spread:.2f}" for b in spread_batches))
    if two_replicas:
        # Two replicas stepping at once on shared cores slow each other by more than the cores they keep busy
        # say (their shards' calls wait to be scheduled): step_cores is what reproduces the slowdown measured.
        slowdowns = [two_replicas[2 * b].gap_s / served_at[b].gap_s for b in batch_sizes]
        update["step_cores"] = _median(slowdowns) * args.shared_cores / 2
        notes["step_cores"] = (
            f"the cores one replica's steps take, such that two stepping at once on the {args.shared_cores:g} shared "
            f"cores slow each other as measured: median over batches {batch_sizes} of (inter-token gap of twice "
            f"that many streams through two replicas) / (that many through one), at the deployment's "
            f"{here if here is not None else 'current'} expert shards: " + ", ".join(
                f"{b}: {slowdown:.2f}x" for b, slowdown in zip(batch_sizes, slowdowns)))
    elif args.shared_cores:
        # What one busy replica costs the shared cores is more than its torch threads: its shards, the gateway
        # and the client's streams too. Measured as the cores this machine kept busy while the probe ran.
        measured = [served_at[b].cores for b in batch_sizes if served_at[b].cores is not None]
        cores = _median(measured) if len(measured) == len(batch_sizes) else 0.0
        if cores > 0:
            update["step_cores"] = cores
            notes["step_cores"] = (
                f"median over batches {batch_sizes} of the cores this machine kept busy while the deployment served "
                f"that many streams at its {here if here is not None else 'current'} expert shards (the replica, "
                "its shards, the gateway and the probe's own client): " + ", ".join(
                    f"{b}: {served_at[b].cores:.2f}" for b in batch_sizes))
    if args.openai_url:
        # What the replicas count from a request's arrival to its first token is the engine's, whatever the
        # model of it says; the rest of what the client waits (HTTP, the gateway, the output path, the client's
        # own share of the cores) is the overhead.
        timed = _openai_request_overhead_s(args.openai_url, token, batch_sizes, context, vocab)
        overheads = [max(0.0, client_s - server_s) for client_s, server_s in timed.values()]
        how = (f"median over batches {batch_sizes} of (mean time to the first streamed chunk through the "
               f"deployment's OpenAI-compatible API at {args.openai_url}, with the openai client, minus the mean "
               "time to first token the replicas counted for the same requests, from its /metrics): " + ", ".join(
                   f"{b}: {client_s * 1e3:.1f} - {replica_s * 1e3:.1f} ms"
                   for b, (client_s, replica_s) in timed.items()))
        # Each probe's requests are all in flight at their first tokens: the overhead by the streams in flight.
        by_batch = sorted(zip(batch_sizes, overheads))
        update["request_overhead"] = RequestOverheadTable(requests=[b for b, _ in by_batch],
                                                          seconds=[o for _, o in by_batch])
        notes["request_overhead"] = "the same batches' overheads by the requests in flight (each batch's own)"
    else:
        with_remote = profile.model_copy(update=update)  # the modelled prefill, with the remote overhead measured
        overheads = [max(0.0, served_at[b].first_s - with_remote.step_time(b * context, context, here or 0)[0])
                     for b in batch_sizes]
        how = (f"median over batches {batch_sizes} of (median time to first token through the deployment's gRPC "
               "API minus the modelled prefill step): " + ", ".join(
                   f"{b}: {served_at[b].first_s * 1e3:.1f} ms" for b in batch_sizes))
    update["request_overhead_s"] = _median(overheads)
    notes["request_overhead_s"] = how
    update["notes"] = notes
    return profile.model_copy(update=update)
