"""Rotary position embeddings: inverse-frequency tables (default, linear, YaRN, llama3) and
application in the two layouts models use (rotate-half "neox", and interleaved pairs).
"""

import math

import torch


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_inv_freq(dim: int, base: float, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): blend interpolated and extrapolated frequencies by a linear ramp
    over the dimensions, and scale cos/sin by an attention factor."""
    factor = params.get("factor")
    original_max = params.get("original_max_position_embeddings") or max_position
    if factor is None:
        factor = max_position / original_max

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def llama3_inv_freq(dim: int, base: float, params: dict) -> torch.Tensor:
    inv_freq = default_inv_freq(dim, base)
    factor, low_ff, high_ff = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(dim: int, base: float, rope_type: str, params: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [dim/2], attention_factor applied to cos and sin)."""
    if rope_type == "default":
        return default_inv_freq(dim, base), 1.0
    if rope_type == "linear":
        return default_inv_freq(dim, base) / params["factor"], 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(dim, base, params, max_position)
    if rope_type == "llama3":
        return llama3_inv_freq(dim, base, params), 1.0
    raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, yarn, llama3 are)")


class RotaryCache:
    """cos/sin per position, computed like the reference: float32 frequencies, cos/sin of the
    concatenated half tables, scaled by the attention factor."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float, max_position: int):
        self.inv_freq = inv_freq
        self.attention_factor = attention_factor
        self._build(max_position)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos() * self.attention_factor
        self.sin = emb.sin() * self.attention_factor
        # The tables rounded to a model dtype, made once: rounding the looked-up rows instead
        # gives the same values, at two conversions per step.
        self._rounded: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {torch.float32: (self.cos, self.sin)}

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, dim] (broadcast over heads) in `dtype`."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]))
        if dtype not in self._rounded:
            self._rounded[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self._rounded[dtype]
        # index_select: cos[positions] (advanced indexing) took ~11 us here, this ~7.
        return cos.index_select(0, positions).unsqueeze(1), sin.index_select(0, positions).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [T, H, d]; cos/sin: [T, 1, d]. Neox layout rotates halves; interleaved layout rotates
    (even, odd) pairs and returns them de-interleaved, as DeepSeek's reference does."""
    if interleaved:
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
