"""Attention of the dense part: grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE) and
DeepSeek's multi-head latent attention, both over the paged KV cache.

Shapes: x [T, D]; H query heads, G key/value heads, hd head dim.
"""

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from moefleet.kernels.attention import AttentionBatch, paged_attention, rotate_and_write_kv, write_kv
from moefleet.kernels.linear import Linear
from moefleet.kernels.norms import rms_norm
from moefleet.kernels.rotary import apply_rotary
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.spec import ModelSpec


@dataclass(frozen=True)
class KVCacheLayout:
    """What one token of one layer stores: G heads of k_dim (and v_dim) values. With
    `values_in_keys` the values are the first v_dim entries of the keys (MLA's latent)."""

    num_heads: int
    k_dim: int
    v_dim: int
    values_in_keys: bool

    def allocate(self, num_slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys = _lazy_zeros((num_slots, self.num_heads, self.k_dim), dtype)
        if self.values_in_keys:
            return keys, keys[..., : self.v_dim]
        return keys, _lazy_zeros((num_slots, self.num_heads, self.v_dim), dtype)


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS maps on first touch (an anonymous mapping), so a large KV cache
    costs resident memory only as it fills. Zeros, not garbage: padded attention reads unused
    slots under a mask, and NaN garbage times a zero weight would still be NaN.

    Not numpy's zeros: numpy asks for transparent huge pages on large arrays (madvise), and where
    the kernel then compacts memory on the fault (THP defrag "madvise", this VM's default) the
    first write into each 2 MB of the cache took ~25 ms instead of ~0.8 ms: a 1,900-token
    prefill of the tiny Mixtral spent half its time there. Plain 4 KB pages fault quickly."""
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    pages = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes]  # keeps the mapping alive
    return torch.from_numpy(pages).view(dtype).view(shape)


def kv_cache_layout(spec: ModelSpec) -> KVCacheLayout:
    if spec.attention == "mla":
        mla = spec.mla
        return KVCacheLayout(1, mla.kv_lora_rank + mla.qk_rope_head_dim, mla.kv_lora_rank, True)
    return KVCacheLayout(spec.num_kv_heads, spec.head_dim, spec.head_dim, False)


class GQAAttention:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int):
        d, h, g, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        p = "self_attn"
        # q, k and v in one matmul: one pass over x instead of three.
        self.qkv = Linear(torch.cat([reader.layer(layer, f"{p}.{n}_proj.weight", (rows, d))
                                     for n, rows in (("q", h * hd), ("k", g * hd), ("v", g * hd))]),
                          torch.cat([reader.layer(layer, f"{p}.{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None)
        self.o = Linear(reader.layer(layer, f"{p}.o_proj.weight", (d, h * hd)),
                        reader.layer(layer, f"{p}.o_proj.bias") if spec.o_bias else None)
        norm_dims = {"per_head": (hd, hd), "full": (h * hd, g * hd)}.get(spec.qk_norm)
        self.q_norm = reader.layer(layer, f"{p}.q_norm.weight", (norm_dims[0],)) if norm_dims else None
        self.k_norm = reader.layer(layer, f"{p}.k_norm.weight", (norm_dims[1],)) if norm_dims else None
        self.qk_norm, self.clip, self.eps = spec.qk_norm, spec.clip_qkv, spec.rms_norm_eps
        self.split = (h * hd, g * hd, g * hd)
        self.h, self.g, self.hd = h, g, hd
        self.scale = hd**-0.5
        self.interleaved = spec.rope.interleaved

    def forward(self, x, cos, sin, k_cache, v_cache, batch: AttentionBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        if self.qk_norm == "full":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q, k, v = q.view(t, self.h, self.hd), k.view(t, self.g, self.hd), v.view(t, self.g, self.hd)
        if self.qk_norm == "per_head":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q = rotate_and_write_kv(q, k, v, cos, sin, self.interleaved, k_cache, v_cache, batch.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, batch, self.scale)
        return self.o(out.reshape(t, -1))


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MLAAttention:
    """Multi-head latent attention with the up-projections absorbed: the cache holds, per
    token, the normalised latent c [kv_lora] and the shared rotary key [rope]; queries are
    moved into latent space (q_nope·W_uk) so attention runs as MQA over the cached latent and
    W_uv is applied after. Mathematically the reference's expand-then-attend."""

    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int):
        m, d, h = spec.mla, spec.hidden_size, spec.num_heads
        p = "self_attn"
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.q_lora = m.q_lora_rank is not None
        if self.q_lora:
            self.q_a = Linear(reader.layer(layer, f"{p}.q_a_proj.weight", (m.q_lora_rank, d)),
                              reader.layer(layer, f"{p}.q_a_proj.bias") if spec.qkv_bias else None)
            self.q_a_norm = reader.layer(layer, f"{p}.q_a_layernorm.weight", (m.q_lora_rank,))
            self.q = Linear(reader.layer(layer, f"{p}.q_b_proj.weight", (h * qk_dim, m.q_lora_rank)))
        else:
            self.q = Linear(reader.layer(layer, f"{p}.q_proj.weight", (h * qk_dim, d)))
        self.kv_a = Linear(reader.layer(layer, f"{p}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, d)),
                           reader.layer(layer, f"{p}.kv_a_proj_with_mqa.bias") if spec.qkv_bias else None)
        self.kv_a_norm = reader.layer(layer, f"{p}.kv_a_layernorm.weight", (m.kv_lora_rank,))
        kv_b = reader.layer(layer, f"{p}.kv_b_proj.weight", (h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank))
        kv_b = kv_b.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        self.w_uk = kv_b[:, : m.qk_nope_head_dim].contiguous()  # [H, nope, C]
        self.w_uv = kv_b[:, m.qk_nope_head_dim :].contiguous()  # [H, v, C]
        self.o = Linear(reader.layer(layer, f"{p}.o_proj.weight", (d, h * m.v_head_dim)),
                        reader.layer(layer, f"{p}.o_proj.bias") if spec.o_bias else None)
        self.h, self.m, self.eps = h, m, spec.rms_norm_eps
        self.scale = qk_dim**-0.5
        rope = spec.rope
        if rope.type != "default" and rope.params.get("mscale_all_dim"):
            self.scale *= _yarn_mscale(rope.params["factor"], rope.params["mscale_all_dim"]) ** 2
        self.interleaved = rope.interleaved

    def forward(self, x, cos, sin, k_cache, v_cache, batch: AttentionBatch) -> torch.Tensor:
        t, m = x.shape[0], self.m
        q = self.q(rms_norm(self.q_a(x), self.q_a_norm, self.eps) if self.q_lora else x)
        q = q.view(t, self.h, -1)
        q_nope, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, self.kv_a_norm, self.eps)
        q_rot = apply_rotary(q_rot, cos, sin, self.interleaved)
        k_rot = apply_rotary(k_rot.unsqueeze(1), cos, sin, self.interleaved)
        entry = torch.cat([latent.unsqueeze(1), k_rot], dim=-1)  # [T, 1, C + rope]
        write_kv(k_cache, v_cache, batch.slot_mapping, entry, entry)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, self.w_uk)
        out_latent = paged_attention(torch.cat([q_latent, q_rot], dim=-1), k_cache, v_cache, batch, self.scale)
        out = torch.einsum("thc,hvc->thv", out_latent, self.w_uv)
        return self.o(out.reshape(t, -1))


def build_attention(reader: CheckpointReader, spec: ModelSpec, layer: int):
    return MLAAttention(reader, spec, layer) if spec.attention == "mla" else GQAAttention(reader, spec, layer)
