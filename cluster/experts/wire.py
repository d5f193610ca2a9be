"""The shard wire format: what crosses a process boundary between a replica's dispatcher and a
remote expert shard. Activations travel as contiguous numpy buffers (a torch tensor costs 3-10x
a numpy array per Ray hop on CPU); 16-bit floats travel as their int16 bit patterns."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ShardRequest:
    """One shard's work for one MoE layer, as numpy buffers (see transport.ShardWork)."""

    layer: int
    rows: np.ndarray  # [R, D] activations (bfloat16/float16 travel as their raw 16-bit pattern)
    row_index: np.ndarray  # [N] int64
    experts: np.ndarray  # [N] int64
    weights: np.ndarray  # [N] float32
    dtype: str  # torch dtype name of rows
    epoch: int = 0  # placement epoch whose slots answer it


@dataclass(frozen=True)
class ShardReply:
    partial: np.ndarray | None  # [R, D] in the request's dtype; None when the shard failed
    compute_s: float
    error: str | None = None  # repr of the exception the shard raised (it stays up)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy where possible; 16-bit floats travel as int16 bit patterns (numpy has no bfloat16)."""
    t = t.contiguous()
    return t.view(torch.int16).numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(TORCH_DTYPES[dtype]) if dtype in ("bfloat16", "float16") else t


def control(actor, method: str):
    """`actor.method` as a control call (see remote_shard_class); use `.remote(...)` on it."""
    return getattr(actor, method).options(concurrency_group="control")
