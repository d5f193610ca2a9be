"""Kernel A/B inside one process: the working tree's compiled CPU kernels (B) against another
version of kernels/csrc (A: a git revision or a directory), built under another op namespace and
swapped in for one op while the engine's generate calls alternate between the two.

Why in one process: on a shared VM the same build varied up to 60% from one process to the next
(docs/design-notes.md, "Measure kernel changes in one process, A against B"), so tables of
separate processes cannot show a 5% change; two copies of one build alternating in one process
agreed within ~1%.

Usage: python benchmarks/kernel_ab.py --against REV_OR_DIR --op OP [--size tiny|small]
       [--batch-sizes 16,64] [--rounds 5] [--dtype float32|bfloat16] [--prompt-len 32] [--max-tokens 64]
  e.g. python benchmarks/kernel_ab.py --against HEAD~1 --op paged_decode_attention
  prefill-bound (one new token per prompt, so tok/s is prompts/s):
       python benchmarks/kernel_ab.py --against HEAD~1 --op paged_prefill_attention --batch-sizes 1,8 \
           --prompt-len 1900 --max-tokens 1
Prints one row per batch size: A's and B's median output tokens/s, B / A, the median of the
rounds' own B / A, and whether both gave the same tokens (greedy decoding). Nothing is written to
docs/.
"""

import argparse
import os
import pkgutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.engine_throughput import prompts_for  # noqa: E402
from benchmarks.report import machine, markdown_table  # noqa: E402

NAMESPACE = "moefleet_ab"


def rate(x: float) -> str:
    """tokens/s as printed: whole numbers, but 3 significant digits where a prefill-bound run makes
    them single digits (rounded to whole tokens, 6 and 8 tok/s read as 1.33x)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def sources_of(against: str) -> dict[str, str]:
    """File name -> text of kernels/csrc in a directory or at a git revision of this repository."""
    if os.path.isdir(against):
        return {n: open(os.path.join(against, n)).read() for n in sorted(os.listdir(against))
                if n.endswith((".cpp", ".h"))}
    names = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", against, "kernels/csrc/"], check=True,
                           capture_output=True, text=True).stdout.split()
    if not names:
        raise SystemExit(f"--against {against}: neither a directory nor a revision with kernels/csrc")
    return {os.path.basename(p): subprocess.run(["git", "-C", ROOT, "show", f"{against}:{p}"], check=True,
                                                capture_output=True, text=True).stdout for p in names}


def build(sources: dict[str, str]):
    """Build the sources as torch.ops.moefleet_ab. Every "moefleet" becomes the new name, the C++
    namespace too, so neither library's symbols stand in for the other's."""
    import torch

    from moefleet.kernels.cpu_extension import compile_library, keyed_build_dir

    renamed = {name: text.replace("moefleet", NAMESPACE) for name, text in sources.items()}
    build_dir = keyed_build_dir({name: text.encode() for name, text in renamed.items()}, "kernels-ab")
    paths = []
    for name, text in renamed.items():
        path = os.path.join(build_dir, name)
        if not os.path.exists(path):  # the directory is keyed by the sources: a file there is this text
            with open(path, "w") as f:
                f.write(text)
        if name.endswith(".cpp"):
            paths.append(path)
    compile_library(f"{NAMESPACE}_ops", paths, build_dir)
    return getattr(torch.ops, NAMESPACE)


class OneOpSwapped:
    """The tree's ops, except `op`, which comes from `other` while `use_other` is set."""

    def __init__(self, tree, other, op: str):
        self.tree, self.other, self.op, self.use_other = tree, other, op, False

    def __getattr__(self, name):
        return getattr(self.other if self.use_other and name == self.op else self.tree, name)


def route_kernel_calls_through(proxy) -> None:
    """Every moefleet.kernels module that asks cpu_ops() for the ops gets the proxy instead."""
    import importlib

    import moefleet.kernels
    from moefleet.kernels import cpu_extension

    for info in pkgutil.iter_modules(moefleet.kernels.__path__):
        module = importlib.import_module(f"moefleet.kernels.{info.name}")
        if getattr(module, "cpu_ops", None) is cpu_extension.cpu_ops and module is not cpu_extension:
            module.cpu_ops = lambda: proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True,
                        help="a git revision (e.g. HEAD~1) or a directory of kernel sources")
    parser.add_argument("--op", required=True, help="the torch.ops.moefleet op to swap, e.g. grouped_swiglu")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed calls per version and batch size, A and B in turns")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from moefleet import LLM, SamplingParams
    from moefleet.kernels.cpu_extension import cpu_ops, unavailable_reason
    from moefleet.models.init_model import default_model_dir

    tree = cpu_ops()
    if tree is None:
        raise SystemExit(f"the working tree's kernels are not loaded: {unavailable_reason()}")
    if not hasattr(tree, args.op):
        raise SystemExit(f"--op {args.op}: torch.ops.moefleet has no such op")
    print(f"building kernels/csrc of {args.against} as torch.ops.{NAMESPACE} ...", flush=True)
    other = build(sources_of(args.against))
    try:
        getattr(other, args.op)
    except (AttributeError, RuntimeError):
        raise SystemExit(f"--op {args.op}: {args.against} has no such op") from None
    proxy = OneOpSwapped(tree, other, args.op)
    route_kernel_calls_through(proxy)

    llm = LLM(default_model_dir("mixtral", args.size), dtype=args.dtype, enable_prefix_caching=False)
    vocab = llm.engine.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [{"prompt_token_ids": p} for p in prompts_for(vocab, batch, args.prompt_len)]
        speeds: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, list] = {}
        for r in range(args.rounds):
            for use_other in ((True, False) if r % 2 else (False, True)):
                proxy.use_other = use_other
                llm.generate(prompts, params)  # warm-up: caches and allocator settle on this version
                start = time.perf_counter()
                outputs = llm.generate(prompts, params)
                speeds[use_other].append(batch * args.max_tokens / (time.perf_counter() - start))
                tokens[use_other] = [o.outputs[0].token_ids for o in outputs]
        a, b = (sorted(speeds[v])[len(speeds[v]) // 2] for v in (True, False))
        # Each round's A and B ran back to back: their ratio is blind to the VM drifting between
        # rounds (2-3x over hours, also within a run of long prefills).
        by_round = sorted(sb / sa for sa, sb in zip(speeds[True], speeds[False]))[len(speeds[True]) // 2]
        rows.append([batch, rate(a), rate(b), f"{b / a:.3f}", f"{by_round:.3f}",
                     "yes" if tokens[True] == tokens[False] else "NO"])
        a_rounds, b_rounds = (" ".join(rate(s) for s in speeds[v]) for v in (True, False))
        print(f"  batch {batch}: A {a_rounds} | B {b_rounds}", flush=True)
    print(f"\n{args.op}: A = {args.against}, B = working tree; mixtral-{args.size} {args.dtype}, prompts of "
          f"{args.prompt_len} tokens, {args.max_tokens} new, {machine()}\n")
    print(markdown_table(["batch", "A tok/s", "B tok/s", "B / A", "B / A by round", "same tokens"], rows))


if __name__ == "__main__":
    main()
