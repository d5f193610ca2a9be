"""ModelSpec: one normalised description of every architecture we serve, read from a Hugging
Face config.json. The model code reads only this, never the raw config."""

import json
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moefleet.models.errors import CheckpointError

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RopeSpec(_Frozen):
    theta: float = Field(description="Rotary base.")
    type: str = Field(description="default, linear, yarn or llama3.")
    params: dict = Field(default_factory=dict, description="Scaling parameters of the rope type.")
    dim: int = Field(description="Rotated dimensions per head.")
    interleaved: bool = Field(description="Pairs (x0, x1), (x2, x3)… rotate together (DeepSeek) instead of halves.")


class MLASpec(_Frozen):
    q_lora_rank: int | None = Field(description="Rank of the low-rank query projection; None: a full q_proj.")
    kv_lora_rank: int = Field(description="Width of the compressed key/value latent that is cached.")
    qk_nope_head_dim: int = Field(description="Per-head query/key dims without rotary.")
    qk_rope_head_dim: int = Field(description="Per-head query/key dims with rotary (shared key across heads).")
    v_head_dim: int = Field(description="Per-head value dims.")


class MoESpec(_Frozen):
    num_experts: int = Field(description="Routed experts per MoE layer.")
    top_k: int = Field(description="Experts chosen per token.")
    intermediate_size: int = Field(description="Intermediate width of one routed expert.")
    scoring: Literal["softmax", "sigmoid"] = Field(description="Router score function.")
    renormalize: bool = Field(description="Renormalise the top-k weights to sum to one.")
    num_groups: int = Field(default=1, description="Expert groups for grouped top-k (sigmoid routing).")
    topk_groups: int = Field(default=1, description="Groups kept per token in grouped top-k.")
    routed_scaling_factor: float = Field(default=1.0, description="Multiplier on routed expert weights.")
    has_correction_bias: bool = Field(default=False, description="Router has e_score_correction_bias.")
    shared_intermediate_size: int = Field(default=0, description="Total width of shared experts; 0: none.")
    shared_expert_gate: bool = Field(default=False, description="Shared expert output scaled by sigmoid(gate(x)) (Qwen2-MoE).")


class ModelSpec(_Frozen):
    arch: str = Field(description="Architecture key, e.g. mixtral.")
    vocab_size: int = Field(description="Rows of the embedding and LM head.")
    hidden_size: int = Field(description="Model width D.")
    num_layers: int = Field(description="Decoder layers.")
    num_heads: int = Field(description="Query heads H.")
    num_kv_heads: int = Field(description="Key/value heads G (1 for MLA's shared latent).")
    head_dim: int = Field(description="Per-head query/key width for GQA attention.")
    attention: Literal["gqa", "mla"] = Field(description="Attention kind.")
    qkv_bias: bool = Field(default=False, description="q/k/v projections have biases.")
    o_bias: bool = Field(default=False, description="Output projection has a bias.")
    qk_norm: Literal["none", "per_head", "full"] = Field(default="none", description="RMSNorm on q and k: per head (Qwen3) or over the whole projection (OLMoE).")
    clip_qkv: float | None = Field(default=None, description="Clamp q/k/v to ±clip (OLMoE).")
    rms_norm_eps: float = Field(description="RMSNorm epsilon.")
    rope: RopeSpec
    mla: MLASpec | None = None
    moe: MoESpec
    moe_layers: tuple[bool, ...] = Field(description="Per layer: True for an MoE layer, False for a dense MLP.")
    dense_intermediate_size: int = Field(description="Width of the dense MLP layers.")
    sliding_windows: tuple[int | None, ...] = Field(description="Per layer attention window, None for full.")
    max_position_embeddings: int = Field(description="Longest context the model supports.")
    tie_word_embeddings: bool = Field(default=False, description="LM head shares the embedding matrix.")
    eos_token_ids: tuple[int, ...] = Field(default=(), description="Token ids that end generation.")
    bos_token_id: int | None = Field(default=None, description="Beginning-of-sequence token.")

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]


def _rope(config: dict, dim: int, interleaved: bool) -> RopeSpec:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    return RopeSpec(theta=float(theta), type=rope_type, params=params, dim=dim, interleaved=interleaved)


def _eos(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _require(config: dict, path: str, *keys: str):
    """The first of `keys` present (transformers renames some fields between versions)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise CheckpointError(path, keys[0], "required field is missing")


def spec_from_config(config: dict, path: str = "config.json") -> ModelSpec:
    """Normalise a Hugging Face config dict. Raises CheckpointError naming the field at fault."""
    archs = config.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        arch = config.get("model_type") if config.get("model_type") in ARCHITECTURES.values() else None
    if arch is None:
        raise CheckpointError(
            path, "architectures", f"unsupported architecture {archs or config.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}",
        )
    r = lambda *keys: _require(config, path, *keys)  # noqa: E731
    hidden, layers, heads = r("hidden_size"), r("num_hidden_layers"), r("num_attention_heads")
    common = dict(
        arch=arch, vocab_size=r("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(config), bos_token_id=config.get("bos_token_id"),
    )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(path, "hidden_act", f"{act!r} is not supported (silu is)")
    if config.get("quantization_config"):
        raise CheckpointError(path, "quantization_config", "quantized checkpoints are not supported yet")
    if arch == "deepseek_v3":
        return _deepseek(config, path, common, r)
    head_dim = config.get("head_dim") or hidden // heads
    windows = _sliding_windows(config, arch, layers)
    if arch == "mixtral":
        moe = MoESpec(num_experts=r("num_local_experts", "num_experts"), top_k=r("num_experts_per_tok"),
                      intermediate_size=r("intermediate_size"), scoring="softmax", renormalize=True)
        moe_layers = (True,) * layers
        qk_norm, clip = "none", None
    else:
        moe = MoESpec(
            num_experts=r("num_experts", "num_local_experts"), top_k=r("num_experts_per_tok"),
            intermediate_size=config.get("moe_intermediate_size") or r("intermediate_size"),
            scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False)),
            shared_intermediate_size=config.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
            shared_expert_gate=arch == "qwen2_moe",
        )
        sparse_step = config.get("decoder_sparse_step", 1) or 1
        mlp_only = set(config.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in mlp_only and (i + 1) % sparse_step == 0 for i in range(layers))
        qk_norm = {"qwen3_moe": "per_head", "olmoe": "full"}.get(arch, "none")
        clip = config.get("clip_qkv") if arch == "olmoe" else None
    return ModelSpec(
        **common, num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim, attention="gqa",
        qkv_bias=bool(config.get("qkv_bias", True)) if arch == "qwen2_moe" else bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)) if arch in ("qwen3_moe", "olmoe") else False,
        qk_norm=qk_norm, clip_qkv=clip, rope=_rope(config, head_dim, interleaved=False), moe=moe,
        moe_layers=moe_layers, dense_intermediate_size=config.get("intermediate_size", 0), sliding_windows=windows,
    )


def _sliding_windows(config: dict, arch: str, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window") or None
    if arch == "mixtral":
        return (window,) * layers
    if arch in ("qwen2_moe", "qwen3_moe") and config.get("use_sliding_window") and window:
        types = config.get("layer_types") or []
        if types:
            return tuple(window if t == "sliding_attention" else None for t in types)
        max_window_layers = config.get("max_window_layers", layers)
        return tuple(window if i >= max_window_layers else None for i in range(layers))
    return (None,) * layers


def _deepseek(config: dict, path: str, common: dict, r) -> ModelSpec:
    mla = MLASpec(
        q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=r("kv_lora_rank"),
        qk_nope_head_dim=r("qk_nope_head_dim"), qk_rope_head_dim=r("qk_rope_head_dim"), v_head_dim=r("v_head_dim"),
    )
    v3 = common["arch"] == "deepseek_v3"
    topk_method = config.get("topk_method", "noaux_tc" if v3 else "greedy")
    scoring = config.get("scoring_func", "sigmoid" if v3 else "softmax")
    if scoring not in ("sigmoid", "softmax"):
        raise CheckpointError(path, "scoring_func", f"{scoring!r} is not supported")
    n_shared = config.get("n_shared_experts") or 0
    moe = MoESpec(
        num_experts=r("n_routed_experts", "num_local_experts"), top_k=r("num_experts_per_tok"), intermediate_size=r("moe_intermediate_size"),
        scoring=scoring, renormalize=bool(config.get("norm_topk_prob", v3)),
        num_groups=config.get("n_group") or 1, topk_groups=config.get("topk_group") or 1,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        has_correction_bias=topk_method == "noaux_tc", shared_intermediate_size=r("moe_intermediate_size") * n_shared,
    )
    first_dense = config.get("first_k_dense_replace") or 0
    freq = config.get("moe_layer_freq", 1) or 1
    layers = common["num_layers"]
    return ModelSpec(
        **common, num_kv_heads=1, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, attention="mla",
        qkv_bias=bool(config.get("attention_bias", False)), o_bias=bool(config.get("attention_bias", False)),
        rope=_rope(config, mla.qk_rope_head_dim, interleaved=bool(config.get("rope_interleave", True))),
        mla=mla, moe=moe, moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(layers)),
        dense_intermediate_size=r("intermediate_size"), sliding_windows=(None,) * layers,
    )


def load_spec(model_dir: str) -> ModelSpec:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(path, "config.json", "file not found: a model directory needs config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(path, "config.json", f"not valid JSON ({e})") from None
    return spec_from_config(config, path)
