"""The serving benchmark's loads as pure functions: which requests to send and when.

Three kinds, as vLLM's `benchmark_serving` has them:
  - fixed concurrency: a closed loop keeping C requests in flight, streamed or unary (each output
    whole in one response, as the in-process engine returns it);
  - Poisson arrivals at a request rate (exponential gaps, seeded);
  - replay of a production trace (Azure's CSV, Mooncake's JSONL: read by
    moefleet.cluster.workload.request_trace), each request a synthetic prompt of the trace's
    lengths, arriving at the trace's times multiplied by a time scale.

Prompts are token ids (random, seeded, none of the low special ids), so a prompt is exactly its
length on every server; outputs are forced to their length by the caller (ignore_eos). A
request longer than the model's context is clipped to it, and the load counts how many were.
"""

import math
import random
from dataclasses import dataclass

# parse_trace is re-exported: benchmarks/serving.py reads its trace files through this module.
from moefleet.cluster.workload.request_trace import TraceEntry, clip_to_context
from moefleet.cluster.workload.request_trace import parse_trace as parse_trace

# Token ids below this are special in the generated checkpoints (pad, bos, eos, ...); a prompt
# of random ids avoids them, as benchmarks/engine_throughput.py's prompts do.
FIRST_PLAIN_TOKEN_ID = 10


@dataclass(frozen=True)
class PlannedRequest:
    arrival_s: float  # when to send it, from the load's start (0 for every request of a closed loop)
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Load:
    kind: str  # "concurrency", "poisson" or "trace"
    label: str  # how tables and progress lines name it, e.g. "poisson 4 req/s"
    point: float  # the concurrency, the request rate (inf: all at once), or the trace's time scale
    requests: tuple[PlannedRequest, ...]
    max_concurrency: int | None  # the closed loop's width; None: every request goes at its arrival time
    clipped: int  # requests whose lengths were cut to the model's context
    stream: bool = True  # False: each request's output comes back whole, in one response


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times of `count` requests arriving at `rate` per second on average (exponential
    gaps); an infinite rate sends them all at once."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * count
    rng, at, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def _planned(arrivals: list[float], lengths: list[tuple[int, int]], vocab_size: int, max_model_len: int,
             seed: int) -> tuple[tuple[PlannedRequest, ...], int]:
    """Requests with random token-id prompts of the (clipped) lengths, and how many were clipped."""
    rng, requests, clipped = random.Random(seed), [], 0
    for at, (prompt_len, output_len) in zip(arrivals, lengths):
        fitted = clip_to_context(prompt_len, output_len, max_model_len)
        clipped += fitted != (prompt_len, output_len)
        ids = tuple(rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(fitted[0]))
        requests.append(PlannedRequest(at, ids, fitted[1]))
    return tuple(requests), clipped


def concurrency_load(concurrency: int, count: int, prompt_len: int, output_len: int, vocab_size: int,
                     max_model_len: int, seed: int, stream: bool = True) -> Load:
    requests, clipped = _planned([0.0] * count, [(prompt_len, output_len)] * count, vocab_size, max_model_len, seed)
    label = f"concurrency {concurrency}" + ("" if stream else " unary")
    return Load("concurrency", label, concurrency, requests, concurrency, clipped, stream)


def poisson_load(rate: float, count: int, prompt_len: int, output_len: int, vocab_size: int, max_model_len: int,
                 seed: int) -> Load:
    arrivals = poisson_arrivals(count, rate, seed)
    requests, clipped = _planned(arrivals, [(prompt_len, output_len)] * count, vocab_size, max_model_len, seed)
    return Load("poisson", f"poisson {rate:g} req/s", rate, requests, None, clipped)


def trace_load(name: str, entries: list[TraceEntry], time_scale: float, vocab_size: int, max_model_len: int,
               seed: int) -> Load:
    """Replay: each entry at its arrival time times `time_scale` (0.5 replays twice as fast)."""
    if time_scale <= 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    arrivals = [e.arrival_s * time_scale for e in entries]
    lengths = [(e.prompt_len, e.output_len) for e in entries]
    requests, clipped = _planned(arrivals, lengths, vocab_size, max_model_len, seed)
    return Load("trace", f"trace {name} x{time_scale:g}", time_scale, requests, None, clipped)
