"""Routing traces: the file format (round trip, gzip, every bad line named by path and line), the
columns and token paths, and the importers of vLLM's and SGLang's routed experts."""

import base64
import io
import json

import numpy as np
import pytest

from moefleet.cluster.routing.importers import from_sglang, from_vllm
from moefleet.cluster.routing.trace import RoutingEvent, RoutingTrace, TraceFormatError, read_trace, write_trace

EVENTS = [
    RoutingEvent("a", 0, 11, 0, (3, 1)),
    RoutingEvent("a", 0, 11, 1, (0,)),
    RoutingEvent(7, 0, None, 0, (2, 0)),
    RoutingEvent("a", 1, 12, 1, (1, 2)),
]


@pytest.mark.parametrize("name", ["trace.jsonl", "trace.jsonl.gz"])
def test_round_trip_plain_and_gzip(tmp_path, name):
    path = tmp_path / name
    assert write_trace(str(path), EVENTS) == 4
    trace = read_trace(str(path))
    assert list(trace.events()) == EVENTS
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"


def test_columns_golden(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(str(path), EVENTS)
    trace = read_trace(str(path))
    # sequences in first-seen order: "a" -> 0, 7 -> 1; null token -> -1; events with one expert padded by -1
    assert trace.seq_names == ("a", 7)
    assert trace.seq.tolist() == [0, 0, 1, 0]
    assert trace.pos.tolist() == [0, 0, 0, 1]
    assert trace.token.tolist() == [11, 11, -1, 12]
    assert trace.layer.tolist() == [0, 1, 0, 1]
    assert trace.experts.tolist() == [[3, 1], [0, -1], [2, 0], [1, 2]]
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.num_events, trace.num_sequences) == (2, 4, 2, 4, 2)
    # expert_load[l, e]: layer 0 chose 3, 1, 2, 0 once each; layer 1 chose 0, 1, 2 once each
    assert trace.expert_load().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_paths_one_row_per_token_occurrence():
    trace = RoutingTrace.from_events(EVENTS)
    seq, tokens, experts = trace.paths()
    # occurrences ordered by sequence then position: (a, 0), (a, 1), (7, 0)
    assert seq.tolist() == [0, 0, 1]
    assert tokens.tolist() == [11, 12, -1]
    assert experts.tolist() == [
        [[3, 1], [0, -1]],     # (a, 0): both layers
        [[-1, -1], [1, 2]],    # (a, 1): no event at layer 0
        [[2, 0], [-1, -1]],    # (7, 0): no event at layer 1
    ]


def test_num_experts_given_is_kept_and_checked(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(str(path), EVENTS)
    assert read_trace(str(path), num_experts=64).num_experts == 64
    with pytest.raises(TraceFormatError, match=r"t.jsonl:1: expert 3 is out of range for 3 experts"):
        read_trace(str(path), num_experts=3)


GOOD = '{"seq": "s", "pos": 0, "token": 5, "layer": 0, "experts": [1, 2]}'


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"seq": "s", "pos": 0, "token": 5, "experts": [1]}', "missing key 'layer'"),
    ('{"seq": 1.5, "pos": 0, "token": 5, "layer": 0, "experts": [1]}', "'seq' must be a string or an integer"),
    ('{"seq": "s", "pos": -1, "token": 5, "layer": 0, "experts": [1]}', "'pos' must be an integer >= 0"),
    ('{"seq": "s", "pos": 0, "token": 5, "layer": "0", "experts": [1]}', "'layer' must be an integer >= 0"),
    ('{"seq": "s", "pos": 0, "token": -2, "layer": 0, "experts": [1]}', "'token' must be an integer >= 0 or null"),
    ('{"seq": "s", "pos": 0, "token": true, "layer": 0, "experts": [1]}', "'token' must be an integer >= 0 or null"),
    ('{"seq": "s", "pos": 0, "token": 5, "layer": 0, "experts": []}', "'experts' must be a non-empty list"),
    ('{"seq": "s", "pos": 0, "token": 5, "layer": 0, "experts": [1, -3]}', "'experts' holds -3"),
    ('{"seq": "s", "pos": 0, "token": 5, "layer": 0, "experts": [1, 2.0]}', "'experts' holds 2.0"),
    ('{"seq": "s", "pos": 0, "token": 5, "layer": 0, "experts": [4, 1, 4]}', "names an expert twice"),
])
def test_bad_lines_name_path_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")  # the blank line still counts: the bad one is line 3
    with pytest.raises(TraceFormatError) as raised:
        read_trace(str(path))
    assert str(raised.value).startswith(f"{path}:3: ") and problem in str(raised.value)


def test_token_may_be_left_out_and_empty_or_corrupt_files_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"seq": "s", "pos": 0, "layer": 0, "experts": [1]}\n')
    assert read_trace(str(path)).token.tolist() == [-1]
    path.write_text("\n")
    with pytest.raises(TraceFormatError, match="no routing events"):
        read_trace(str(path))
    corrupt = tmp_path / "t.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(TraceFormatError, match="not a readable gzip file"):
        read_trace(str(corrupt))
    with pytest.raises(ValueError, match=r"event 1: 'experts' names an expert twice"):
        RoutingTrace.from_events([EVENTS[0], RoutingEvent("a", 2, None, 0, (1, 1))])


def test_progress_is_reported_while_reading(tmp_path, monkeypatch):
    import moefleet.cluster.routing.trace as trace_module

    monkeypatch.setattr(trace_module, "PROGRESS_EVERY", 2)
    path = tmp_path / "t.jsonl"
    write_trace(str(path), EVENTS)
    seen = []
    read_trace(str(path), progress=seen.append)
    assert seen == [2, 4]


# ---- importers ----------------------------------------------------------------------------------

def _npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


# [tokens, layers, top_k] for a 3-token prompt and 2 generated tokens: 4 forwarded positions. Layer 0
# is dense (vLLM 0.20 and SGLang fill it with zeros); layers 1 and 2 are MoE layers 0 and 1.
ROWS = np.array([
    [[0, 0], [1, 4], [2, 5]],
    [[0, 0], [3, 0], [6, 7]],
    [[0, 0], [2, 1], [5, 4]],
    [[0, 0], [7, 6], [1, 0]],
], dtype=np.int16)
PROMPT, OUTPUT = [101, 102, 103], [201, 202]


def _expected(seq, positions, tokens):
    """The events of ROWS[positions] (MoE layers 1 and 2 of the model renumbered 0 and 1)."""
    return [RoutingEvent(seq, p, t, moe, tuple(ROWS[p, moe + 1].tolist()))
            for p, t in zip(positions, tokens) for moe in range(2)]


def test_vllm_completions_npy_rows_from_the_first_prompt_token():
    response = {"id": "cmpl-1", "prompt_token_ids": PROMPT,
                "choices": [{"index": 0, "token_ids": OUTPUT, "routed_experts": _npy_base64(ROWS)}]}
    # the last generated token (202) is never forwarded: rows are positions 0..3 = tokens 101 102 103 201
    assert from_vllm(response, "r") == _expected("r", range(4), [101, 102, 103, 201])


def test_vllm_chat_nested_lists_cover_the_generated_part():
    # chat gives one row per generated token, ending at the last forwarded position (3): positions 2, 3
    response = {"prompt_token_ids": PROMPT,
                "choices": [{"index": 0, "token_ids": OUTPUT, "routed_experts": ROWS[2:].tolist()}]}
    assert from_vllm(response, "c") == _expected("c", [2, 3], [103, 201])


def test_vllm_split_prompt_and_choice_routes_encoded_int16():
    def encoded(rows):
        return {"encoding": "base64", "dtype": "int16", "shape": list(rows.shape),
                "data": base64.b64encode(rows.tobytes()).decode()}

    response = {"prompt_routed_experts": encoded(ROWS[:3]), "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                "choices": [{"index": 0, "routed_experts": encoded(ROWS[3:])}]}
    # no token ids asked for: positions from the counts, tokens null
    assert from_vllm(response, 5) == _expected(5, range(4), [None] * 4)
    # one generated token: nothing of it was forwarded, the choice has no routes
    single = {"prompt_token_ids": PROMPT, "prompt_routed_experts": ROWS[:3].tolist(),
              "choices": [{"index": 0, "token_ids": [201], "routed_experts": None}]}
    assert from_vllm(single, 6) == _expected(6, range(3), [101, 102, 103])


def test_vllm_several_choices_are_several_sequences_and_moe_layers_can_be_named():
    response = {"choices": [{"index": 0, "routed_experts": ROWS[:2].tolist()},
                            {"index": 1, "routed_experts": ROWS[2:].tolist()}]}
    events = from_vllm(response, "n", moe_layers=[2])
    assert [(e.seq, e.pos, e.layer, e.experts) for e in events] == [
        ("n.0", 0, 0, (2, 5)), ("n.0", 1, 0, (6, 7)), ("n.1", 0, 0, (5, 4)), ("n.1", 1, 0, (1, 0))]


def test_sglang_generate_raw_buffer_needs_the_shape():
    meta = {"id": "abc", "prompt_tokens": 3, "completion_tokens": 2,
            "routed_experts": base64.b64encode(ROWS.astype(np.int32).tobytes()).decode()}
    response = {"text": "..", "output_ids": OUTPUT, "meta_info": meta}
    # prompt ids are not in SGLang's response: prompt tokens stay null, generated ones are known
    assert from_sglang(response, "g", num_layers=3, top_k=2) == _expected("g", range(4), [None, None, None, 201])
    with pytest.raises(ValueError, match="give num_layers and top_k"):
        from_sglang(response, "g")
    with pytest.raises(ValueError, match="not a multiple of num_layers x top_k = 3 x 3"):
        from_sglang(response, "g", num_layers=3, top_k=3)


def test_sglang_uint16_wire_and_start_len_and_openai_form():
    narrow = {"output_ids": OUTPUT, "input_ids": PROMPT,
              "meta_info": {"routed_experts_dtype": "uint16", "prompt_tokens": 3, "completion_tokens": 2,
                            "routed_experts": base64.b64encode(ROWS[1:].astype(np.uint16).tobytes()).decode()}}
    # rows from routed_experts_start_len = 1: they still end at the last forwarded position, 3
    assert from_sglang(narrow, "u", num_layers=3, top_k=2) == _expected("u", [1, 2, 3], [102, 103, 201])
    openai = {"prompt_token_ids": PROMPT, "usage": {"prompt_tokens": 3, "completion_tokens": 2},
              "choices": [{"index": 0, "token_ids": OUTPUT,
                           "sgl_ext": {"routed_experts": base64.b64encode(ROWS.astype(np.int32).tobytes()).decode()}}]}
    assert from_sglang(openai, "o", num_layers=3, top_k=2) == _expected("o", range(4), [101, 102, 103, 201])


@pytest.mark.parametrize("response, problem", [
    ({"choices": [{"index": 0}]}, "no routed experts in the response"),
    ({"choices": []}, "non-empty list of objects under 'choices'"),
    ({"choices": [{"routed_experts": "%%%"}]}, "not valid base64"),
    ({"choices": [{"routed_experts": base64.b64encode(b"\x01\x02").decode()}]}, "not a .npy array"),
    ({"choices": [{"routed_experts": [[1, 2], [3]]}]}, "uneven lengths"),
    ({"prompt_token_ids": [1], "choices": [{"token_ids": [2], "routed_experts": ROWS.tolist()}]},
     "4 rows of routed experts for 1 prompt and 1 generated tokens"),
])
def test_vllm_bad_responses(response, problem):
    with pytest.raises(ValueError, match=problem):
        from_vllm(response, "x")


def test_imported_events_write_a_readable_trace(tmp_path):
    response = {"prompt_token_ids": PROMPT,
                "choices": [{"index": 0, "token_ids": OUTPUT, "routed_experts": _npy_base64(ROWS)}]}
    path = tmp_path / "imported.jsonl"
    write_trace(str(path), from_vllm(response, "r"))
    trace = read_trace(str(path))
    assert (trace.num_layers, trace.num_experts, trace.num_events) == (2, 8, 8)
    assert json.loads(path.read_text().splitlines()[0]) == {"seq": "r", "pos": 0, "token": 101, "layer": 0,
                                                            "experts": [1, 4]}
