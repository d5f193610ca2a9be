"""Checkpoint layouts (per-expert, fused, sharded) load to the same model; malformed checkpoints
fail with a message naming the file and the field or tensor."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moefleet.kernels.expert_ffn import swiglu
from moefleet.models.errors import CheckpointError
from moefleet.models.spec import load_spec
from tests.conftest import random_prompts


def _copy_without_weights(src: str, dst: str) -> None:
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy(os.path.join(src, name), dst)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_fused_and_sharded_layouts_match_per_expert(arch, model_dir, hf_model, engines, tmp_path):
    from moefleet import LLM

    src = model_dir(arch)
    hf = hf_model(arch)
    # Fused layout: transformers' in-memory names (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]).
    fused = tmp_path / "fused"
    _copy_without_weights(src, fused)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors")
    # Sharded per-expert layout with an index, as save_pretrained writes large models.
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), sharded)
    assert (sharded / "model.safetensors.index.json").exists()

    prompts = random_prompts(hf.config.vocab_size, (13, 30), seed=11)
    reference = engines(arch).engine.prompt_logits(prompts)
    for path in (fused, sharded):
        other = LLM(str(path), kv_cache_blocks=64, num_threads=1).engine.prompt_logits(prompts)
        for a, b in zip(reference, other):
            assert torch.equal(a, b), path.name


def test_shard_loads_only_its_experts(model_dir):
    from moefleet.cluster.experts.expert_shard import ExpertShard
    from moefleet.models.checkpoint import CheckpointReader

    path = model_dir("mixtral")
    spec = load_spec(path)
    reader = CheckpointReader(path, spec, torch.float32)
    shard = ExpertShard.from_checkpoint(1, reader, {0: (1, 5), 2: (3,)})
    gate_w, up_w, w2 = reader.expert(0, 5)
    w13 = torch.cat([gate_w, up_w])
    x = torch.randn(3, spec.hidden_size)
    gate_up, down = shard.epochs[0][0].pairs[1]  # local slot 1 holds expert 5
    assert torch.equal(gate_up.dense_weight(), w13) and torch.equal(down.dense_weight(), w2)
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    assert torch.allclose(swiglu(x, gate_up, down), (F.silu(gate) * up) @ w2.t(), atol=1e-5)
    per_expert = w13.numel() * 4 + w2.numel() * 4
    assert shard.nbytes() == 3 * per_expert
    with pytest.raises(KeyError, match="shard 1 holds no copy of layer 0 experts \\[2\\]"):
        shard.compute(0, torch.zeros(1, spec.hidden_size), torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]))


def _broken_copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_architecture_names_the_field(model_dir, tmp_path):
    path = _broken_copy(model_dir("mixtral"), tmp_path / "m")
    config = json.load(open(os.path.join(path, "config.json")))
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config\.json: architectures: unsupported architecture \['GPT2LMHeadModel'\]"):
        load_spec(path)


def test_missing_field_names_the_field(model_dir, tmp_path):
    path = _broken_copy(model_dir("olmoe"), tmp_path / "m")
    config = json.load(open(os.path.join(path, "config.json")))
    del config["hidden_size"]
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="config.json: hidden_size: required field is missing"):
        load_spec(path)


def test_missing_and_misshapen_tensors_name_the_tensor(model_dir, tmp_path):
    from moefleet import LLM

    path = _broken_copy(model_dir("qwen3_moe"), tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight: tensor missing"):
        LLM(path, kv_cache_blocks=8)
    state["model.layers.2.mlp.experts.5.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight: shape \(3, 3\)"):
        LLM(path, kv_cache_blocks=8)


def test_malformed_files_are_named(model_dir, tmp_path):
    from moefleet import LLM

    path = _broken_copy(model_dir("mixtral"), tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="config.json: config.json: not valid JSON"):
        load_spec(path)
    path2 = _broken_copy(model_dir("mixtral"), tmp_path / "m2")
    with open(os.path.join(path2, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: safetensors header: unreadable"):
        LLM(path2, kv_cache_blocks=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        LLM(str(empty))
