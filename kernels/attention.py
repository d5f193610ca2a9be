"""Attention over a paged KV cache.

The cache of one layer is a flat slot array: k_cache [S, G, dk], v_cache [S, G, dv], where a
sequence's token at position p lives in slot block_table[p // block_size] * block_size +
p % block_size. The batch of one engine step is flattened: decode tokens first (one per
sequence, attended as one padded batch), then prefill chunks (each attended on its own with a
causal mask offset by the tokens already cached).
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from moefleet.kernels.cpu_extension import cpu_ops
from moefleet.kernels.rotary import apply_rotary


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk: query rows [q_start, q_start + q_len) of the flat batch,
    whose tokens sit at positions [context_len - q_len, context_len)."""

    q_start: int
    q_len: int
    context_len: int
    context_slots: torch.Tensor  # [context_len] cache slots of positions 0..context_len-1


@dataclass(frozen=True)
class AttentionBatch:
    """Where one step's tokens go in the cache and what each query may attend to."""

    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    num_decodes: int  # the first num_decodes rows are single-token decodes
    block_size: int
    window: int | None  # sliding window of the layers this batch serves (None: full context)
    decode_block_tables: torch.Tensor  # [num_decodes, W] int64 block ids, padded with block 0
    decode_context_lens: torch.Tensor  # [num_decodes] int64 positions cached, the new token included
    prefills: tuple[PrefillChunk, ...]

    @cached_property
    def prefill_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks as the compiled kernel reads them: [C, 3] int64 rows (q_start, q_len,
        context_len) and every chunk's context slots, one after another. Built once per step,
        on first use, and shared by the layers."""
        table = torch.tensor([(c.q_start, c.q_len, c.context_len) for c in self.prefills], dtype=torch.long)
        return table, torch.cat([c.context_slots for c in self.prefills])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k: [T, G, dk], v: [T, G, dv] written into their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    if v_cache.data_ptr() != k_cache.data_ptr():
        v_cache.index_copy_(0, slot_mapping, v)


def rotate_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on q [T, H, d] and k [T, G, d], then k and v [T, G, dv] into their cache slots.
    Returns the rotated q. One compiled call on CPU for the rotate-half layout."""
    ops = cpu_ops() if q.device.type == "cpu" and not interleaved else None
    if ops is not None:
        ops.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
        return q
    q, k = apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)
    write_kv(k_cache, v_cache, slot_mapping, k, v)
    return q


def decode_slots_and_mask(batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode rows' context as cache slots [B, Lmax] (padded with slot 0) and the mask
    [B, 1, 1, Lmax] of real, in-window positions: the torch reference gathers through these."""
    lens, bs = batch.decode_context_lens, batch.block_size
    longest = int(lens.max())
    slots = (batch.decode_block_tables.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)[:, :longest]
    key_pos = torch.arange(longest).unsqueeze(0)
    mask = key_pos < lens.unsqueeze(1)
    if batch.window is not None:
        mask &= key_pos > (lens.unsqueeze(1) - 1 - batch.window)
    return slots, mask.view(len(lens), 1, 1, longest)


def _decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                      scale: float, gqa: bool) -> torch.Tensor:
    slots, mask = decode_slots_and_mask(batch)
    keys = k_cache[slots].transpose(1, 2)  # [B, G, L, dk]
    values = v_cache[slots].transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa).squeeze(2)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q: [T, H, dk] -> [T, H, dv], attending to each sequence's cached context (the new tokens
    must already be written). Heads share key/value heads in groups (GQA/MQA). Decode rows go
    through the compiled kernel when it is loaded (it reads the cache in place), else through
    the torch reference (gather, then SDPA)."""
    num_tokens, num_heads, _ = q.shape
    gqa = num_heads != k_cache.shape[1]
    nd = batch.num_decodes
    ops = cpu_ops() if q.device.type == "cpu" else None
    if ops is not None and nd == num_tokens:  # a decode-only step: the kernel's output is the answer
        return ops.paged_decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens,
                                          batch.block_size, scale, batch.window or 0)
    out = q.new_empty(num_tokens, num_heads, v_cache.shape[-1])
    if nd:
        if ops is not None:
            out[:nd] = ops.paged_decode_attention(q[:nd], k_cache, v_cache, batch.decode_block_tables,
                                                  batch.decode_context_lens, batch.block_size, scale, batch.window or 0)
        else:
            out[:nd] = _decode_reference(q[:nd], k_cache, v_cache, batch, scale, gqa)
    if ops is not None and batch.prefills:
        ops.paged_prefill_attention(q, k_cache, v_cache, *batch.prefill_index, scale, batch.window or 0, out)
        return out
    whole, partial = _whole_prompt_groups(batch)
    for chunks in whole:
        _attend_whole_prompts(q, k_cache, v_cache, chunks, scale, gqa, out)
    for chunk in partial:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        keys = k_cache[chunk.context_slots].transpose(0, 1)  # [G, L, dk]
        values = v_cache[chunk.context_slots].transpose(0, 1)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), keys, values, attn_mask=causal_mask(chunk, batch.window), scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
    return out


def causal_mask(chunk: PrefillChunk, window: int | None) -> torch.Tensor:
    """[q_len, context_len], True where a query of the chunk may attend: causal, offset by the
    tokens cached before the chunk, and within the sliding window if there is one."""
    q_pos = torch.arange(chunk.context_len - chunk.q_len, chunk.context_len).unsqueeze(1)
    k_pos = torch.arange(chunk.context_len).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _whole_prompt_groups(batch: AttentionBatch) -> tuple[list[list[PrefillChunk]], list[PrefillChunk]]:
    """Prefill chunks that are whole prompts (nothing cached before them, no window cutting into
    them), grouped by length; and the rest. A group attends in one causal SDPA call: batched, and
    on torch's flash path, where a chunk with an explicit mask (`causal_mask`) takes the math path
    on its own."""
    groups: dict[int, list[PrefillChunk]] = {}
    partial = []
    for chunk in batch.prefills:
        if chunk.q_len == chunk.context_len and (batch.window is None or chunk.q_len <= batch.window):
            groups.setdefault(chunk.q_len, []).append(chunk)
        else:
            partial.append(chunk)
    return list(groups.values()), partial


def _attend_whole_prompts(q, k_cache, v_cache, chunks: list[PrefillChunk], scale: float, gqa: bool, out) -> None:
    length = chunks[0].q_len
    rows = torch.cat([torch.arange(c.q_start, c.q_start + length) for c in chunks])  # [B * L]
    slots = torch.stack([c.context_slots for c in chunks])  # [B, L]
    queries = q[rows].view(len(chunks), length, *q.shape[1:]).transpose(1, 2)  # [B, H, L, dk]
    keys = k_cache[slots].transpose(1, 2)  # [B, G, L, dk]
    values = v_cache[slots].transpose(1, 2)
    attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    out[rows] = attended.transpose(1, 2).reshape(len(chunks) * length, *out.shape[1:])
