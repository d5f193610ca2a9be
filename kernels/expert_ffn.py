"""Token permutation and the grouped SwiGLU expert FFN over stacked expert weights.

Stacked weights (gpt-fast layout): w13 [E, 2I, D] holds gate rows then up rows; w2 [E, D, I].
"""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP. x: [T, D], w13: [2I, D], w2: [D, I] -> [T, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def permute(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Group (token, k) pairs by expert.

    expert_ids: [N] local expert index per pair. Returns (order [N]: pair indices sorted by
    expert, counts: python list [E] of pairs per expert).
    """
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    return order, counts


def grouped_swiglu(
    hidden: torch.Tensor,
    token_index: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """Weighted sum of expert outputs per token, for a set of (token, expert) pairs.

    hidden: [T, D]; token_index, expert_ids, weights: [N] (one row per chosen pair; expert_ids
    index the stacked weights w13 [E, 2I, D], w2 [E, D, I]). Returns [num_tokens, D]: the
    pre-reduced partial sum each token receives from these experts (unpermute fused with the
    weighted combine).
    """
    out = hidden.new_zeros(num_tokens, hidden.shape[-1])
    if expert_ids.numel() == 0:
        return out
    order, counts = permute(expert_ids, w13.shape[0])
    sorted_tokens = token_index[order]
    sorted_weights = weights[order].to(hidden.dtype).unsqueeze(-1)
    rows = hidden[sorted_tokens]
    start = 0
    pieces = []
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        pieces.append(swiglu(rows[start:end], w13[expert], w2[expert]))
        start = end
    expert_out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    out.index_add_(0, sorted_tokens, expert_out * sorted_weights)
    return out
