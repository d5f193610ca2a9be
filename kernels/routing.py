"""Router top-k selection: softmax top-k (Mixtral, Qwen, OLMoE) and sigmoid grouped top-k
with a score-correction bias (DeepSeek-V3).

Both return (weights [T, K] float32, expert ids [T, K] int64).
"""

import torch
import torch.nn.functional as F

from moefleet.kernels.cpu_extension import cpu_ops


def router_softmax_topk(x: torch.Tensor, router: torch.Tensor, top_k: int,
                        renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, D] (any float dtype), router: [E, D] float32. The router's logits in float32, then
    `softmax_topk`. One compiled call on CPU, where the torch formulation took four."""
    ops = cpu_ops() if x.device.type == "cpu" and router.dtype == torch.float32 else None
    if ops is not None:
        return ops.router_softmax_topk(x, router, top_k, renormalize)
    return softmax_topk(F.linear(x.float(), router.float()), top_k, renormalize)


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E]. Softmax over all experts in float32, keep the top k, optionally
    renormalise over them (the torch reference of the compiled router)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sigmoid_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. router_logits: [T, E]; correction_bias: [E] or None.

    The bias only steers which experts are chosen; the weights come from the unbiased sigmoid
    scores. Experts are first restricted to the `topk_groups` best groups, a group scored by
    the sum of its two best biased scores.
    """
    scores = router_logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    num_tokens, num_experts = choice.shape
    if num_groups > 1:
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_ids = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids
