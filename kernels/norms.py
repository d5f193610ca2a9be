"""RMSNorm, computed in float32 like the reference implementations, alone and fused with the
residual add before it."""

import torch

from moefleet.kernels.cpu_extension import cpu_ops


def _compiled(x: torch.Tensor, weight: torch.Tensor):
    return cpu_ops() if x.device.type == "cpu" and x.dtype == weight.dtype else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] -> [..., D] (same dtype as x). One compiled call on CPU."""
    ops = _compiled(x, weight)
    if ops is not None:
        return ops.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream at a layer boundary: h = residual + delta (rounded to the dtype, as
    the references add), and rms_norm(h). residual, delta: [..., D] -> (h, normed h). One
    compiled call on CPU where there were two."""
    ops = _compiled(residual, weight) if delta.dtype == residual.dtype else None
    if ops is not None:
        return ops.add_rms_norm(residual, delta, weight, eps)
    h = residual + delta
    return h, rms_norm_reference(h, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
