"""Token permutation and the grouped SwiGLU expert FFN over stacked expert weights.

Stacked weights are stored input-major so both paths below multiply without a transpose copy:
w13t [E, D, 2I] (gate columns then up columns), w2t [E, I, D].
"""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP in checkpoint layout. x: [T, D], w13: [2I, D], w2: [D, I] -> [T, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def stack_for_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint-layout stacks w13 [E, 2I, D], w2 [E, D, I] -> input-major w13t [E, D, 2I], w2t [E, I, D]."""
    return w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()


def permute(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, expert) pairs by expert. expert_ids: [N] -> (order [N]: pair indices sorted
    by expert, counts [E]: pairs per expert)."""
    return torch.argsort(expert_ids, stable=True), torch.bincount(expert_ids, minlength=num_experts)


def _padded_bmm(rows: torch.Tensor, sorted_experts: torch.Tensor, counts: torch.Tensor, longest: int,
                w13t: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """All experts in two batched matmuls: rows (sorted by expert) are scattered into an
    [E, longest, D] buffer, zero-padded. Small per-expert batches run ~2.5x faster this way on
    CPU than one matmul per expert, because MKL handles tiny-M GEMMs poorly."""
    num_experts = w13t.shape[0]
    starts = counts.cumsum(0) - counts
    slot = torch.arange(rows.shape[0]) - starts[sorted_experts]
    padded = rows.new_zeros(num_experts, longest, rows.shape[-1])
    padded[sorted_experts, slot] = rows
    gate, up = torch.bmm(padded, w13t).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w2t)[sorted_experts, slot]


def _per_expert(rows: torch.Tensor, counts: list[int], w13t: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            gate, up = (rows[start : start + count] @ w13t[expert]).chunk(2, dim=-1)
            pieces.append((F.silu(gate) * up) @ w2t[expert])
            start += count
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def grouped_swiglu(
    hidden: torch.Tensor,
    token_index: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13t: torch.Tensor,
    w2t: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """Weighted sum of expert outputs per token, for a set of (token, expert) pairs.

    hidden: [T, D]; token_index, expert_ids, weights: [N] (one entry per chosen pair;
    expert_ids index the stacks w13t [E, D, 2I], w2t [E, I, D]). Returns [num_tokens, D]: the
    pre-reduced partial sum each token receives from these experts (unpermute fused with the
    weighted combine).
    """
    out = hidden.new_zeros(num_tokens, hidden.shape[-1])
    pairs = expert_ids.numel()
    if pairs == 0:
        return out
    num_experts = w13t.shape[0]
    order, counts = permute(expert_ids, num_experts)
    sorted_tokens = token_index[order]
    rows = hidden[sorted_tokens]
    counts_list = counts.tolist()
    active, longest = sum(1 for c in counts_list if c), max(counts_list)
    # The batched path reads every expert's weights and pays for padding: worth it when most
    # experts are busy and the load is not too skewed.
    if 2 * active >= num_experts and num_experts * longest <= 2 * pairs + 4 * num_experts:
        expert_out = _padded_bmm(rows, expert_ids[order], counts, longest, w13t, w2t)
    else:
        expert_out = _per_expert(rows, counts_list, w13t, w2t)
    out.index_add_(0, sorted_tokens, expert_out * weights[order].to(hidden.dtype).unsqueeze(-1))
    return out
