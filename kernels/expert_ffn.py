"""Token permutation and the grouped SwiGLU expert FFN.

An expert is a pair of linears: gate_up (w13 [2I, D]: gate rows then up rows) and down
(w2 [D, I]), each a kernels.linear.Linear (oneDNN-prepacked on CPU)."""

import torch
import torch.nn.functional as F

from moefleet.kernels.linear import Linear


def swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """SwiGLU MLP. x: [T, D] -> [T, D]."""
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


def permute(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Group (token, expert) pairs by expert. expert_ids: [N] -> (order [N]: pair indices sorted
    by expert, counts: pairs per expert, a python list [E])."""
    return torch.argsort(expert_ids, stable=True), torch.bincount(expert_ids, minlength=num_experts).tolist()


def grouped_swiglu(
    hidden: torch.Tensor,
    token_index: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    experts: list[tuple[Linear, Linear]],
    num_tokens: int,
) -> torch.Tensor:
    """Weighted sum of expert outputs per token, for a set of (token, expert) pairs.

    hidden: [T, D]; token_index, expert_ids, weights: [N] (one entry per chosen pair;
    expert_ids index `experts`). Returns [num_tokens, D]: the pre-reduced partial sum each token
    receives from these experts (unpermute fused with the weighted combine). Each busy expert
    reads its weights once for all its rows.
    """
    out = hidden.new_zeros(num_tokens, hidden.shape[-1])
    if expert_ids.numel() == 0:
        return out
    order, counts = permute(expert_ids, len(experts))
    sorted_tokens = token_index[order]
    rows = hidden[sorted_tokens]
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            pieces.append(swiglu(rows[start : start + count], *experts[expert]))
            start += count
    expert_out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    out.index_add_(0, sorted_tokens, expert_out * weights[order].to(hidden.dtype).unsqueeze(-1))
    return out
