"""Engine A/B across revisions: moefleet's in-process engine at another git revision (A) against
the working tree (B), in fresh processes that take turns (A B, then B A, ...), on the same
generated model, prompts and settings as benchmarks/engine_throughput.py.

Why turns: on this VM one build's speed differs from one process to the next and drifts over
the hour (docs/design-notes.md), so only A and B run next to each other in time compare. Each
side imports its own tree: a folder of links laid out as the installed package (moefleet/,
moefleet/cluster -> cluster/, ...) from that revision's pyproject, put first on sys.path.

Usage: python benchmarks/engine_ab.py --against REV [--size tiny] [--batch-sizes 1,16,64]
       [--rounds 5] [--dtype float32] [--no-docs]
Prints one row per batch size: A's and B's median output tokens/s, B / A, the range of the
per-round B / A, and whether both gave the same greedy tokens. Records the table in
docs/benchmarks.md (section engine_ab) unless --no-docs.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.engine_throughput import prompts_for, run_moefleet  # noqa: E402
from benchmarks.report import markdown_table, record  # noqa: E402
from benchmarks.turns import median  # noqa: E402


def export_revision(rev: str, into: str) -> str:
    """The tree of `rev` as files under `into`."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def package_farm(tree: str, into: str) -> str:
    """A folder whose moefleet/ package is `tree` laid out as pyproject's package-dir maps it."""
    with open(os.path.join(tree, "pyproject.toml"), "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    package = os.path.join(into, "moefleet")
    os.makedirs(package)
    root_dir = os.path.join(tree, package_dirs["moefleet"])
    for name in os.listdir(root_dir):
        os.symlink(os.path.join(root_dir, name), os.path.join(package, name))
    for dotted, folder in package_dirs.items():
        if dotted.count(".") == 1:  # moefleet.cluster, moefleet.kernels, ...; deeper ones lie inside these
            os.symlink(os.path.join(tree, folder), os.path.join(package, dotted.split(".")[1]))
    return into


def worker(args) -> None:
    sys.path.insert(0, args.farm)  # ahead of ROOT and of the editable install's finder
    import moefleet
    from moefleet import LLM, SamplingParams

    if not os.path.realpath(moefleet.__file__).startswith(os.path.realpath(args.tree)):
        raise SystemExit(f"imported {moefleet.__file__}, not the tree under test {args.tree}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    timings = run_moefleet(args.model, batches, args.max_tokens, args.prompt_len, args.threads, args.repeats, args.dtype)
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads)
    prompts = [{"prompt_token_ids": p} for p in prompts_for(llm.engine.spec.vocab_size, max(batches), args.prompt_len)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
    digest = hashlib.sha256(json.dumps([o.outputs[0].token_ids for o in outputs]).encode()).hexdigest()[:16]
    print("RESULT " + json.dumps({"results": timings, "tokens": digest}), flush=True)


def run_side(tree: str, farm: str, model: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree, "--farm", farm, "--model", model,
           "--batch-sizes", args.batch_sizes, "--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                          timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"worker on {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="git revision A (B is the working tree)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point in a process; the median counts")
    parser.add_argument("--rounds", type=int, default=5, help="processes per side, taken in turns")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-docs", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--farm", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.against:
        parser.error("--against REV is required")

    from moefleet.models.init_model import default_model_dir

    model = default_model_dir("mixtral", args.size)
    with tempfile.TemporaryDirectory(prefix="engine-ab-") as tmp:
        os.makedirs(os.path.join(tmp, "tree-a"))
        sides = {"A": export_revision(args.against, os.path.join(tmp, "tree-a")), "B": ROOT}
        farms = {side: package_farm(tree, os.path.join(tmp, f"farm-{side}")) for side, tree in sides.items()}
        runs: dict[str, list[dict]] = {"A": [], "B": []}
        for round_ in range(args.rounds):
            for side in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                print(f"  round {round_ + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                runs[side].append(run_side(sides[side], farms[side], model, args))
    rows = []
    for i, batch in enumerate(int(b) for b in args.batch_sizes.split(",")):
        a = [r["results"][i]["tokens_per_s"] for r in runs["A"]]
        b = [r["results"][i]["tokens_per_s"] for r in runs["B"]]
        per_round = [y / x for x, y in zip(a, b)]
        rows.append([f"mixtral-{args.size}", batch, f"{median(a):.0f}", f"{median(b):.0f}",
                     f"**{median(b) / median(a):.3f}**", f"{min(per_round):.2f}-{max(per_round):.2f}",
                     "yes" if {r["tokens"] for r in runs["A"] + runs["B"]} == {runs["A"][0]["tokens"]} else "no"])
    table = markdown_table(["model", "batch", "A tokens/s", "B tokens/s", "B / A", "B / A per round", "same tokens"], rows)
    note = (f"A = {args.against}, B = the working tree; {args.rounds} fresh processes per side taken in turns (A B, B A, ...), "
            f"each timing {args.repeats} generate calls per point (median call, then median process); greedy, prompt "
            f"{args.prompt_len} tokens, {args.max_tokens} output tokens, {args.dtype}, {args.threads} torch threads.")
    print(table + "\n" + note)
    record("engine_ab", f"Engine A/B across revisions (`benchmarks/engine_ab.py --against {args.against}`)", table, note,
           {"against": args.against, "runs": runs}, write=not args.no_docs)


if __name__ == "__main__":
    main()
