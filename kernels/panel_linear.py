"""Weights packed in column panels for the compiled small-batch GEMM (kernels/csrc/panel_gemm.cpp).

A panel holds 32 output columns for every input column ([P, K, 32]), so a multiply streams each
weight once, in order, with the rows of a decode step inside that stream. The gate_up weight of
an expert is packed with 16 gate columns beside the same 16 up columns in each panel, so the
kernel can apply SwiGLU before anything leaves its registers.

kernels.linear.Linear uses panels for every float32 and bfloat16 weight on CPU (panels_usable;
bfloat16 ones need an even number of input columns where the CPU has AVX512-BF16); GateUpPanels
is an expert's (or a dense MLP's) gate_up projection with the activation fused."""

import torch

from moefleet.kernels.cpu_extension import cpu_ops

PANEL_WIDTH = 32
_HALF = PANEL_WIDTH // 2


def _k_group(dtype: torch.dtype) -> int:
    """Input columns per panel element group: bfloat16 panels hold k in pairs where the CPU has
    AVX512-BF16 (the operand of its pair dot product), other panels one k at a time."""
    return cpu_ops().bf16_panel_k_group() if dtype == torch.bfloat16 else 1


def _empty_panels(columns: int, k: int, per_panel: int, dtype: torch.dtype) -> torch.Tensor:
    """[P, K / g, 32, g]: the working view; the kernel takes it as [P, K / g, 32 g]."""
    group = _k_group(dtype)
    return torch.empty(-(-columns // per_panel), k // group, PANEL_WIDTH, group, dtype=dtype)


def _fill_lanes(panels: torch.Tensor, lanes: slice, rows: torch.Tensor) -> None:
    """Weight rows [n, K] into `lanes` of consecutive panels (width lanes per panel), lanes past n
    zero. One strided copy (experts are packed on a shard while it serves, so every copy here
    takes CPU from serving)."""
    width, (n, k), group = lanes.stop - lanes.start, rows.shape, panels.shape[3]
    full = n // width
    grouped = rows.reshape(n, k // group, group)
    panels[:full, :, lanes].copy_(grouped[: full * width].view(full, width, k // group, group).transpose(1, 2))
    if full < panels.shape[0]:
        panels[full, :, lanes].zero_()
        panels[full, :, lanes.start : lanes.start + n - full * width].copy_(grouped[full * width:].transpose(0, 1))


def _lanes_to_rows(panels: torch.Tensor, lanes: slice, n: int) -> torch.Tensor:
    """The inverse of _fill_lanes: the first n rows [n, K] held in `lanes`."""
    group = _k_group(panels.dtype)
    view = panels.view(panels.shape[0], panels.shape[1], PANEL_WIDTH, group)[:, :, lanes]
    return view.permute(0, 2, 1, 3).reshape(-1, panels.shape[1] * group)[:n]


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 32), K, 32] (paired bfloat16: [ceil(N / 32), K / 2, 64]), columns past N zero."""
    panels = _empty_panels(weight.shape[0], weight.shape[1], PANEL_WIDTH, weight.dtype)
    _fill_lanes(panels, slice(0, PANEL_WIDTH), weight)
    return panels.flatten(2)


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_panels: -> [n, K]."""
    return _lanes_to_rows(panels, slice(0, PANEL_WIDTH), n).contiguous()


def pack_gate_up_panels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [I, K] -> [ceil(I / 16), K, 32] (paired bfloat16: K / 2, 64): lanes 0-15 gate columns
    16p..16p+15, lanes 16-31 the same up columns (past I zero). Packed from the two weights as
    the checkpoint holds them: concatenating them first cost a copy of both per expert, ~a third
    of the CPU a shard spends staging an expert (page faults on the new memory, mostly)."""
    panels = _empty_panels(gate.shape[0], gate.shape[1], _HALF, gate.dtype)
    _fill_lanes(panels, slice(0, _HALF), gate)
    _fill_lanes(panels, slice(_HALF, PANEL_WIDTH), up)
    return panels.flatten(2)


def unpack_gate_up_panels(panels: torch.Tensor, intermediate: int) -> torch.Tensor:
    """The inverse of pack_gate_up_panels: -> [2I, K]."""
    return torch.cat([_lanes_to_rows(panels, slice(0, _HALF), intermediate),
                      _lanes_to_rows(panels, slice(_HALF, PANEL_WIDTH), intermediate)])


def panels_usable(weight: torch.Tensor) -> bool:
    """Column panels serve CPU weights when the compiled kernels are loaded: float32 always,
    bfloat16 when the input columns fill its k groups (pairs where the CPU has AVX512-BF16)."""
    if weight.device.type != "cpu" or cpu_ops() is None:
        return False
    if weight.dtype == torch.bfloat16:
        return weight.shape[-1] % _k_group(weight.dtype) == 0
    return weight.dtype == torch.float32


class GateUpPanels:
    """An expert's gate and up projections (gate, up [I, D]) packed so that SwiGLU happens in the
    same pass: `activation(x)` = silu(x @ gate.T) * (x @ up.T), [T, I]."""

    bias = None

    def __init__(self, gate: torch.Tensor, up: torch.Tensor):
        self.intermediate, self.in_features = gate.shape
        self.out_features = 2 * self.intermediate
        self.nbytes = 2 * gate.numel() * gate.element_size()  # checkpoint bytes, as Linear counts them
        self.weight = pack_gate_up_panels(gate, up)

    def dense_weight(self) -> torch.Tensor:
        return unpack_gate_up_panels(self.weight, self.intermediate)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops().panel_linear(x, self.weight, self.intermediate, True)

