"""The dense part of a model replica: embeddings, attention layers, norms, router and shared
experts, LM head. Routed experts are reached only through the dispatcher."""

import torch
import torch.nn.functional as F

from moefleet.kernels.attention import AttentionBatch
from moefleet.kernels.norms import rms_norm
from moefleet.kernels.rotary import RotaryCache, rope_tables
from moefleet.models.attention_layers import build_attention
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.moe_layer import DenseMLP, MoELayer
from moefleet.models.spec import ModelSpec


class DecoderLayer:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int, dispatcher):
        d = spec.hidden_size
        self.input_norm = reader.layer(layer, "input_layernorm.weight", (d,))
        self.post_attention_norm = reader.layer(layer, "post_attention_layernorm.weight", (d,))
        self.attention = build_attention(reader, spec, layer)
        self.mlp = MoELayer(reader, spec, layer, dispatcher) if spec.moe_layers[layer] else DenseMLP(reader, spec, layer)
        self.window = spec.sliding_windows[layer]
        self.eps = spec.rms_norm_eps


class MoEDecoder:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, dispatcher):
        d, v = spec.hidden_size, spec.vocab_size
        self.spec = spec
        self.embed = reader.tensor("model.embed_tokens.weight", (v, d))
        self.final_norm = reader.tensor("model.norm.weight", (d,))
        tied = spec.tie_word_embeddings or not reader.files.has("lm_head.weight")
        self.lm_head = self.embed if tied else reader.tensor("lm_head.weight", (v, d))
        self.layers = [DecoderLayer(reader, spec, i, dispatcher) for i in range(spec.num_layers)]
        rope = spec.rope
        inv_freq, attention_factor = rope_tables(rope.dim, rope.theta, rope.type, rope.params, spec.max_position_embeddings)
        self.rotary = RotaryCache(inv_freq, attention_factor, min(spec.max_position_embeddings, 4096))
        self.dtype = self.embed.dtype

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                batches: dict[int | None, AttentionBatch], logits_rows: torch.Tensor) -> torch.Tensor:
        """token_ids, positions: [T]; kv_caches[layer] = (k_cache, v_cache); batches: attention
        metadata per sliding window; logits_rows: [N] rows whose next-token logits are wanted.
        Returns float32 logits [N, V]."""
        h = F.embedding(token_ids, self.embed)
        cos, sin = self.rotary.lookup(positions)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            x = rms_norm(h, layer.input_norm, layer.eps)
            h = h + layer.attention.forward(x, cos, sin, k_cache, v_cache, batches[layer.window])
            x = rms_norm(h, layer.post_attention_norm, layer.eps)
            h = h + layer.mlp.forward(x)
        h = rms_norm(h[logits_rows], self.final_norm, self.spec.rms_norm_eps)
        return F.linear(h, self.lm_head).float()
