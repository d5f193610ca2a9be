"""Token permutation and the grouped SwiGLU expert FFN.

An expert is a pair from `swiglu_linears`: gate_up (w13 [2I, D]: gate rows then up rows) and
down (w2 [D, I]), kernels.linear.Linear each, except that the gate_up projection is a
GateUpPanels (SwiGLU fused) where column panels serve."""

import torch
import torch.nn.functional as F

from moefleet.kernels.cpu_extension import cpu_ops
from moefleet.kernels.linear import Linear
from moefleet.kernels.panel_linear import GateUpPanels, panels_usable

ExpertPair = tuple[Linear | GateUpPanels, Linear]  # (gate_up, down)


def swiglu_linears(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertPair:
    """(gate_up, down) for a SwiGLU MLP or expert from its gate and up [I, D] and down [D, I]
    weights; the gate_up projection has SwiGLU fused into it where column panels serve (float32
    on CPU with the compiled kernels), else it is one Linear over [gate; up]."""
    gate_up = GateUpPanels(gate, up) if panels_usable(gate) else Linear(torch.cat([gate, up]))
    return gate_up, Linear(down)


def swiglu(x: torch.Tensor, gate_up: Linear | GateUpPanels, down: Linear) -> torch.Tensor:
    """SwiGLU MLP. x: [T, D] -> [T, D]."""
    if isinstance(gate_up, GateUpPanels):
        return down(gate_up.activation(x))
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
    experts: list[ExpertPair],
    num_tokens: int,
    weight_lists: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Weighted sum of expert outputs per token, for a set of (token, expert) pairs.

    hidden: [T, D]; token_index, expert_ids, weights: [N] (one entry per chosen pair;
    expert_ids index `experts`). Returns [num_tokens, D]: the pre-reduced partial sum each token
    receives from these experts (unpermute fused with the weighted combine). Each busy expert
    reads its weights once for all its rows.

    `weight_lists` (every expert's gate_up and down weights, none with a bias: see
    `expert_weight_lists`) lets the compiled CPU kernel run the whole thing in one call.
    """
    if weight_lists is not None and hidden.device.type == "cpu":
        ops = cpu_ops()
        if ops is not None:
            return ops.grouped_swiglu(hidden, token_index, expert_ids, weights, weight_lists[0], weight_lists[1], num_tokens)
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


def expert_weight_lists(experts: list[ExpertPair]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The experts' (gate_up, down) weights as two lists for the compiled kernel; None when one
    has a bias (the kernel computes bias-free experts, as every supported architecture has) or a
    gate_up in plain column panels (the kernel reads 3-d gate_up weights as GateUpPanels)."""
    if any(linear.bias is not None for pair in experts for linear in pair):
        return None
    if any(isinstance(gate_up, Linear) and gate_up.layout == "panels" for gate_up, _ in experts):
        return None
    return [gate_up.weight for gate_up, _ in experts], [down.weight for _, down in experts]
