"""Distributed data-plane overhead: the same generation with experts in-process vs in Ray shard
actors reached by actor calls or a compiled graph, 1/2/4 shards, with and without micro-batch
overlap, at batch 1/16/64 — one run, one table.

  tokens/s        = batch * max_tokens / wall time of one greedy generate (after a warm-up)
  step latency    = that wall time / engine steps taken
  vs in-process   = tokens/s over the in-process engine's at the same batch

Usage: python benchmarks/distributed_overhead.py [--batch-sizes 1,16,64] [--max-tokens 32]
Writes benchmarks/results/distributed_overhead.json and its section of docs/benchmarks.md.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402


def measure(llm, batches: list[int], max_tokens: int, prompt_len: int) -> dict[int, dict]:
    import random

    from moefleet import SamplingParams

    vocab = llm.engine.spec.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = {}
    for batch in batches:
        prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]} for _ in range(batch)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        steps = llm.engine.num_steps
        start = time.perf_counter()
        llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        steps = llm.engine.num_steps - steps
        out[batch] = {"tokens_per_s": batch * max_tokens / elapsed, "step_ms": 1000 * elapsed / steps}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--no-docs", action="store_true", help="print only: write neither docs/benchmarks.md nor benchmarks/results/")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from moefleet import LLM
    from moefleet.actors.ray_runtime import ensure_ray
    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", args.size)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ensure_ray()
    configs = [("in-process", 0, False)]
    for transport in ("actor", "compiled_graph"):
        for shards in (int(s) for s in args.shards.split(",")):
            for overlap in (False, True):
                configs.append((transport, shards, overlap))
    results = []
    for transport, shards, overlap in configs:
        print(f"  {transport} shards={shards} overlap={overlap} ...", file=sys.stderr, flush=True)
        options = {} if shards == 0 else {"engine_shards": shards, "transport": transport}
        llm = LLM(model, enable_prefix_caching=False, overlap_microbatches=overlap, **options)
        try:
            per_batch = measure(llm, batches, args.max_tokens, args.prompt_len)
        finally:
            llm.shutdown()
        results.append({"transport": transport, "shards": shards, "overlap": overlap, "by_batch": per_batch})
    base = results[0]["by_batch"]
    rows = []
    for r in results:
        for b in batches:
            m = r["by_batch"][b]
            rows.append([r["transport"], r["shards"] or "-", "on" if r["overlap"] else "off", b,
                         f"{m['tokens_per_s']:.0f}", f"{m['step_ms']:.2f}", f"{m['tokens_per_s'] / base[b]['tokens_per_s']:.2f}x"])
    table = markdown_table(["transport", "shards", "overlap", "batch", "tokens/s", "step ms", "vs in-process"], rows)
    note = (f"mixtral-{args.size}, greedy, prompt {args.prompt_len}, {args.max_tokens} output tokens, float32; the replica "
            "uses the cores its shard actors leave free (at least 1), each shard actor 1 torch thread; the replica and "
            "all shard actors share this machine's cores, so with 4 shards 5 busy processes share 2 cores.")
    print(table + "\n" + note)
    record("distributed_overhead", "Distributed overhead (`benchmarks/distributed_overhead.py`)", table, note,
           {"results": results}, write=not args.no_docs)


if __name__ == "__main__":
    main()
