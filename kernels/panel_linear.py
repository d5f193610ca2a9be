"""Weights packed in column panels for the compiled small-batch GEMM (kernels/csrc/panel_gemm.cpp).

A panel holds 32 output columns for every input column ([P, K, 32]), so a multiply streams each
weight once, in order, with the rows of a decode step inside that stream. The gate_up weight of
an expert is packed with 16 gate columns beside the same 16 up columns in each panel, so the
kernel can apply SwiGLU before anything leaves its registers.

kernels.linear.Linear uses panels for every float32 weight on CPU; GateUpPanels is an expert's
(or a dense MLP's) gate_up projection with the activation fused."""

import torch

from moefleet.kernels.cpu_extension import cpu_ops

PANEL_WIDTH = 32
_HALF = PANEL_WIDTH // 2


def _empty_panels(columns: int, k: int, per_panel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(-(-columns // per_panel), k, PANEL_WIDTH, dtype=dtype)


def _fill_lanes(panels: torch.Tensor, lanes: slice, rows: torch.Tensor) -> None:
    """Weight rows [n, K] into `lanes` of consecutive panels (width lanes per panel), lanes past n
    zero. One strided copy (experts are packed on a shard while it serves, so every copy here
    takes CPU from serving)."""
    width, (n, k) = lanes.stop - lanes.start, rows.shape
    full = n // width
    panels[:full, :, lanes].copy_(rows[: full * width].view(full, width, k).transpose(1, 2))
    if full < panels.shape[0]:
        panels[full, :, lanes].zero_()
        panels[full, :, lanes.start : lanes.start + n - full * width].copy_(rows[full * width:].t())


def _lanes_to_rows(panels: torch.Tensor, lanes: slice, n: int) -> torch.Tensor:
    """The inverse of _fill_lanes: the first n rows [n, K] held in `lanes`."""
    return panels[:, :, lanes].transpose(1, 2).reshape(-1, panels.shape[1])[:n]


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 32), K, 32], columns past N zero."""
    panels = _empty_panels(weight.shape[0], weight.shape[1], PANEL_WIDTH, weight.dtype)
    _fill_lanes(panels, slice(0, PANEL_WIDTH), weight)
    return panels


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_panels: [P, K, 32] -> [n, K]."""
    return _lanes_to_rows(panels, slice(0, PANEL_WIDTH), n).contiguous()


def pack_gate_up_panels(w13: torch.Tensor) -> torch.Tensor:
    """gate_up [2I, K] (gate rows, then up rows) -> [ceil(I / 16), K, 32]: lanes 0-15 gate
    columns 16p..16p+15, lanes 16-31 the same up columns (past I zero)."""
    inter = w13.shape[0] // 2
    panels = _empty_panels(inter, w13.shape[1], _HALF, w13.dtype)
    _fill_lanes(panels, slice(0, _HALF), w13[:inter])
    _fill_lanes(panels, slice(_HALF, PANEL_WIDTH), w13[inter:])
    return panels


def unpack_gate_up_panels(panels: torch.Tensor, intermediate: int) -> torch.Tensor:
    """The inverse of pack_gate_up_panels: -> [2I, K]."""
    return torch.cat([_lanes_to_rows(panels, slice(0, _HALF), intermediate),
                      _lanes_to_rows(panels, slice(_HALF, PANEL_WIDTH), intermediate)])


def panels_usable(weight: torch.Tensor) -> bool:
    """Column panels serve float32 weights on CPU when the compiled kernels are loaded."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_ops() is not None


class GateUpPanels:
    """An expert's gate_up projection (w13 [2I, D]) packed so that SwiGLU happens in the same
    pass: `activation(x)` = silu(x @ gate.T) * (x @ up.T), [T, I]."""

    bias = None

    def __init__(self, w13: torch.Tensor):
        self.out_features, self.in_features = w13.shape
        self.intermediate = self.out_features // 2
        self.nbytes = w13.numel() * w13.element_size()  # checkpoint bytes, as Linear counts them
        self.weight = pack_gate_up_panels(w13)

    def dense_weight(self) -> torch.Tensor:
        return unpack_gate_up_panels(self.weight, self.intermediate)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops().panel_linear(x, self.weight, self.intermediate, True)

