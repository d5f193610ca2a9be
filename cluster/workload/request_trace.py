"""Request traces: when each request of a production trace arrived and how long its prompt and output
were, read from the two public formats (used by the serving benchmark's replay and the autoscaler's
simulator):
  Azure LLM inference trace CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`,
    TIMESTAMP like `2023-11-16 18:15:46.6805900`;
  Mooncake JSONL: one object a line with `timestamp` (ms), `input_length`, `output_length`
    (other keys, such as `hash_ids`, ignored).
A request longer than the model's context is clipped to it (`clip_to_context`)."""

import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime


class TraceFormatError(ValueError):
    """A trace file that is not in the format it claims; the message names the line."""


@dataclass(frozen=True)
class TraceEntry:
    arrival_s: float  # since the trace's first request
    prompt_len: int
    output_len: int


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
