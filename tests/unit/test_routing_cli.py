"""`moefleet routing import|plan|eval`, run as a user would: the round trip from responses to a
trace, a placement and its figures, and every refusal as one line on stderr with exit code 2."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from moefleet.cli import main
from moefleet.cluster.routing.trace import RoutingEvent, read_trace, write_trace

KEYS = {"fanout", "local_fraction", "cross_node_sends_per_token", "imbalance", "imbalance_per_layer_max", "precision",
        "recall", "events", "tokens", "sequences", "eval_sequences"}


@pytest.fixture(scope="module")
def topic_trace(tmp_path_factory) -> str:
    """24 requests, each on one of two topics (drawn at random): a topic's tokens choose its own 8 of
    the 16 experts, the same two for a token id at a layer."""
    rng = np.random.default_rng(0)
    events = []
    for s in range(24):
        topic = int(rng.integers(0, 2))
        for p in range(12):
            t = int(rng.integers(0, 20)) + 20 * topic
            for layer in range(2):
                first, second = (t * 3 + layer) % 8, (t * 3 + layer + 1 + t % 3) % 8
                events.append(RoutingEvent(f"req{s}", p, t, layer, (8 * topic + first, 8 * topic + second)))
    path = tmp_path_factory.mktemp("traces") / "topics.jsonl"
    write_trace(str(path), events)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _plan(capsys, trace, out, objective, *extra):
    code, _, err = _run(capsys, "routing", "plan", "--trace", trace, "--shards", "4", "--nodes", "2",
                        "--objective", objective, "--out", out, *extra)
    assert code == 0, err
    assert err.startswith(f"planned ({objective}) a placement of 2 MoE layers x 16 experts on 4 shards, 2 nodes")
    return json.loads(open(out).read())


def _eval(capsys, trace, placement, *extra) -> dict:
    code, out, err = _run(capsys, "routing", "eval", "--trace", trace, "--placement", placement, *extra)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == KEYS
    return result


def test_plan_then_eval_each_objective(tmp_path, capsys, topic_trace):
    results = {}
    for objective in ("round_robin", "load", "affinity"):
        path = str(tmp_path / f"{objective}.json")
        plan = _plan(capsys, topic_trace, path, objective)
        assert plan["shard_nodes"] == [0, 0, 1, 1] and sorted(plan["shard_experts"]) == ["0", "1"]
        for per_shard in plan["shard_experts"].values():
            assert all(len(held) <= 16 // 4 + 1 for held in per_shard)  # default slots: ceil(E / N) + 1
            assert set().union(*map(set, per_shard)) == set(range(16))
        results[objective] = _eval(capsys, topic_trace, path, "--request-routing", "affinity")
    assert results["round_robin"]["fanout"] == 2.0  # a token's two experts differ by 1 to 3: never equal mod 4
    for result in results.values():
        assert result["precision"] == 1.0 and result["eval_sequences"] == 12 and result["sequences"] == 24
    # grouping plus request shuffling keeps a topic's experts on its node
    assert results["affinity"]["cross_node_sends_per_token"] < results["load"]["cross_node_sends_per_token"]
    assert results["affinity"]["cross_node_sends_per_token"] < results["round_robin"]["cross_node_sends_per_token"]


def test_slots_copies_and_nodes_default(tmp_path, capsys, topic_trace):
    path = str(tmp_path / "p.json")
    code, _, err = _run(capsys, "routing", "plan", "--trace", topic_trace, "--shards", "4", "--objective", "load",
                        "--slots-per-shard", "6", "--max-copies", "3", "--out", path)
    assert code == 0, err
    plan = json.loads(open(path).read())
    assert plan["shard_nodes"] == [0, 1, 2, 3]  # no --nodes: a node per shard
    assert all(len(held) <= 6 for per_shard in plan["shard_experts"].values() for held in per_shard)
    copies = [sum(e in held for held in plan["shard_experts"]["0"]) for e in range(16)]
    assert max(copies) <= 3 and sum(copies) > 16
    result = _eval(capsys, topic_trace, path)
    assert 0 < result["local_fraction"] < 1


def _vllm_response(rng, prompt_len, output_len) -> dict:
    """A vLLM completions response: routes of 3 layers (layer 0 dense, zeros) x top-2 of 8 experts."""
    rows = np.zeros((prompt_len + output_len - 1, 3, 2), dtype=np.int16)
    for r in range(len(rows)):
        for layer in (1, 2):
            rows[r, layer] = rng.choice(8, size=2, replace=False)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    return {"id": f"cmpl-{rng.integers(1 << 30)}", "prompt_token_ids": rng.integers(0, 50, prompt_len).tolist(),
            "choices": [{"index": 0, "token_ids": rng.integers(0, 50, output_len).tolist(),
                         "routed_experts": base64.b64encode(buffer.getvalue()).decode()}]}


def test_import_vllm_responses_then_plan_and_eval(tmp_path, capsys):
    rng = np.random.default_rng(3)
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(_vllm_response(rng, 5, 4)) + "\n" for _ in range(6)))
    trace_path = str(tmp_path / "trace.jsonl.gz")
    code, _, err = _run(capsys, "routing", "import", "--format", "vllm", str(responses), "--out", trace_path)
    assert code == 0, err
    # 6 responses x 8 forwarded tokens x 2 MoE layers (the dense layer dropped)
    assert err.startswith("imported 6 responses: 96 routing events")
    trace = read_trace(trace_path)
    assert (trace.num_sequences, trace.num_layers, trace.num_experts, trace.top_k) == (6, 2, 8, 2)
    placement = str(tmp_path / "p.json")
    code, _, err = _run(capsys, "routing", "plan", "--trace", trace_path, "--shards", "2", "--out", placement)
    assert code == 0, err
    result = _eval(capsys, trace_path, placement, "--nodes", "2")
    assert result["tokens"] == 3 * 8 and result["events"] == 3 * 8 * 2


def test_import_sglang_needs_the_shape(tmp_path, capsys):
    rows = np.arange(2 * 2 * 2, dtype=np.int32).reshape(2, 2, 2) % 8
    response = {"output_ids": [4, 5], "meta_info": {"id": "s1", "prompt_tokens": 1, "completion_tokens": 2,
                                                    "routed_experts": base64.b64encode(rows.tobytes()).decode()}}
    responses = tmp_path / "sglang.jsonl"
    responses.write_text(json.dumps(response) + "\n")
    out = str(tmp_path / "t.jsonl")
    code, _, err = _run(capsys, "routing", "import", "--format", "sglang", str(responses), "--out", out)
    assert code == 2 and err == (f"moefleet: error: {responses}:1: 'meta_info.routed_experts' is a flat buffer with no "
                                 f"shape: give num_layers and top_k (the model's num_hidden_layers and "
                                 f"num_experts_per_tok)\n")
    code, _, err = _run(capsys, "routing", "import", "--format", "sglang", str(responses), "--out", out,
                        "--num-layers", "2", "--top-k", "2", "--moe-layers", "0-1")
    assert code == 0, err
    assert [(e.seq, e.pos, e.token, e.layer, e.experts) for e in read_trace(out).events()] == [
        ("s1", 0, None, 0, (0, 1)), ("s1", 0, None, 1, (2, 3)), ("s1", 1, 4, 0, (4, 5)), ("s1", 1, 4, 1, (6, 7))]


def _error(capsys, *argv) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("moefleet: error: ")
    return err[len("moefleet: error: "):].strip()


def test_refusals_are_one_line_with_exit_code_2(tmp_path, capsys, topic_trace):
    placement = str(tmp_path / "p.json")
    _plan(capsys, topic_trace, placement, "load")
    missing = str(tmp_path / "missing.jsonl")
    assert _error(capsys, "routing", "eval", "--trace", missing, "--placement", placement) \
        == f"{missing}: file not found"
    assert _error(capsys, "routing", "plan", "--trace", missing, "--shards", "2", "--out", placement) \
        == f"{missing}: file not found"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 1, "pos": 0, "token": 3, "layer": 0, "experts": [1]}\n{"seq": 1, "pos": 1}\n')
    assert _error(capsys, "routing", "plan", "--trace", str(bad), "--shards", "2", "--out", placement) \
        == f"{bad}:2: missing key 'layer'"
    assert _error(capsys, "routing", "plan", "--trace", topic_trace, "--shards", "0", "--out", placement) \
        == "--shards must be >= 1, got 0"
    assert "--nodes 5 is more than --shards 4" in _error(
        capsys, "routing", "plan", "--trace", topic_trace, "--shards", "4", "--nodes", "5", "--out", placement)
    assert "cannot hold the 16 experts" in _error(capsys, "routing", "plan", "--trace", topic_trace, "--shards", "2",
                                                  "--slots-per-shard", "7", "--out", placement)
    assert _error(capsys, "routing", "eval", "--trace", topic_trace, "--placement", placement, "--nodes", "3") \
        == f"{placement} puts its shards on 2 nodes but --nodes says 3"


def test_placement_and_trace_that_do_not_match(tmp_path, capsys, topic_trace):
    three_layers = tmp_path / "three.json"
    three_layers.write_text(json.dumps({"epoch": 0, "num_experts": 16, "shard_experts": {
        str(layer): [list(range(8)), list(range(8, 16))] for layer in range(3)}}))
    assert "the trace has 2 MoE layers (0..1) but the placement places 3" in _error(
        capsys, "routing", "eval", "--trace", topic_trace, "--placement", str(three_layers))
    fewer_experts = tmp_path / "twelve.json"
    fewer_experts.write_text(json.dumps({"epoch": 0, "num_experts": 12, "shard_experts": {
        str(layer): [list(range(6)), list(range(6, 12))] for layer in range(2)}}))
    assert "is out of range for 12 experts" in _error(
        capsys, "routing", "eval", "--trace", topic_trace, "--placement", str(fewer_experts))
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    assert _error(capsys, "routing", "eval", "--trace", topic_trace, "--placement", str(not_json)).startswith(
        f"{not_json}: not JSON")
    assert _error(capsys, "routing", "eval", "--trace", topic_trace, "--placement", str(three_layers), "--nodes",
                  "3") == "--nodes 3 is more than the placement's 2 shards: every node needs a shard"


def test_long_traces_report_progress(tmp_path, capsys, topic_trace, monkeypatch):
    import moefleet.cluster.routing.trace as trace_module
    import moefleet.routing_cli as routing_cli

    monkeypatch.setattr(trace_module, "PROGRESS_EVERY", 100)
    monkeypatch.setattr(routing_cli, "PROGRESS_AFTER_LINES", 200)
    monkeypatch.setattr(routing_cli, "PROGRESS_SECONDS", 0.0)
    placement = str(tmp_path / "p.json")
    _run(capsys, "routing", "plan", "--trace", topic_trace, "--shards", "2", "--objective", "load", "--out", placement)
    code, _, err = _run(capsys, "routing", "eval", "--trace", topic_trace, "--placement", placement)
    assert code == 0
    assert f"moefleet: {topic_trace}: 200 lines read" in err and "moefleet: evaluating on the evaluation half" in err


def test_the_installed_command_prints_no_traceback(tmp_path, topic_trace):
    missing = str(tmp_path / "nope.json")
    done = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "eval", "--trace", topic_trace,
                           "--placement", missing], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"moefleet: error: {missing}: file not found\n"
    listed = subprocess.run([sys.executable, "-m", "moefleet.cli", "routing", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and all(command in listed.stdout for command in ("import", "plan", "eval"))


def test_record_then_plan_then_eval_round_trip(capsys, tmp_path, model_dir):
    """A model's own routing, recorded on prompts in this process, plans and evaluates: the trace
    holds every token run (prompt and output) at every MoE layer of the model."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [{"prompt": "def add(a, b):"}, {"prompt": "Once upon a time"},
                                                           {"prompt_token_ids": [5, 6, 7, 8]}]) + "\n")
    trace_path = str(tmp_path / "recorded.jsonl.gz")
    code, _, err = _run(capsys, "routing", "record", "--model", model_dir("qwen3_moe"), "--prompts", str(prompts),
                        "--out", trace_path, "--max-tokens", "5")
    assert code == 0, err
    trace = read_trace(trace_path)
    from moefleet.models.spec import load_spec

    spec = load_spec(model_dir("qwen3_moe"))
    assert trace.seq_names == (0, 1, 2) and trace.num_layers == len(spec.moe_layer_indices)
    assert trace.top_k == spec.moe.top_k
    run_per_sequence = np.bincount(trace.occurrences()[1], minlength=3)
    assert run_per_sequence[2] == 4 + 4  # prompt of 4, then 4 of the 5 outputs fed back
    placement = str(tmp_path / "placement.json")
    code, _, err = _run(capsys, "routing", "plan", "--trace", trace_path, "--shards", "2", "--out", placement)
    assert code == 0, err
    code, out, err = _run(capsys, "routing", "eval", "--trace", trace_path, "--placement", placement)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == KEYS and 1.0 <= result["fanout"] <= 2.0 and result["events"] > 0


def test_record_refuses_a_bad_prompts_file(capsys, tmp_path, model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    code, _, err = _run(capsys, "routing", "record", "--model", model_dir("mixtral"), "--prompts", str(prompts),
                        "--out", str(tmp_path / "t.jsonl"))
    assert code == 2 and err.strip().endswith("prompts.jsonl:2: needs a string 'prompt' or a list 'prompt_token_ids'")
