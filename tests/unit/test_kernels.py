"""Golden and property tests of the kernels and the pure pieces of the engine."""

import math

import pytest
import torch

from moefleet.kernels.expert_ffn import grouped_swiglu, swiglu
from moefleet.kernels.linear import Linear
from moefleet.kernels.routing import sigmoid_grouped_topk, softmax_topk
from moefleet.kernels.rotary import RotaryCache, apply_rotary, rope_tables


def test_softmax_topk_golden():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(2.0), -10.0]])
    weights, ids = softmax_topk(logits, 2, renormalize=True)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(weights, torch.tensor([[0.6, 0.4]]))
    raw, _ = softmax_topk(logits, 2, renormalize=False)
    assert torch.allclose(raw.sum(), torch.tensor(5 / (6 + math.exp(-10))))


def test_sigmoid_grouped_topk_respects_groups_and_bias():
    # 4 experts in 2 groups; the bias steers the choice to group 1, weights stay unbiased.
    logits = torch.tensor([[2.0, 1.9, 0.0, -0.1]])
    bias = torch.tensor([0.0, 0.0, 3.0, 3.0])
    weights, ids = sigmoid_grouped_topk(logits, bias, top_k=2, num_groups=2, topk_groups=1, renormalize=False,
                                        scaling_factor=2.0)
    assert sorted(ids.tolist()[0]) == [2, 3]
    expected = 2.0 * torch.sigmoid(logits[0, ids[0]])
    assert torch.allclose(weights[0], expected)
    normed, _ = sigmoid_grouped_topk(logits, None, 2, 2, 1, renormalize=True, scaling_factor=1.0)
    assert torch.allclose(normed.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_grouped_swiglu_equals_per_pair_loop(tokens):
    torch.manual_seed(0)
    experts, d, inter, k = 5, 16, 8, 2
    w13, w2 = torch.randn(experts, 2 * inter, d), torch.randn(experts, d, inter)
    hidden = torch.randn(tokens, d)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    experts = [(Linear(w13[e]), Linear(w2[e])) for e in range(experts)]
    out = grouped_swiglu(hidden, torch.arange(tokens).repeat_interleave(k), ids.flatten(), weights.flatten(), experts, tokens)

    def reference(x, e):  # the SwiGLU expert in plain torch
        gate, up = (x @ w13[e].t()).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2[e].t()

    ref = torch.stack([sum(weights[t, j] * reference(hidden[t : t + 1], ids[t, j])[0] for j in range(k))
                       for t in range(tokens)])
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5)


def test_yarn_rotary_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 256,
              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
    config = DeepseekV3Config(qk_rope_head_dim=32, max_position_embeddings=2048, rope_parameters=dict(params))
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    inv_freq, factor = rope_tables(32, 10000.0, "yarn", ours, 2048)
    assert torch.allclose(inv_freq, ref_inv_freq) and factor == pytest.approx(ref_factor)


def test_interleaved_rotary_is_a_rotation_of_pairs():
    cache = RotaryCache(rope_tables(8, 10000.0, "default", {}, 64)[0], 1.0, 64)
    x = torch.randn(3, 2, 8)
    cos, sin = cache.lookup(torch.tensor([0, 5, 9]))
    for interleaved in (False, True):
        y = apply_rotary(x, cos, sin, interleaved)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep norms
    assert torch.allclose(apply_rotary(x[:1], cos[:1], sin[:1], False), x[:1])  # position 0 is the identity
    rounded = cache.lookup(torch.tensor([0, 5, 9]), torch.bfloat16)  # the kept bf16 tables round like the rows
    assert torch.equal(rounded[0], cos.to(torch.bfloat16)) and torch.equal(rounded[1], sin.to(torch.bfloat16))


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("path", ["torch", "compiled"])
def test_whole_prompts_attend_in_one_causal_call_like_masked_chunks(window, path, monkeypatch):
    """Torch path: prefill chunks that are whole prompts share one causal SDPA call per length;
    chunks with tokens cached before them (or cut by the window) attend alone under a derived
    mask. Compiled path: one kernel call for every chunk. Each equals every chunk attended on
    its own with an explicit causal (and window) mask."""
    import torch.nn.functional as F

    import moefleet.kernels.attention as attention
    from moefleet.kernels.attention import AttentionBatch, PrefillChunk, paged_attention
    from moefleet.kernels.cpu_extension import cpu_ops, unavailable_reason

    if path == "torch":
        monkeypatch.setattr(attention, "cpu_ops", lambda: None)
    else:
        assert cpu_ops() is not None, unavailable_reason()

    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, slots = 4, 2, 8, 64
    k_cache, v_cache = torch.randn(slots, kv_heads, dim, generator=gen), torch.randn(slots, kv_heads, dim, generator=gen)
    layout = [(0, 5, 5), (5, 5, 5), (10, 3, 3), (13, 2, 6), (15, 5, 5)]  # (q_start, q_len, context_len)
    chunks, used = [], 0
    for q_start, q_len, ctx in layout:
        chunks.append(PrefillChunk(q_start, q_len, ctx, torch.arange(used, used + ctx)))
        used += ctx
    q = torch.randn(20, heads, dim, generator=gen)
    empty = torch.empty(0, dtype=torch.long)
    batch = AttentionBatch(empty, 0, 4, window, empty.view(0, 0), empty, tuple(chunks))
    got = paged_attention(q, k_cache, v_cache, batch, 0.3)
    for chunk in chunks:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        q_pos = torch.arange(chunk.context_len - chunk.q_len, chunk.context_len).unsqueeze(1)
        k_pos = torch.arange(chunk.context_len).unsqueeze(0)
        mask = (k_pos <= q_pos) & (k_pos > q_pos - (window or chunk.context_len))
        expected = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k_cache[chunk.context_slots].transpose(0, 1),
            v_cache[chunk.context_slots].transpose(0, 1), attn_mask=mask, scale=0.3, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[rows], expected, atol=1e-5, rtol=1e-5)
