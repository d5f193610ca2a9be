"""How a replica's outputs reach the gateway, measured side by side on one replica actor:

- `per-token objects`: a Ray streaming generator per request (`Replica.generate_stream` with
  num_returns="streaming"): one Ray object per delta per request, what the gateway used first;
- `actor call per step`: the gateway's channel over actor calls (ActorCallChannel in
  cluster/gateway/replica_channel.py): one `next_outputs` call per engine step for all of the
  gateway's requests on that replica;
- `socket`: the gateway's channel over a TCP connection (SocketChannel, the default): one frame
  per engine step, written by a thread of the replica, read as it arrives.

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
from benchmarks.turns import medians_in_turns  # noqa: E402


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
    from moefleet.cluster.gateway.replica_channel import ActorCallChannel, SocketChannel
    from moefleet.cluster.messages import GenerateRequest
    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", "tiny")
    ray.init(include_dashboard=False, log_to_driver=False)
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores - 1)  # as moefleet serve sizes them: this process takes a gateway's place
    actor = remote_replica_class().remote("bench", EngineConfig(model=model, num_threads=threads), 1024)
    ray.get(actor.ready.remote())
    vocab = ray.get(actor.model_info.remote())["vocab_size"]
    transports = {"per-token objects": lambda r: per_token_objects(actor, r),
                  "actor call per step": ActorCallChannel(actor).stream, "socket": SocketChannel(actor).stream}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = prompts_for(vocab, max(args.requests, concurrency), args.prompt_len, seed=concurrency)

        def load(stream):
            requests = [GenerateRequest(prompt_token_ids=p, sampling_params=params) for p in prompts]
            return lambda: asyncio.run(run_load(stream, requests, concurrency))

        medians = medians_in_turns({name: load(stream) for name, stream in transports.items()}, args.rounds,
                                   f"concurrency {concurrency}, tokens/s")
        base = medians["per-token objects"]
        rows.append([concurrency, *(f"{m:.0f}" for m in medians.values()),
                     f"**{medians['actor call per step'] / base:.2f}x**", f"**{medians['socket'] / base:.2f}x**",
                     f"**{medians['socket'] / medians['actor call per step']:.2f}x**"])
    ray.shutdown()
    table = markdown_table(["concurrency", *(f"{name} tokens/s" for name in transports), "actor call / objects",
                            "socket / objects", "socket / actor call"], rows)
    note = (f"One replica actor (tiny Mixtral, {threads} torch thread(s) on {cores} cores), driven from this process "
            f"(in a gateway's place); {args.requests} requests per load, prompt {args.prompt_len} tokens, greedy, "
            f"{args.max_tokens} output tokens; the transports take turns (the order reversed every other round) for "
            f"{args.rounds} rounds, the median round counting. Not compared: a Ray compiled-graph channel, which runs "
            "a static graph from one driver, where here every gateway process reads from every replica and requests "
            "come and go.")
    print(table + "\n" + note)
    record("output_channel", "Replica -> gateway transport (`benchmarks/output_channel.py`)", table, note,
           {"rows": rows}, write=not args.no_docs)


if __name__ == "__main__":
    main()
