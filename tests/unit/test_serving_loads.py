"""The serving benchmark's loads (benchmarks/serving_loads.py) and the request traces they replay
(cluster/workload/request_trace.py): both public trace formats parsed from small inline samples,
malformed lines refused naming the line, and the loads built from them (arrival times, exact prompt
lengths, clipping to the context, Poisson gaps)."""

import math
import statistics

import pytest

from benchmarks.serving_loads import FIRST_PLAIN_TOKEN_ID, concurrency_load, poisson_arrivals, poisson_load, trace_load
from moefleet.cluster.workload.request_trace import (
    TraceEntry,
    TraceFormatError,
    clip_to_context,
    parse_azure_csv,
    parse_mooncake_jsonl,
    parse_trace,
)

# The first lines of Azure's AzureLLMInferenceTrace_conv.csv (2023 release).
AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:15:51.3910170,91,16
"""

# Mooncake's trace shape: timestamp in ms, with keys the benchmark ignores (hash_ids).
MOONCAKE = """{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}
{"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46, 52]}

{"timestamp": 27500, "input_length": 12, "output_length": 3}
"""


def test_azure_csv_arrivals_from_the_first_request():
    entries = parse_azure_csv(AZURE)
    assert [(e.prompt_len, e.output_len) for e in entries] == [(374, 44), (396, 109), (879, 55), (91, 16)]
    assert [round(e.arrival_s, 7) for e in entries] == [0.0, 4.314579, 4.541877, 4.710427]


def test_mooncake_jsonl_sorted_by_arrival_in_seconds():
    entries = parse_mooncake_jsonl(MOONCAKE)
    assert entries == [TraceEntry(0.0, 6955, 52), TraceEntry(pytest.approx(0.018), 12, 3),
                       TraceEntry(pytest.approx(3.053), 6472, 26)]


@pytest.mark.parametrize("text, message", [
    ("TIMESTAMP,Context,Generated\n2023-11-16 18:15:46.68,1,1\n", "line 1: expected the header"),
    (AZURE + "2023-11-16 18:15:52.5732450,91\n", "line 6: expected 3 fields"),
    (AZURE + "yesterday,91,16\n", "line 6: TIMESTAMP 'yesterday'"),
    (AZURE + "2023-11-16 18:15:52.5732450,ninety,16\n", "line 6: ContextTokens must be a non-negative integer"),
    (AZURE + "2023-11-16 18:15:52.5732450,91,-3\n", "line 6: GeneratedTokens must be a non-negative integer"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
])
def test_azure_malformed_lines_are_named(text, message):
    with pytest.raises(TraceFormatError, match=message):
        parse_azure_csv(text)


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 1, "input_length": 5', "line 5: not valid JSON"),
    ('[1, 2, 3]', "line 5: expected a JSON object"),
    ('{"timestamp": 1, "output_length": 5}', "line 5: missing input_length"),
    ('{"timestamp": "noon", "input_length": 5, "output_length": 5}', "line 5: timestamp must be a number"),
    ('{"timestamp": 1, "input_length": 5.5, "output_length": 5}', "line 5: input_length must be a non-negative"),
    ('{"timestamp": 1, "input_length": 5, "output_length": true}', "line 5: output_length must be a non-negative"),
])
def test_mooncake_malformed_lines_are_named(line, message):
    with pytest.raises(TraceFormatError, match=message):
        parse_mooncake_jsonl(MOONCAKE + line + "\n")


def test_format_follows_the_extension():
    assert parse_trace("conv.csv", AZURE) == parse_azure_csv(AZURE)
    assert parse_trace("mooncake_trace.jsonl", MOONCAKE) == parse_mooncake_jsonl(MOONCAKE)
    with pytest.raises(TraceFormatError, match="unknown trace format"):
        parse_trace("trace.parquet", AZURE)


@pytest.mark.parametrize("lengths, context, fitted", [
    ((374, 44), 2048, (374, 44)),  # fits: unchanged
    ((6955, 52), 2048, (1996, 52)),  # the prompt gives way to the output
    ((10, 5000), 2048, (1, 2047)),  # the output cut to leave one prompt token
    ((0, 0), 2048, (1, 1)),  # at least one of each
])
def test_clip_to_context(lengths, context, fitted):
    assert clip_to_context(*lengths, context) == fitted


def test_trace_replay_scales_time_and_makes_prompts_of_the_given_lengths():
    entries = parse_mooncake_jsonl(MOONCAKE)
    load = trace_load("mooncake", entries, time_scale=0.5, vocab_size=1024, max_model_len=2048, seed=3)
    assert load.kind == "trace" and load.max_concurrency is None
    assert [r.arrival_s for r in load.requests] == pytest.approx([0.0, 0.009, 1.5265])
    assert [(len(r.prompt_token_ids), r.max_tokens) for r in load.requests] == [(1996, 52), (12, 3), (2022, 26)]
    assert load.clipped == 2
    ids = [t for r in load.requests for t in r.prompt_token_ids]
    assert min(ids) >= FIRST_PLAIN_TOKEN_ID and max(ids) < 1024
    # The same seed gives the same prompts (every server gets the same requests); another, others.
    assert trace_load("mooncake", entries, 0.5, 1024, 2048, seed=3) == load
    assert trace_load("mooncake", entries, 0.5, 1024, 2048, seed=4).requests != load.requests
    with pytest.raises(ValueError, match="time scale"):
        trace_load("mooncake", entries, 0, 1024, 2048, seed=3)


def test_concurrency_load_is_a_closed_loop():
    load = concurrency_load(16, 40, prompt_len=64, output_len=32, vocab_size=1024, max_model_len=2048, seed=0)
    assert (load.kind, load.label, load.max_concurrency, load.clipped) == ("concurrency", "concurrency 16", 16, 0)
    assert len(load.requests) == 40 and {r.arrival_s for r in load.requests} == {0.0}
    assert {(len(r.prompt_token_ids), r.max_tokens) for r in load.requests} == {(64, 32)}
    assert len({r.prompt_token_ids for r in load.requests}) == 40  # no two prompts share a prefix cache entry
    assert load.stream
    unary = concurrency_load(16, 40, prompt_len=64, output_len=32, vocab_size=1024, max_model_len=2048, seed=0,
                             stream=False)
    assert (unary.label, unary.stream, unary.requests) == ("concurrency 16 unary", False, load.requests)


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = poisson_arrivals(4000, rate=8.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1)  # exponential: stdev = mean
    assert poisson_arrivals(5, math.inf, seed=1) == [0.0] * 5
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(5, 0, seed=1)
    load = poisson_load(4.0, 10, prompt_len=8, output_len=8, vocab_size=1024, max_model_len=2048, seed=2)
    assert load.max_concurrency is None and load.label == "poisson 4 req/s"
    assert [r.arrival_s for r in load.requests] == poisson_arrivals(10, 4.0, seed=2)
