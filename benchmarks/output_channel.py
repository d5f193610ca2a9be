"""How a replica's outputs reach the gateway, measured side by side on one replica actor:

- `per-token objects`: a Ray streaming generator per request (`Replica.generate_stream` with
  num_returns="streaming"): one Ray object per delta per request, what the gateway used before;
- `output channel`: this gateway's channel with the replica (cluster/gateway/replica_channel.py):
  one actor call per engine step for all of the gateway's requests on that replica.

Both run in this process against the same replica actor (the tiny Mixtral, greedy, fixed output
length), taking turns round after round, so the machine's drift hits both alike. Reported: output
tokens/s at each concurrency (requests in flight), the median round, and the ratio.

Usage: python benchmarks/output_channel.py [--concurrency 1,16,64] [--requests 64] [--max-tokens 64]
       [--rounds 3] [--no-docs]
"""

import argparse
import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.engine_throughput import prompts_for  # noqa: E402
from benchmarks.report import markdown_table, record  # noqa: E402


async def per_token_objects(actor, request):
    async for ref in actor.generate_stream.options(num_returns="streaming").remote(request):
        yield await ref


async def run_load(stream, requests: list, concurrency: int) -> float:
    """Output tokens/s of `requests` streamed with `concurrency` in flight."""
    pending, produced = list(requests), 0

    async def worker():
        nonlocal produced
        while pending:
            request = pending.pop()
            async for delta in stream(request):
                produced += len(delta.token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per load (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()

    import ray

    from moefleet import SamplingParams
    from moefleet.actors.replica import remote_replica_class
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.gateway.replica_channel import ReplicaChannel
    from moefleet.cluster.messages import GenerateRequest
    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", "tiny")
    ray.init(include_dashboard=False, log_to_driver=False)
    cores = len(os.sched_getaffinity(0))
    actor = remote_replica_class().remote("bench", EngineConfig(model=model, num_threads=cores), 1024)
    ray.get(actor.ready.remote())
    vocab = ray.get(actor.model_info.remote())["vocab_size"]
    channel = ReplicaChannel(actor)
    transports = {"per-token objects": lambda r: per_token_objects(actor, r), "output channel": channel.stream}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = prompts_for(vocab, max(args.requests, concurrency), args.prompt_len, seed=concurrency)
        results = {name: [] for name in transports}
        for round_ in range(args.rounds):
            order = list(transports) if round_ % 2 == 0 else list(reversed(transports))
            for name in order:
                requests = [GenerateRequest(prompt_token_ids=p, sampling_params=params) for p in prompts]
                results[name].append(asyncio.run(run_load(transports[name], requests, concurrency)))
                print(f"  concurrency {concurrency}, round {round_ + 1}: {name} {results[name][-1]:.0f} tokens/s",
                      file=sys.stderr, flush=True)
        medians = {name: sorted(v)[len(v) // 2] for name, v in results.items()}
        rows.append([concurrency, f"{medians['per-token objects']:.0f}", f"{medians['output channel']:.0f}",
                     f"**{medians['output channel'] / medians['per-token objects']:.2f}x**"])
    ray.shutdown()
    table = markdown_table(["concurrency", "per-token objects tokens/s", "output channel tokens/s", "channel / objects"],
                           rows)
    note = (f"One replica actor (tiny Mixtral, {cores} torch threads), driven from this process; {args.requests} requests "
            f"per load, prompt {args.prompt_len} tokens, greedy, {args.max_tokens} output tokens; the two transports "
            f"take turns for {args.rounds} rounds, the median round counting. Not compared: a Ray compiled-graph "
            "channel and a socket with msgpack frames.")
    print(table + "\n" + note)
    record("output_channel", "Replica -> gateway transport (`benchmarks/output_channel.py`)", table, note,
           {"rows": rows}, write=not args.no_docs)


if __name__ == "__main__":
    main()
