"""The serving benchmark's loads as pure functions: which requests to send and when.

Three kinds, as vLLM's `benchmark_serving` has them:
  - fixed concurrency: a closed loop keeping C requests in flight;
  - Poisson arrivals at a request rate (exponential gaps, seeded);
  - replay of a production trace in its public format, each request a synthetic prompt of the
    trace's lengths, arriving at the trace's times multiplied by a time scale:
      Azure LLM inference trace CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`,
        TIMESTAMP like `2023-11-16 18:15:46.6805900`;
      Mooncake JSONL: one object a line with `timestamp` (ms), `input_length`, `output_length`
        (other keys, such as `hash_ids`, ignored).

Prompts are token ids (random, seeded, none of the low special ids), so a prompt is exactly its
length on every server; outputs are forced to their length by the caller (ignore_eos). A
request longer than the model's context is clipped to it, and the load counts how many were.
"""

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime

# Token ids below this are special in the generated checkpoints (pad, bos, eos, ...); a prompt
# of random ids avoids them, as benchmarks/engine_throughput.py's prompts do.
FIRST_PLAIN_TOKEN_ID = 10


class TraceFormatError(ValueError):
    """A trace file that is not in the format it claims; the message names the line."""


@dataclass(frozen=True)
class TraceEntry:
    arrival_s: float  # since the trace's first request
    prompt_len: int
    output_len: int


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


def _token_count(value, what: str, line: int) -> int:
    """A length field: a non-negative integer (in a CSV a string of one)."""
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if value.isdigit() else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceFormatError(f"line {line}: {what} must be a non-negative integer, got {value!r}")
    return value


def _from_first(rows: list[tuple[float, int, int]]) -> list[TraceEntry]:
    """Entries in arrival order, timed from the earliest one."""
    if not rows:
        raise TraceFormatError("the trace has no requests")
    start = min(t for t, _, _ in rows)
    return [TraceEntry(t - start, p, o) for t, p, o in sorted(rows, key=lambda r: r[0])]


def parse_azure_csv(text: str) -> list[TraceEntry]:
    """The Azure LLM inference trace (2023/2024 releases). Lines count from 1 (the header)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if header is None or [h.strip() for h in header] != expected:
        raise TraceFormatError(f"line 1: expected the header {','.join(expected)}, got {header!r}")
    rows = []
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != 3:
            raise TraceFormatError(f"line {line}: expected 3 fields, got {len(fields)}: {fields!r}")
        try:
            at = datetime.fromisoformat(fields[0].strip()).timestamp()
        except ValueError:
            raise TraceFormatError(f"line {line}: TIMESTAMP {fields[0]!r} is not a date and time") from None
        rows.append((at, _token_count(fields[1], "ContextTokens", line),
                     _token_count(fields[2], "GeneratedTokens", line)))
    return _from_first(rows)


def parse_mooncake_jsonl(text: str) -> list[TraceEntry]:
    """Mooncake's request trace (`timestamp` in milliseconds). Lines count from 1."""
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"line {line}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise TraceFormatError(f"line {line}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in record]
        if missing:
            raise TraceFormatError(f"line {line}: missing {', '.join(missing)}")
        timestamp = record["timestamp"]
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
            raise TraceFormatError(f"line {line}: timestamp must be a number of milliseconds, got {timestamp!r}")
        rows.append((timestamp / 1000, _token_count(record["input_length"], "input_length", line),
                     _token_count(record["output_length"], "output_length", line)))
    return _from_first(rows)


def parse_trace(path: str, text: str) -> list[TraceEntry]:
    """A trace file's entries, its format told by the file's extension."""
    if path.endswith(".csv"):
        return parse_azure_csv(text)
    if path.endswith((".jsonl", ".json")):
        return parse_mooncake_jsonl(text)
    raise TraceFormatError(f"{path}: unknown trace format (expected an Azure .csv or a Mooncake .jsonl)")


def clip_to_context(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Lengths that fit the context: at least one prompt token and one output token, the output
    cut first to leave that prompt token, then the prompt to what the output leaves."""
    output_len = max(1, min(output_len, max_model_len - 1))
    prompt_len = max(1, min(prompt_len, max_model_len - output_len))
    return prompt_len, output_len


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
                     max_model_len: int, seed: int) -> Load:
    requests, clipped = _planned([0.0] * count, [(prompt_len, output_len)] * count, vocab_size, max_model_len, seed)
    return Load("concurrency", f"concurrency {concurrency}", concurrency, requests, concurrency, clipped)


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
