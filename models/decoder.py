"""The dense part of a model replica: embeddings, attention layers, norms, router and shared
experts, LM head. Routed experts are reached only through the dispatcher."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moefleet.kernels.attention import AttentionBatch
from moefleet.kernels.linear import Linear
from moefleet.kernels.norms import rms_norm
from moefleet.kernels.rotary import RotaryCache, rope_tables
from moefleet.models.attention_layers import build_attention
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.moe_layer import DenseMLP, MoELayer
from moefleet.models.spec import ModelSpec


@dataclass(frozen=True)
class StepInputs:
    """One forward's flat inputs. token_ids, positions: [T]; batches: attention metadata per
    sliding window; logits_rows: [N] rows whose next-token logits are wanted."""

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

    def attend(self, h, rope, k_cache, v_cache, batches) -> torch.Tensor:
        x = rms_norm(h, self.input_norm, self.eps)
        return h + self.attention.forward(x, *rope, k_cache, v_cache, batches[self.window])

    def start_mlp(self, h):
        return self.mlp.start(rms_norm(h, self.post_attention_norm, self.eps))


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
        return F.embedding(inputs.token_ids, self.embed), self.rotary.lookup(inputs.positions, self.dtype)

    def _logits(self, h: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        h = rms_norm(h[inputs.logits_rows], self.final_norm, self.spec.rms_norm_eps)
        return self.lm_head(h).float()

    def forward(self, inputs: StepInputs, kv_caches: list) -> torch.Tensor:
        """kv_caches[layer] = (k_cache, v_cache). Returns float32 logits [N, V]."""
        h, rope = self._embed(inputs)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = layer.attend(h, rope, k_cache, v_cache, inputs.batches)
            h = h + layer.mlp.finish(layer.start_mlp(h))
        return self._logits(h, inputs)

    def forward_overlapped(self, micro: list[StepInputs], kv_caches: list) -> list[torch.Tensor]:
        """Two (or more) micro-batches in flight: while the shards compute one micro-batch's
        experts, this process runs attention for the next. The math per micro-batch is that
        of `forward`."""
        hidden, ropes = zip(*(self._embed(m) for m in micro))
        hidden, pending = list(hidden), [None] * len(micro)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            for i, m in enumerate(micro):
                if pending[i] is not None:
                    hidden[i] = hidden[i] + pending[i][0].finish(pending[i][1])
                hidden[i] = layer.attend(hidden[i], ropes[i], k_cache, v_cache, m.batches)
                pending[i] = (layer.mlp, layer.start_mlp(hidden[i]))
        for i in range(len(micro)):
            hidden[i] = hidden[i] + pending[i][0].finish(pending[i][1])
        return [self._logits(h, m) for h, m in zip(hidden, micro)]
