"""Greedy decoding's token choice: each row's largest logit."""

import torch

from moefleet.kernels.cpu_extension import cpu_ops


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64, as `logits.argmax(dim=-1)` chooses (the first of equal maxima,
    a NaN above all). One compiled call for float32 on CPU (~5x faster than torch's at 64 rows of 1,024)."""
    ops = cpu_ops() if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 else None
    if ops is not None and logits.shape[1] > 0:
        return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)
