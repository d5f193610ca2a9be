"""RMSNorm, computed in float32 like the reference implementations."""

import torch

from moefleet.kernels.cpu_extension import cpu_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] -> [..., D] (same dtype as x). One compiled call on CPU."""
    ops = cpu_ops() if x.device.type == "cpu" and x.dtype == weight.dtype else None
    if ops is not None:
        return ops.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
