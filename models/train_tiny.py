"""Brief next-token training of a generated checkpoint on the Python standard library's sources
(code and docstrings, present on every machine), so that its routers route the way trained MoE
models do (issue 26, part 6) instead of the near-uniform way of random weights."""

import dataclasses
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterator

import torch

# Left out of the corpus: third-party packages (site-packages lives inside the stdlib folder on a
# source-built Python), the test suites (binary blobs, deliberately odd encodings), and the codec
# tables of `encodings` (over a megabyte of character maps that would teach nothing about routing).
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"})

BATCH_SIZE = 8
SEQ_LEN = 128
PEAK_LR = 2e-3
FINAL_LR_FRACTION = 0.1
MAX_WARMUP_STEPS = 50
PROGRESS_EVERY_S = 5.0
ROUTER_LOSS_WEIGHT = 0.01  # Switch Transformer's and OLMoE's weight for the load-balancing loss


@dataclasses.dataclass(frozen=True)
class TrainingReport:
    """What `training.json` holds: the run's size, its losses (next-token cross-entropy, without the
    router's auxiliary loss) and its cost. The run read the first `corpus_files` of
    `stdlib_sources(seed)`; the sources after them are held out, never trained on."""

    steps: int
    batch_size: int
    seq_len: int
    seed: int
    first_loss: float
    final_loss: float  # mean over the last 10% of steps (at least one), steadier than the last step alone
    corpus_files: int
    corpus_bytes: int  # UTF-8 bytes of the source text tokenized for the run
    tokens: int  # tokens the run trained on, repeats included
    seconds: float


def stdlib_root() -> str:
    """The folder of this Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources(seed: int = 0, root: str | None = None) -> Iterator[tuple[str, str]]:
    """(path relative to the stdlib folder, text) of each standard-library `.py` source, in an order
    shuffled by `seed`; the same seed on the same Python gives the same sequence."""
    root = root or stdlib_root()
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        paths.extend(os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith(".py"))
    paths.sort()
    random.Random(seed).shuffle(paths)
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            yield path, text


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """batches: int64[steps, B, S], sequences cut from the tokenized corpus; what they were cut from."""

    batches: torch.Tensor
    corpus_files: int
    corpus_bytes: int


def training_batches(tokenizer_file: str, steps: int, seed: int = 0, batch_size: int = BATCH_SIZE,
                     seq_len: int = SEQ_LEN) -> TrainingData:
    """Tokenize stdlib sources (shuffled by `seed`, each as <|begin|> text <|end|>) with the
    checkpoint's own tokenizer until there are enough tokens, cut the stream into sequences of
    `seq_len` and deal them out in a seeded order (cycling when the corpus runs short)."""
    from tokenizers import Tokenizer

    from moefleet.models.tokenizer_training import SPECIAL_TOKENS

    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    tokenizer = Tokenizer.from_file(tokenizer_file)
    begin, end = SPECIAL_TOKENS.index("<|begin|>"), SPECIAL_TOKENS.index("<|end|>")
    needed = steps * batch_size * seq_len
    stream: list[int] = []
    files = corpus_bytes = 0
    for _, text in stdlib_sources(seed):
        stream += [begin, *tokenizer.encode(text).ids, end]
        files += 1
        corpus_bytes += len(text.encode("utf-8"))
        if len(stream) >= needed:
            break
    if len(stream) < seq_len:
        raise ValueError(f"seq_len: {seq_len} is longer than the whole corpus ({len(stream)} tokens)")
    chunks = torch.tensor(stream[:len(stream) // seq_len * seq_len]).view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(chunks), generator=generator)
                       for _ in range(math.ceil(steps * batch_size / len(chunks)))])
    batches = chunks[order[:steps * batch_size]].view(steps, batch_size, seq_len)
    return TrainingData(batches, files, corpus_bytes)


def learning_rate(step: int, steps: int, peak: float = PEAK_LR) -> float:
    """Linear warm-up over the first tenth of the run (at most MAX_WARMUP_STEPS), then cosine decay to
    FINAL_LR_FRACTION of the peak at the last step; `step` counts from 0."""
    warmup = max(1, min(MAX_WARMUP_STEPS, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model, batch: torch.Tensor, with_router_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, next-token cross-entropy) of a transformers causal LM on batch: int64[B, S].
    With with_router_loss, the router's load-balancing loss joins the first, weighted
    ROUTER_LOSS_WEIGHT, where transformers computes one (DeepSeek-V3 balances with its bias instead)."""
    out = model(input_ids=batch, labels=batch, use_cache=False, output_router_logits=with_router_loss)
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return out.loss, out.loss
    # transformers already added the config's weight (Qwen3's 0.001 lets a brief run collapse onto a
    # few experts); take it out and put ours in.
    cross_entropy = out.loss - model.config.router_aux_loss_coef * aux
    return cross_entropy + ROUTER_LOSS_WEIGHT * aux, cross_entropy


def train_tiny(model, tokenizer_file: str, steps: int, seed: int = 0, batch_size: int = BATCH_SIZE,
               seq_len: int = SEQ_LEN, threads: int | None = None, progress=sys.stderr) -> TrainingReport:
    """Train `model` (a transformers causal LM, in place) for `steps` AdamW steps of next-token loss
    on the stdlib corpus, router auxiliary loss on; deterministic given `seed` and the thread count
    (`threads`, default every core this process may run on; the caller's setting is restored after).
    Prints step, loss, tokens/s and ETA to `progress` every few seconds."""
    start = time.perf_counter()
    data = training_batches(tokenizer_file, steps, seed, batch_size, seq_len)
    callers_threads, callers_determinism = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    # With more than one thread, the embedding's and experts' scatter-adds sum in whatever order the
    # threads finish unless told otherwise (1e-6 apart after two steps).
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate(0, steps), betas=(0.9, 0.95),
                                  weight_decay=0.01)
    model.train()
    losses: list[float] = []
    train_start = last_print = time.perf_counter()
    try:
        for step, batch in enumerate(data.batches):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps)
            loss, token_loss = next_token_loss(model, batch, with_router_loss=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(token_loss.item())
            now = time.perf_counter()
            if now - last_print >= PROGRESS_EVERY_S or step + 1 == steps:
                last_print = now
                per_step = (now - train_start) / (step + 1)
                print(f"step {step + 1}/{steps}  loss {losses[-1]:.3f}  "
                      f"{batch.numel() / per_step:,.0f} tokens/s  ETA {per_step * (steps - step - 1):.0f}s",
                      file=progress, flush=True)
    finally:
        model.eval()
        torch.set_num_threads(callers_threads)
        torch.use_deterministic_algorithms(callers_determinism)
    tail = losses[-max(1, steps // 10):]
    return TrainingReport(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed, first_loss=losses[0],
                          final_loss=sum(tail) / len(tail), corpus_files=data.corpus_files,
                          corpus_bytes=data.corpus_bytes, tokens=data.batches.numel(),
                          seconds=round(time.perf_counter() - start, 2))
