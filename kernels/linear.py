"""Linear layers with weights stored in the layout the CPU multiplies fastest.

- float32 and bfloat16 on CPU with the compiled kernels: column panels (kernels/panel_linear.py),
  streamed once per multiply whatever the batch; in float32 1.7-2.9x faster than oneDNN at one
  row and at parity from ~64 rows here (2-core EPYC; docs/benchmarks.md). bfloat16 panels hold k
  in pairs where the CPU has AVX512-BF16 (an odd input width cannot use them).
- bf16 with an odd input width on a CPU with AVX512-BF16: oneDNN-prepacked where oneDNN has a
  bf16 path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT), else F.linear. Decode batches are small (a few
  rows per expert), where MKL's GEMM reads weights at 8-17 GB/s here and oneDNN with a prepacked
  weight at 26-30 GB/s (8 experts 768x3072, M=4: 9.1 ms per-expert F.linear, 4.5 ms one bmm,
  2.6 ms packed).
- elsewhere (GPU tensors, no oneDNN, float16): plain F.linear."""

import torch
import torch.nn.functional as F

from moefleet.kernels.cpu_extension import cpu_ops
from moefleet.kernels.panel_linear import pack_panels, panels_usable, unpack_panels

def _onednn_packable(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class Linear:
    """y = x @ weight.T (+ bias). weight: [N, K] in checkpoint layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.bias = bias
        if panels_usable(weight):
            self.layout, self.weight = "panels", pack_panels(weight)
        elif _onednn_packable(weight):
            self.layout, self.weight = "onednn", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        else:
            self.layout, self.weight = "plain", weight

    def dense_weight(self) -> torch.Tensor:
        """The weight in checkpoint layout [N, K] (unpacked), e.g. to hand an expert to a peer."""
        if self.layout == "panels":
            return unpack_panels(self.weight, self.out_features)
        return self.weight.to_dense() if self.layout == "onednn" else self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "plain":
            return F.linear(x, self.weight, self.bias)
        # 2-d inputs (every decode step's dozen linears) go straight to the op: the reshape,
        # empty check and view cost ~3 us a call, as much as a one-row projection's multiply.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.layout == "panels":  # the compiled op takes zero rows
            y = cpu_ops().panel_linear(rows, self.weight, self.out_features, False)
            if self.bias is not None:
                y.add_(self.bias)
        elif rows.shape[0] == 0:
            y = rows.new_empty(0, self.out_features)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.weight, self.bias, "none", [], "")
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
