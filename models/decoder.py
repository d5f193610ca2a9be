"""The dense part of a model replica: embeddings, attention layers, norms, router and shared
experts, LM head. Routed experts are reached only through the dispatcher."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moefleet.kernels.attention import AttentionBatch
from moefleet.kernels.linear import Linear
from moefleet.kernels.norms import add_rms_norm, rms_norm
from moefleet.kernels.rotary import RotaryCache, rope_tables
from moefleet.models.attention_layers import build_attention
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.moe_layer import DenseMLP, MoELayer
from moefleet.models.spec import ModelSpec


@dataclass(frozen=True)
class StepInputs:
    """One forward's flat inputs. token_ids, positions: [T]; batches: attention metadata per
    sliding window; logits_rows: [N] rows whose next-token logits are wanted, ascending."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    batches: dict[int | None, AttentionBatch]
    logits_rows: torch.Tensor


class DecoderLayer:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int, dispatcher):
        d = spec.hidden_size
        self.input_norm = reader.layer(layer, "input_layernorm.weight", (d,))
        self.post_attention_norm = reader.layer(layer, "post_attention_layernorm.weight", (d,))
        self.attention = build_attention(reader, spec, layer)
        self.mlp = MoELayer(reader, spec, layer, dispatcher) if spec.moe_layers[layer] else DenseMLP(reader, spec, layer)
        self.window = spec.sliding_windows[layer]
        self.eps = spec.rms_norm_eps

    def attend(self, h, x, rope, k_cache, v_cache, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the residual stream [T, D], x: h under this layer's input norm. Returns the stream
        after attention and its post-attention norm, the MLP's input."""
        attended = self.attention.forward(x, *rope, k_cache, v_cache, batches[self.window])
        return add_rms_norm(h, attended, self.post_attention_norm, self.eps)


class MoEDecoder:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, dispatcher):
        d, v = spec.hidden_size, spec.vocab_size
        self.spec = spec
        self.embed = reader.tensor("model.embed_tokens.weight", (v, d))
        self.final_norm = reader.tensor("model.norm.weight", (d,))
        tied = spec.tie_word_embeddings or not reader.files.has("lm_head.weight")
        self.lm_head = Linear(self.embed if tied else reader.tensor("lm_head.weight", (v, d)))
        self.layers = [DecoderLayer(reader, spec, i, dispatcher) for i in range(spec.num_layers)]
        rope = spec.rope
        inv_freq, attention_factor = rope_tables(rope.dim, rope.theta, rope.type, rope.params, spec.max_position_embeddings)
        self.rotary = RotaryCache(inv_freq, attention_factor, min(spec.max_position_embeddings, 4096))
        self.dtype = self.embed.dtype

    def _embed(self, inputs: StepInputs):
        h = F.embedding(inputs.token_ids, self.embed)
        return h, rms_norm(h, self.layers[0].input_norm, self.spec.rms_norm_eps), self.rotary.lookup(inputs.positions, self.dtype)

    def _after_mlp(self, layer: int, h: torch.Tensor, delta: torch.Tensor, inputs: StepInputs):
        """The residual add after a layer's MLP, fused with the norm that follows it: the next
        layer's input norm, or after the last layer the final norm of the logits rows only.
        Returns (stream, normed stream)."""
        if layer + 1 < len(self.layers):
            return add_rms_norm(h, delta, self.layers[layer + 1].input_norm, self.spec.rms_norm_eps)
        rows = inputs.logits_rows
        if rows.numel() != h.shape[0]:  # rows ascend, so as many rows as tokens means every row in order
            h, delta = h.index_select(0, rows), delta.index_select(0, rows)  # ~3x faster than h[rows]
        return add_rms_norm(h, delta, self.final_norm, self.spec.rms_norm_eps)

    def forward(self, inputs: StepInputs, kv_caches: list) -> torch.Tensor:
        """kv_caches[layer] = (k_cache, v_cache). Returns float32 logits [N, V]."""
        h, x, rope = self._embed(inputs)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            h, x = layer.attend(h, x, rope, k_cache, v_cache, inputs.batches)
            h, x = self._after_mlp(i, h, layer.mlp.finish(layer.mlp.start(x)), inputs)
        return self.lm_head(x).float()

    def forward_overlapped(self, micro: list[StepInputs], kv_caches: list) -> list[torch.Tensor]:
        """Two (or more) micro-batches in flight: while the shards compute one micro-batch's
        experts, this process runs attention for the next. The math per micro-batch is that
        of `forward`."""
        hidden, normed, ropes = (list(z) for z in zip(*(self._embed(m) for m in micro)))
        pending = [None] * len(micro)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            for j, m in enumerate(micro):
                if pending[j] is not None:
                    hidden[j], normed[j] = self._after_mlp(i - 1, hidden[j], self.layers[i - 1].mlp.finish(pending[j]), m)
                hidden[j], normed[j] = layer.attend(hidden[j], normed[j], ropes[j], k_cache, v_cache, m.batches)
                pending[j] = layer.mlp.start(normed[j])
        last = len(self.layers) - 1
        for j, m in enumerate(micro):
            hidden[j], normed[j] = self._after_mlp(last, hidden[j], self.layers[last].mlp.finish(pending[j]), m)
        return [self.lm_head(x).float() for x in normed]
