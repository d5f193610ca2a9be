"""`moefleet init-model`: write a checkpoint made with transformers' own config and model classes,
plus a locally trained tokenizer; random weights, or briefly trained on the stdlib (train_tiny.py)."""

import dataclasses
import json
import os
import shutil
import tempfile

import torch

from moefleet.kernels.cpu_extension import cache_root
from moefleet.models.tokenizer_training import SPECIAL_TOKENS, train_tokenizer
from moefleet.models.train_tiny import train_tiny

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
SIZES = ("tiny", "tiny-fine", "small")

# tiny: hidden 256, 4 layers, 8 experts top-2. small: hidden 768, 8 layers (100–300 M parameters).
# tiny-fine: fine-grained experts as in DeepSeek and Qwen3 (32 narrow experts, top-4), small enough
# to train briefly on 2 cores (init_model's train_steps).
_DIMS = {
    "tiny": dict(hidden=256, layers=4, heads=8, kv_heads=4, expert_inter=512, dense_inter=512, experts=8, top_k=2),
    "tiny-fine": dict(hidden=128, layers=4, heads=4, kv_heads=2, expert_inter=128, dense_inter=256, experts=32,
                      top_k=4),
    "small": dict(hidden=768, layers=8, heads=12, kv_heads=4, expert_inter=1536, dense_inter=2048, experts=8,
                  top_k=2),
}


def _config(arch: str, size: str, vocab: int):
    import transformers

    d = _DIMS[size]
    ids = dict(vocab_size=vocab, bos_token_id=SPECIAL_TOKENS.index("<|begin|>"),
               eos_token_id=SPECIAL_TOKENS.index("<|end|>"), pad_token_id=SPECIAL_TOKENS.index("<|pad|>"),
               tie_word_embeddings=False)
    common = dict(hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                  num_key_value_heads=d["kv_heads"], max_position_embeddings=2048, num_experts_per_tok=d["top_k"],
                  **ids)
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=d["expert_inter"], num_local_experts=d["experts"], **common)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=d["experts"], moe_intermediate_size=d["expert_inter"] // 2,
                                           shared_expert_intermediate_size=d["expert_inter"],
                                           intermediate_size=d["dense_inter"], norm_topk_prob=False, **common)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=d["experts"], moe_intermediate_size=d["expert_inter"] // 2,
                                           intermediate_size=d["dense_inter"], head_dim=d["hidden"] // d["heads"],
                                           norm_topk_prob=True, **common)
    if arch == "olmoe":
        return transformers.OlmoeConfig(num_experts=d["experts"], intermediate_size=d["expert_inter"] // 2,
                                        norm_topk_prob=False, **common)
    if arch == "deepseek_v3":
        common.update(num_attention_heads=d["heads"] // 2, num_key_value_heads=d["heads"] // 2)
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        return transformers.DeepseekV3Config(
            n_routed_experts=d["experts"], n_shared_experts=1, moe_intermediate_size=d["expert_inter"] // 2,
            intermediate_size=d["dense_inter"], first_k_dense_replace=1, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=d["hidden"] // 4, q_lora_rank=d["hidden"] // 2,
            qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, rope_parameters=rope, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def init_model(arch: str, size: str, out_dir: str, seed: int = 0, train_steps: int = 0) -> str:
    """Write config.json, safetensors weights and tokenizer files into out_dir (atomically). With
    train_steps > 0 the random weights are first trained that many steps on the stdlib corpus
    (train_tiny.py), and training.json says how the run went."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    if train_steps < 0:
        raise ValueError(f"--train-steps must be >= 0, got {train_steps}")
    import transformers

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".init-", dir=parent)
    try:
        vocab = train_tokenizer(tmp)
        config = _config(arch, size, vocab)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if arch == "deepseek_v3":  # the bias buffer starts at zero; make it matter for the tests
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "e_score_correction_bias"):
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
        if train_steps:
            report = train_tiny(model, os.path.join(tmp, "tokenizer.json"), train_steps, seed=seed)
            with open(os.path.join(tmp, "training.json"), "w") as f:
                json.dump(dataclasses.asdict(report), f, indent=1)
        model.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "moefleet_init.json"), "w") as f:
            json.dump({"arch": arch, "size": size, "seed": seed, "train_steps": train_steps,
                       "parameters": sum(p.numel() for p in model.parameters())}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out_dir


def default_model_dir(arch: str = "mixtral", size: str = "tiny") -> str:
    """Where generated models are cached, made on first use."""
    path = os.path.join(cache_root(), "models", f"{arch}-{size}-v1")
    if not os.path.isfile(os.path.join(path, "config.json")):
        init_model(arch, size, path)
    return path
