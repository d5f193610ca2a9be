"""Weights packed in column panels for the compiled small-batch GEMM (kernels/csrc/panel_gemm.cpp).

A panel holds 32 output columns for every input column ([P, K, 32]), so a multiply streams each
weight once, in order, with the rows of a decode step inside that stream. The gate_up weight of
an expert is packed with 16 gate columns beside the same 16 up columns in each panel, so the
kernel can apply SwiGLU before anything leaves its registers.

kernels.linear.Linear uses panels for every float32 weight on CPU; GateUpPanels is an expert's
(or a dense MLP's) gate_up projection with the activation fused."""

import torch
import torch.nn.functional as F

PANEL_WIDTH = 32


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 32), K, 32], columns past N zero. One strided copy (experts are packed
    on a shard while it serves, so every copy here takes CPU from serving)."""
    n, k = weight.shape
    panels = torch.empty(-(-n // PANEL_WIDTH), k, PANEL_WIDTH, dtype=weight.dtype)
    full = n // PANEL_WIDTH
    panels[:full].copy_(weight[: full * PANEL_WIDTH].view(full, PANEL_WIDTH, k).transpose(1, 2))
    if full < panels.shape[0]:
        panels[full].zero_()
        panels[full, :, : n - full * PANEL_WIDTH].copy_(weight[full * PANEL_WIDTH:].t())
    return panels


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_panels: [P, K, 32] -> [n, K]."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n].contiguous()


def pack_gate_up_panels(w13: torch.Tensor) -> torch.Tensor:
    """gate_up [2I, K] (gate rows, then up rows) -> [ceil(I / 16), K, 32]: lanes 0-15 gate
    columns 16p..16p+15, lanes 16-31 the same up columns (past I zero)."""
    half = PANEL_WIDTH // 2
    inter, k = w13.shape[0] // 2, w13.shape[1]
    panels = torch.empty(-(-inter // half), k, PANEL_WIDTH, dtype=w13.dtype)
    full = inter // half
    for lanes, rows in ((slice(0, half), w13[:inter]), (slice(half, PANEL_WIDTH), w13[inter:])):
        panels[:full, :, lanes].copy_(rows[: full * half].view(full, half, k).transpose(1, 2))
        if full < panels.shape[0]:
            panels[full, :, lanes].zero_()
            panels[full, :, lanes.start : lanes.start + inter - full * half].copy_(rows[full * half:].t())
    return panels


def unpack_gate_up_panels(panels: torch.Tensor, intermediate: int) -> torch.Tensor:
    """The inverse of pack_gate_up_panels: -> [2I, K]."""
    half = PANEL_WIDTH // 2
    columns = panels.transpose(1, 2)  # [P, 32, K]
    gate = columns[:, :half].reshape(-1, panels.shape[1])[:intermediate]
    up = columns[:, half:].reshape(-1, panels.shape[1])[:intermediate]
    return torch.cat([gate, up]).contiguous()


def panels_usable(weight: torch.Tensor) -> bool:
    """Column panels serve float32 weights on CPU when the compiled kernels are loaded."""
    from moefleet.kernels.cpu_extension import cpu_ops

    return weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_ops() is not None


class GateUpPanels:
    """An expert's gate_up projection (w13 [2I, D]) packed so that SwiGLU happens in the same
    pass: `activation(x)` = silu(x @ gate.T) * (x @ up.T), [T, I]."""

    bias = None

    def __init__(self, w13: torch.Tensor):
        self.out_features, self.in_features = w13.shape
        self.intermediate = self.out_features // 2
        self.weight = pack_gate_up_panels(w13)
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def dense_weight(self) -> torch.Tensor:
        return unpack_gate_up_panels(self.weight, self.intermediate)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        from moefleet.kernels.cpu_extension import cpu_ops

        return cpu_ops().panel_linear(x, self.weight, self.intermediate, True)

