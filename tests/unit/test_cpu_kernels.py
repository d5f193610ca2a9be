"""The compiled CPU kernels (kernels/csrc/cpu_ops.cpp) against their torch references.

A machine with a C++ compiler must build them: the engine's decode attention runs through
them by default, so a silent fallback would leave the fast path untested."""

import functools
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moefleet.kernels.attention import AttentionBatch, _decode_reference, rotate_and_write_kv, write_kv
from moefleet.kernels.cpu_extension import _cpu_flags, cpu_ops, unavailable_reason
from moefleet.kernels.expert_ffn import expert_weight_lists, grouped_swiglu, swiglu, swiglu_linears
from moefleet.kernels.linear import Linear
from moefleet.kernels.norms import add_rms_norm, rms_norm, rms_norm_reference
from moefleet.kernels.panel_linear import (
    GateUpPanels,
    pack_gate_up_panels,
    pack_panels,
    unpack_gate_up_panels,
    unpack_panels,
)
from moefleet.kernels.rotary import apply_rotary
from moefleet.kernels.routing import softmax_topk


def test_kernels_build_where_a_compiler_exists():
    if shutil.which("c++") is None:
        pytest.fail("no C++ compiler on PATH: the CPU kernels cannot be built (install g++)")
    assert cpu_ops() is not None, unavailable_reason()


def _router_case(num_tokens, num_experts, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=gen), torch.randn(num_experts, hidden, generator=gen) * 0.2


# Routers of E x D up to 64K weights run in the kernel's own loop, larger ones through ATen's GEMM:
# (60, 2048) is the second; hidden sizes that are not a multiple of 16 take the tail loop.
@pytest.mark.parametrize("num_experts,top_k,hidden",
                         [(8, 2, 256), (60, 4, 64), (4, 4, 37), (16, 1, 100), (60, 4, 2048)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_softmax_topk_matches_the_reference(num_experts, top_k, hidden, renormalize):
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    x, router = _router_case(37, num_experts, hidden, num_experts + hidden)
    weights, ids = ops.router_softmax_topk(x, router, top_k, renormalize)
    ref_weights, ref_ids = softmax_topk(F.linear(x, router), top_k, renormalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    empty_weights, empty_ids = ops.router_softmax_topk(x[:0], router, top_k, renormalize)
    assert empty_weights.shape == (0, top_k) and empty_ids.shape == (0, top_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_softmax_topk_widens_half_precision_rows_to_float32(dtype):
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    x, router = _router_case(9, 8, 96, 3)
    x = x.to(dtype)
    weights, ids = ops.router_softmax_topk(x, router, 2, True)
    ref_weights, ref_ids = softmax_topk(F.linear(x.float(), router), 2, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_router_softmax_topk_keeps_ids_in_range_when_a_row_is_nan():
    # A NaN in a token's hidden state makes its whole softmax NaN; the selection must still
    # return k distinct, valid expert ids (the engine indexes experts with them) rather than
    # read out of bounds.
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    x, router = _router_case(3, 8, 32, 5)
    x[1, 5] = float("nan")
    weights, ids = ops.router_softmax_topk(x, router, 3, True)
    assert ids.min() >= 0 and ids.max() < 8 and all(len(set(row)) == 3 for row in ids.tolist())
    assert torch.equal(ids[[0, 2]], softmax_topk(F.linear(x[[0, 2]], router), 3, True)[1])


def test_router_softmax_topk_rejects_bad_input_with_a_message():
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    x, router = _router_case(2, 8, 32, 7)
    with pytest.raises(RuntimeError, match="k = 9 for 8 experts"):
        ops.router_softmax_topk(x, router, 9, True)
    with pytest.raises(RuntimeError, match="float32 \\[E, 32\\]"):
        ops.router_softmax_topk(x, router.double(), 2, True)
    with pytest.raises(RuntimeError, match="float32 \\[E, 32\\]"):
        ops.router_softmax_topk(x, router[:, :16], 2, True)
    with pytest.raises(RuntimeError, match="x must be \\[T, D\\]"):
        ops.router_softmax_topk(x[0], router, 2, True)


def _paged_case(num_seqs, num_heads, num_kv_heads, dk, dv, block_size, lens, dtype, values_in_keys, seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    keys = torch.randn(num_blocks * block_size, num_kv_heads, dk, generator=gen).to(dtype)
    values = (keys[..., :dv] if values_in_keys
              else torch.randn(num_blocks * block_size, num_kv_heads, dv, generator=gen).to(dtype))
    width = max(-(-n // block_size) for n in lens)
    # Each sequence gets distinct, shuffled blocks, as the block manager hands them out.
    order = torch.randperm(num_blocks, generator=gen)[: num_seqs * width].view(num_seqs, width)
    q = torch.randn(num_seqs, num_heads, dk, generator=gen).to(dtype)
    return q, keys, values, order, torch.tensor(lens, dtype=torch.long)


@pytest.mark.parametrize("num_heads,num_kv_heads,dk,dv,values_in_keys", [
    (8, 4, 32, 32, False),   # GQA
    (4, 4, 16, 16, False),   # MHA
    (6, 1, 48, 32, True),    # MLA-style MQA: values are a view of the first dv key entries
    (4, 2, 20, 12, False),   # head dims that are not a multiple of the 16-lane vectors
    (4, 2, 32, 12, False),   # 16-lane scores beside element-wise values
])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Six sequences take one item per sequence (every kv head); one sequence, one item per kv head.
@pytest.mark.parametrize("lens", [[1, 3, 4, 9, 17, 30], [30]])
def test_paged_decode_attention_matches_the_reference(num_heads, num_kv_heads, dk, dv, values_in_keys, window, dtype,
                                                      lens):
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    block_size = 4
    q, keys, values, tables, context_lens = _paged_case(len(lens), num_heads, num_kv_heads, dk, dv, block_size, lens,
                                                        dtype, values_in_keys, seed=num_heads + dk)
    batch = AttentionBatch(torch.empty(0, dtype=torch.long), len(lens), block_size, window, tables, context_lens, ())
    scale = dk**-0.5
    expected = _decode_reference(q.float(), keys.float(), values.float(), batch, scale, num_heads != num_kv_heads)
    got = ops.paged_decode_attention(q, keys, values, tables, context_lens, block_size, scale, window or 0)
    assert got.shape == (len(lens), num_heads, dv) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_paged_decode_attention_rejects_bad_shapes_with_a_message():
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    q, keys, values, tables, lens = _paged_case(2, 6, 4, 8, 8, 4, [3, 5], torch.float32, False, seed=0)
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        ops.paged_decode_attention(q, keys, values, tables, lens, 4, 1.0, 0)
    q, keys, values, tables, lens = _paged_case(2, 4, 4, 8, 8, 4, [3, 5], torch.float32, False, seed=0)
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        ops.paged_decode_attention(q, keys, values, tables, torch.tensor([3, 99]), 4, 1.0, 0)


# (q_len, context_len) per chunk: whole prompts shorter and longer than a 16-lane block, a chunk
# continuing a prompt already partly cached, and a single-token chunk.
_PREFILL_LAYOUT = [(5, 5), (37, 37), (13, 30), (1, 9), (20, 20)]


@pytest.mark.parametrize("num_heads,num_kv_heads,dk,dv,values_in_keys", [
    (8, 4, 32, 32, False),   # GQA: two query heads per kv head
    (4, 4, 16, 16, False),   # MHA
    (6, 1, 48, 32, True),    # MLA-style MQA: values are a view of the first dv key entries
    (20, 1, 24, 20, False),  # more query heads per kv head than a block has lanes
    (4, 2, 20, 12, False),   # head dims that are not a multiple of 16
])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_prefill_attention_matches_the_reference(num_heads, num_kv_heads, dk, dv, values_in_keys, window, dtype,
                                                       torch_threads):
    """Every chunk's rows equal SDPA over its gathered context under the causal (and window)
    mask; rows before the chunks (a step's decode rows) are left as they were."""
    _check_prefill_attention(_PREFILL_LAYOUT, num_heads, num_kv_heads, dk, dv, values_in_keys, window, dtype)


# Spans of several 64-key tiles: a whole prompt of 150, a chunk of 70 after 130 cached positions
# (its blocks start mid-tile), one of 33 rows (a block's last lane-vector partly idle), a single
# token after 129, and 65 rows (query vectors not a multiple of a 64-vector block).
_LONG_PREFILL_LAYOUT = [(150, 150), (70, 200), (33, 97), (1, 130), (65, 65)]


@pytest.mark.parametrize("num_heads,num_kv_heads,dk", [(8, 4, 32), (6, 2, 64), (3, 1, 80), (2, 2, 128)])
@pytest.mark.parametrize("window", [None, 5, 50, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_attention_over_long_spans_matches_the_reference(num_heads, num_kv_heads, dk, window, dtype):
    """Causal spans that cross key tiles, with windows shorter than a block's rows, shorter than
    a tile and longer than one."""
    _check_prefill_attention(_LONG_PREFILL_LAYOUT, num_heads, num_kv_heads, dk, dk, False, window, dtype)


def _check_prefill_attention(layout, num_heads, num_kv_heads, dk, dv, values_in_keys, window, dtype):
    from moefleet.kernels.attention import PrefillChunk, causal_mask

    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(num_heads * dk)
    num_slots, num_decodes = max(256, sum(context_len for _, context_len in layout) + 16), 3
    keys = torch.randn(num_slots, num_kv_heads, dk, generator=gen).to(dtype)
    values = keys[..., :dv] if values_in_keys else torch.randn(num_slots, num_kv_heads, dv, generator=gen).to(dtype)
    order = torch.randperm(num_slots, generator=gen)  # contexts scattered over the cache
    chunks, q_start, used = [], num_decodes, 0
    for q_len, context_len in layout:
        chunks.append(PrefillChunk(q_start, q_len, context_len, order[used:used + context_len]))
        q_start, used = q_start + q_len, used + context_len
    q = torch.randn(q_start, num_heads, dk, generator=gen).to(dtype)
    out = torch.full((q_start, num_heads, dv), 7.0, dtype=dtype)
    table = torch.tensor([(c.q_start, c.q_len, c.context_len) for c in chunks])
    scale = dk**-0.5
    ops.paged_prefill_attention(q, keys, values, table, torch.cat([c.context_slots for c in chunks]), scale,
                                window or 0, out)
    assert torch.equal(out[:num_decodes], torch.full_like(out[:num_decodes], 7.0))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for chunk in chunks:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        expected = F.scaled_dot_product_attention(
            q[rows].float().transpose(0, 1), keys[chunk.context_slots].float().transpose(0, 1),
            values[chunk.context_slots].float().transpose(0, 1), attn_mask=causal_mask(chunk, window), scale=scale,
            enable_gqa=num_heads != num_kv_heads).transpose(0, 1)
        torch.testing.assert_close(out[rows].float(), expected, atol=tolerance, rtol=tolerance)


def test_paged_prefill_attention_rejects_bad_chunks_with_a_message():
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    q, keys, out = torch.randn(6, 4, 8), torch.randn(32, 2, 8), torch.empty(6, 4, 8)
    slots = torch.arange(6)
    with pytest.raises(RuntimeError, match=r"rows \[4, 10\) with context 6 do not fit 6 rows"):
        ops.paged_prefill_attention(q, keys, keys, torch.tensor([[4, 6, 6]]), slots, 1.0, 0, out)
    with pytest.raises(RuntimeError, match="cache slot 99 outside"):
        ops.paged_prefill_attention(q, keys, keys, torch.tensor([[0, 6, 6]]), torch.tensor([0, 1, 2, 3, 4, 99]), 1.0, 0,
                                    out)
    with pytest.raises(RuntimeError, match="slots hold 7 entries, the chunks' contexts 6"):
        ops.paged_prefill_attention(q, keys, keys, torch.tensor([[0, 6, 6]]), torch.arange(7), 1.0, 0, out)
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        ops.paged_prefill_attention(torch.randn(6, 3, 8), keys, keys, torch.tensor([[0, 6, 6]]), slots, 1.0, 0,
                                    torch.empty(6, 3, 8))


def test_kernels_can_be_turned_off():
    code = ("from moefleet.kernels.cpu_extension import cpu_ops, unavailable_reason;"
            "assert cpu_ops() is None; print(unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], env={"MOEFLEET_CPU_KERNELS": "0", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout
    assert "MOEFLEET_CPU_KERNELS=0" in out


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """With 2 threads the kernel hands whole experts to threads; with 1 it runs them in turn."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_pairs", [0, 1, 7, 40])
def test_grouped_swiglu_matches_the_reference(dtype, num_pairs, torch_threads):
    """The fused expert kernel (one call per shard and layer) against the torch loop, with the
    weights as shards hold them (column panels, of k pairs for bf16 where the CPU has AVX512-BF16)
    and experts that get no rows."""
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(num_pairs)
    d, inter, num_slots, num_rows = 16, 24, 5, 9
    dense = [((torch.randn(2 * inter, d, generator=gen) * 0.2).to(dtype),
              (torch.randn(d, inter, generator=gen) * 0.2).to(dtype)) for _ in range(num_slots)]
    experts = [swiglu_linears(*w13.chunk(2), w2) for w13, w2 in dense]
    hidden = torch.randn(num_rows, d, generator=gen).to(dtype)
    rows = torch.randint(0, num_rows, (num_pairs,), generator=gen)
    slots = torch.randint(0, num_slots - 1, (num_pairs,), generator=gen)  # the last slot stays idle
    weights = torch.rand(num_pairs, generator=gen)
    # The torch loop over the checkpoint-layout weights (F.linear), independent of any packing.
    plain = [(functools.partial(F.linear, weight=w13), functools.partial(F.linear, weight=w2)) for w13, w2 in dense]
    reference = grouped_swiglu(hidden, rows, slots, weights, plain, num_rows)
    fused = grouped_swiglu(hidden, rows, slots, weights, experts, num_rows, expert_weight_lists(experts))
    assert fused.dtype == dtype and fused.shape == (num_rows, d)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused, reference, atol=tolerance, rtol=tolerance)


def test_grouped_swiglu_prefill_sized_calls_reuse_their_scratch_correctly():
    """Calls whose scratch passes 32 MiB (a long prefill's) keep it for the next call on the
    thread: a larger call, then a smaller one inside the kept buffer, then a decode-sized one,
    each still equals the torch loop."""
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(7)
    d, inter, num_slots = 64, 96, 4
    dense = [(torch.randn(2 * inter, d, generator=gen) * 0.2, torch.randn(d, inter, generator=gen) * 0.2)
             for _ in range(num_slots)]
    experts = [swiglu_linears(*w13.chunk(2), w2) for w13, w2 in dense]
    plain = [(functools.partial(F.linear, weight=w13), functools.partial(F.linear, weight=w2)) for w13, w2 in dense]
    for num_pairs in (100_000, 140_000, 120_000, 12):  # a pair's activations, 384 bytes: 38, 54, 46 MB, then 5 KB
        num_rows = num_pairs // 2 + 1
        hidden = torch.randn(num_rows, d, generator=gen)
        rows = torch.randint(0, num_rows, (num_pairs,), generator=gen)
        slots = torch.randint(0, num_slots, (num_pairs,), generator=gen)
        weights = torch.rand(num_pairs, generator=gen)
        reference = grouped_swiglu(hidden, rows, slots, weights, plain, num_rows)
        fused = grouped_swiglu(hidden, rows, slots, weights, experts, num_rows, expert_weight_lists(experts))
        torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_grouped_swiglu_rejects_slots_it_does_not_hold():
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    w13, w2 = [torch.randn(8, 4)], [torch.randn(4, 4)]
    with pytest.raises(RuntimeError, match="slot 3 outside"):
        ops.grouped_swiglu(torch.randn(2, 4), torch.tensor([0]), torch.tensor([3]), torch.tensor([1.0]), w13, w2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_write_match_the_reference(dtype):
    """One call rotates q in place and writes rotated k and v into their slots, as apply_rotary
    and write_kv do; q and k are views into one fused qkv output, as the attention layer has them."""
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, dim, slots = 5, 4, 2, 8, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(tokens, 1, dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slot_mapping = torch.tensor([3, 17, 0, 31, 8])
    results = []
    for use_reference in (True, False):
        q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
        caches = torch.zeros(slots, kv_heads, dim, dtype=dtype), torch.zeros(slots, kv_heads, dim, dtype=dtype)
        if use_reference:
            q, k = apply_rotary(q, cos, sin, False), apply_rotary(k, cos, sin, False)
            write_kv(*caches, slot_mapping, k, v)
        else:
            q = rotate_and_write_kv(q, k, v, cos, sin, False, *caches, slot_mapping)
        results.append((q.clone(), *caches))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 256), (16, 768), (3, 4, 32)])
def test_rms_norm_matches_the_reference(dtype, shape, torch_threads):
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    weight = torch.rand(shape[-1], generator=gen).to(dtype)
    got = rms_norm(x, weight, 1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-6), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 256), (16, 768), (3, 4, 32), (0, 64)])
def test_add_rms_norm_matches_the_add_then_the_norm(dtype, shape, torch_threads):
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(7 + shape[-1])
    residual, delta = ((torch.randn(*shape, generator=gen) * 3).to(dtype) for _ in range(2))
    weight = torch.rand(shape[-1], generator=gen).to(dtype)
    h, normed = add_rms_norm(residual, delta, weight, 1e-6)
    expected_h = residual + delta
    assert torch.equal(h, expected_h)  # rounded to the dtype once, as torch's add rounds it
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, rms_norm_reference(expected_h, weight, 1e-6), atol=tolerance, rtol=tolerance)


def test_add_rms_norm_rejects_mismatched_operands_with_a_message():
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    residual, weight = torch.randn(4, 32), torch.rand(32)
    with pytest.raises(RuntimeError, match="delta is"):
        ops.add_rms_norm(residual, torch.randn(4, 16), weight, 1e-6)
    with pytest.raises(RuntimeError, match="weight has 16 entries for rows of 32"):
        ops.add_rms_norm(residual, residual, weight[:16], 1e-6)


def expected_layout(dtype: torch.dtype, in_features: int) -> str:
    """float32 weights always go in column panels; bfloat16 ones too where the input width fills
    the panels' k groups (pairs where the CPU has AVX512-BF16), else oneDNN where it has a bf16
    path on this CPU, else plain."""
    if dtype == torch.float32 or in_features % cpu_ops().bf16_panel_k_group() == 0:
        return "panels"
    return "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain"


def assert_close_to(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, atol: float = 1e-5) -> None:
    """float32: within float rounding of the exact result. bfloat16 (float32 accumulation, one
    rounding at the end): within one bfloat16 step (2^-8 relative) of the exact result."""
    assert got.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(got.float(), exact, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [40, 39])
@pytest.mark.parametrize("rows", [0, 1, 3, 8, 12, 13, 25, 70])
@pytest.mark.parametrize("out_features", [1, 32, 45, 96])
def test_linear_over_column_panels_matches_f_linear(dtype, in_features, rows, out_features, torch_threads):
    """Row counts around the 12-row register block, widths around the 32-column panel, a bias;
    an odd input width (bfloat16 panels need pairs)."""
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(rows * 100 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    x = torch.randn(2, rows, in_features, generator=gen).to(dtype)
    linear = Linear(weight, bias)
    assert linear.layout == expected_layout(dtype, in_features)
    exact = F.linear(x.float(), weight.float(), bias.float())
    # bfloat16: the product is rounded, then the bias added and rounded again (as F.linear in
    # bf16 does), so a step of the largest magnitude is the bound where they cancel.
    atol = 1e-5 if dtype == torch.float32 else 2.0**-7 * max(1.0, float(exact.abs().amax())) if exact.numel() else 0.0
    assert_close_to(linear(x), exact, dtype, atol=atol)
    assert torch.equal(linear.dense_weight(), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("intermediate", [1, 16, 21, 48])
def test_gate_up_panels_fuse_swiglu(dtype, intermediate, torch_threads):
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(intermediate)
    w13 = torch.randn(2 * intermediate, 24, generator=gen).to(dtype)
    w2 = torch.randn(24, intermediate, generator=gen).to(dtype)
    x = torch.randn(11, 24, generator=gen).to(dtype)
    gate_up, down = swiglu_linears(*w13.chunk(2), w2)
    assert isinstance(gate_up, GateUpPanels) == (expected_layout(dtype, 24) == "panels")
    if not isinstance(gate_up, GateUpPanels):
        pytest.skip("no bfloat16 panels on this CPU (no AVX512-BF16): the oneDNN/plain path is covered by "
                    "test_grouped_swiglu_matches_the_reference")
    gate, up = F.linear(x.float(), w13.float()).chunk(2, dim=-1)
    activation = F.silu(gate) * up  # in float32: the kernel rounds once, after silu(gate) * up
    assert_close_to(gate_up.activation(x), activation, dtype)
    expected = F.linear(gate_up.activation(x).float(), w2.float())  # down over what the kernel handed it
    assert_close_to(swiglu(x, gate_up, down), expected, dtype, atol=1e-4)
    assert torch.equal(gate_up.dense_weight(), w13)


def test_panel_packing_round_trips_and_pads_with_zeros():
    weight = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 32) and panels[1, :, 18:].abs().sum() == 0
    assert torch.equal(unpack_panels(panels, 50), weight)
    gate_up = pack_gate_up_panels(weight[:20], weight[20:40])  # I = 20: two panels, the second half empty
    assert gate_up.shape == (2, 3, 32) and gate_up[1, :, 4:16].abs().sum() == 0 and gate_up[1, :, 20:].abs().sum() == 0
    assert torch.equal(unpack_gate_up_panels(gate_up, 20), weight[:40])


def test_bfloat16_panels_hold_k_as_this_cpus_kernel_reads_it():
    """bfloat16 panels where the CPU has AVX512-BF16: [P, K/2, 64], element 2c+t of pair row j
    is W[32p+c, 2j+t] (the operand order of its pair dot product); elsewhere float32's
    [P, K, 32], widened to float in registers."""
    assert cpu_ops() is not None, unavailable_reason()
    weight = torch.arange(50 * 4, dtype=torch.float32).reshape(50, 4).to(torch.bfloat16)  # exact in bf16
    panels = pack_panels(weight)
    gate_up = pack_gate_up_panels(weight[:20], weight[20:40])  # I = 20
    if cpu_ops().bf16_panel_k_group() == 2:
        assert panels.shape == (2, 2, 64) and panels[1, :, 36:].abs().sum() == 0
        assert panels[0, 1, 2 * 5 + 1] == weight[5, 3] and panels[1, 0, 2 * 3] == weight[35, 0]
        assert gate_up.shape == (2, 2, 64) and gate_up[1, 0, 2 * 16 + 1] == weight[36, 1]
    else:
        assert panels.shape == (2, 4, 32) and panels[1, :, 18:].abs().sum() == 0
        assert panels[0, 3, 5] == weight[5, 3] and panels[1, 0, 3] == weight[35, 0]
        assert gate_up.shape == (2, 4, 32) and gate_up[1, 1, 16] == weight[36, 1]
    assert torch.equal(unpack_panels(panels, 50), weight)
    assert torch.equal(unpack_gate_up_panels(gate_up, 20), weight[:40])


def test_expert_kernel_is_not_handed_plain_panels_as_gate_up():
    """A 3-d gate_up weight means GateUpPanels to the kernel; a Linear in plain panels has the
    same shape, so such experts go the torch way instead of being misread."""
    assert cpu_ops() is not None, unavailable_reason()
    experts = [(Linear(torch.randn(8, 4)), Linear(torch.randn(4, 4)))]
    assert expert_weight_lists(experts) is None
    assert expert_weight_lists([swiglu_linears(torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4))]) is not None


def test_argmax_rows_chooses_as_torch_argmax():
    ops = cpu_ops()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(70, 1027, generator=gen)
    logits[1, [5, 900]] = 50.0  # equal maxima: the first wins
    logits[2] = float("-inf")  # no finite entry: index 0, as torch answers
    logits[3, [7, 11]] = float("nan")  # NaN counts as the largest: the first NaN
    logits[4, 3] = float("inf")
    logits[5, 1026] = 99.0  # the maximum in the tail past the last full vector
    torch.testing.assert_close(ops.argmax_rows(logits), logits.argmax(dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(ops.argmax_rows(logits[:, :1]), torch.zeros(70, dtype=torch.long), rtol=0, atol=0)
    for width in (10, 16, 33):  # rows shorter than a vector, exactly one, a vector and a tail
        torch.testing.assert_close(ops.argmax_rows(logits[:, :width]), logits[:, :width].argmax(dim=-1), rtol=0, atol=0)
    assert ops.argmax_rows(logits[:0]).shape == (0,)
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax_rows(logits.double())


@pytest.fixture
def set_bf16_brgemm_min_rows():
    """Yields the op that sets from how many rows bfloat16 multiplies take brgemm (0: never), and
    restores the setting afterwards."""
    ops = cpu_ops()
    assert ops is not None, unavailable_reason()
    before = ops.bf16_brgemm_min_rows(-1)
    yield ops.bf16_brgemm_min_rows
    ops.bf16_brgemm_min_rows(before)


@pytest.mark.parametrize("rows", [4, 31, 33, 70])
def test_bfloat16_brgemm_path_agrees_with_the_register_path(rows, set_bf16_brgemm_min_rows, torch_threads):
    """On AMX CPUs bfloat16 multiplies of 4+ rows go through oneDNN's brgemm over the same paired
    panels (tiles of 32 rows: 31, 33 and 70 cross them): linears and the fused experts (rows
    gathered by index, outputs added by weight) agree with the register path within bf16 rounding."""
    set_min_rows = set_bf16_brgemm_min_rows
    if "amx_bf16" not in _cpu_flags().split():
        pytest.skip("no AMX on this CPU: bfloat16 stays on the register path")
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(rows, 64, generator=gen).bfloat16()
    d, inter, num_slots = 64, 48, 3
    experts = [swiglu_linears(*(torch.randn(2 * inter, d, generator=gen) * 0.2).bfloat16().chunk(2),
                              (torch.randn(d, inter, generator=gen) * 0.2).bfloat16()) for _ in range(num_slots)]
    pair_rows = torch.randint(0, rows, (3 * rows,), generator=gen)
    slots = torch.arange(3 * rows) % num_slots
    weights = torch.rand(3 * rows, generator=gen)
    results = []
    for min_rows in (0, 4):
        set_min_rows(min_rows)
        assert set_min_rows(-1) == min_rows
        results.append((Linear(weight)(x),
                        grouped_swiglu(x, pair_rows, slots, weights, experts, rows, expert_weight_lists(experts))))
    (linear_regs, experts_regs), (linear_brgemm, experts_brgemm) = results
    assert_close_to(linear_brgemm, linear_regs.float(), torch.bfloat16)
    torch.testing.assert_close(experts_brgemm.float(), experts_regs.float(), atol=2e-2, rtol=2.0**-7)


def test_bfloat16_multiplies_serve_with_onednn_switched_off():
    """torch.backends.mkldnn.enabled = False makes ATen's brgemm refuse paired bf16 panels: the
    multiply must then stay on the register path rather than raise mid-request."""
    assert cpu_ops() is not None, unavailable_reason()
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 32, generator=gen).bfloat16()
    x = torch.randn(40, 32, generator=gen).bfloat16()
    linear = Linear(weight)
    with torch.backends.mkldnn.flags(enabled=False):
        got = linear(x)
    assert_close_to(got, F.linear(x.float(), weight.float()), torch.bfloat16, atol=2.0**-7 * 8)
