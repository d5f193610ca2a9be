"""What the affinity planner needs to know about routing, counted once from routing paths (pure:
numpy and the standard library).

Shapes: P token occurrences, L MoE layers, K experts chosen per token and layer, E experts per
layer, D the rank of the co-use sketch (at most `CO_USE_RANK`, and at most L * E).

Four tables, each bounded by the model's shape, never by the trace's length:
- load: float64[L, E], activations per expert;
- coactivation: float64[L, E, E], token-layer events that chose both experts (symmetric, zero
  diagonal): what groups experts onto a shard;
- co_use_factors: float64[L, E, D], a low-rank sketch of how the same requests use experts across
  all layers: what groups experts onto a node;
- sample: int32[N, L, K], the chosen experts of N token occurrences drawn at random (seeded) from
  the trace, at most SAMPLE_ENTRIES entries (every occurrence of a short trace): on it the planner
  counts the sends a layout costs exactly, token by token (sampled_sends.py), which no table of
  pairs can (three experts on one shard save two sends, not three).

Why a sketch for the node grouping. The exact table would be the request co-use matrix
U = S^T S over the L*E (layer, expert) items, where S[r, i] counts request r's activations of
item i with each row scaled by 1 / sqrt(its activations); for 58 layers x 256 experts that is
14848^2 entries (1.8 GB), and keeping the request profiles S instead grows with the trace. The
planner only needs U's dominant structure (requests that share a "topic" use the same experts in
every layer), so this keeps a rank-D factor F with U ~ F F^T, learned in one streaming pass over
the requests: a Nystrom sketch of the positive semidefinite U (Tropp, Yurtsever, Udell and Cevher,
"Fixed-rank approximation of a positive-semidefinite matrix from streaming data", 2017). With
that scaling, ||sum of F over the items a node holds||^2 ~ sum over requests of
(activations the node holds)^2 / (the request's activations): large exactly when each request
finds most of its experts on one node, which is what the gateway exploits. When L * E <= D the
sketch is exact (up to the shift that keeps it stable)."""

from dataclasses import dataclass

import numpy as np

# Rank of the co-use sketch: room for a few dozen request "topics" beyond the overall popularity.
CO_USE_RANK = 48
# Dense request x item counts built per chunk of requests, at most this many entries (32 MB).
_CHUNK_ENTRIES = 1 << 22
# Entries (tokens x layers x top-k) of the token sample, at most: 8 MB; 4,369 tokens of a 60-layer top-8
# model, where each of 256 experts is still chosen by about 136 sampled tokens per layer.
SAMPLE_ENTRIES = 1 << 21


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Observed (or predicted) routing, reduced to what placement needs.

    load: float64[L, E] activations per expert per MoE layer.
    coactivation: float64[L, E, E] token-layer events that chose both experts (symmetric, zero
        diagonal).
    co_use_factors: float64[L, E, D] the request co-use sketch: for items i = (l, e), j = (l', e'),
        factors[i] . factors[j] ~ sum over requests r of S[r, i] S[r, j] / (activations of r).
    sample: int32[N, L, K] sampled token occurrences' chosen experts (-1 = none).
    tokens_per_sample: the token occurrences of the routing each sampled one stands for (>= 1)."""

    load: np.ndarray
    coactivation: np.ndarray
    co_use_factors: np.ndarray
    sample: np.ndarray
    tokens_per_sample: float

    def __post_init__(self) -> None:
        if self.load.ndim != 2 or not np.all(np.isfinite(self.load)) or np.any(self.load < 0):
            raise ValueError(f"load must be a finite, non-negative float64[L, E], got shape {self.load.shape}")
        layers, experts = self.load.shape
        if self.coactivation.shape != (layers, experts, experts):
            raise ValueError(f"coactivation must have shape {(layers, experts, experts)} (load is {self.load.shape}), "
                             f"got {self.coactivation.shape}")
        if not np.allclose(self.coactivation, self.coactivation.transpose(0, 2, 1)):
            raise ValueError("coactivation must be symmetric in its last two axes")
        if self.co_use_factors.ndim != 3 or self.co_use_factors.shape[:2] != (layers, experts):
            raise ValueError(f"co_use_factors must have shape ({layers}, {experts}, D), "
                             f"got {self.co_use_factors.shape}")
        if self.sample.ndim != 3 or self.sample.shape[1] != layers or not np.issubdtype(self.sample.dtype, np.integer):
            raise ValueError(f"sample must be an integer array [N, {layers}, K], got {self.sample.dtype} "
                             f"{self.sample.shape}")
        if self.sample.size and (self.sample.min() < -1 or self.sample.max() >= experts):
            raise ValueError(f"sample holds ids outside -1..{experts - 1}")
        if not self.tokens_per_sample >= 1:
            raise ValueError(f"tokens_per_sample must be >= 1, got {self.tokens_per_sample}")

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @classmethod
    def from_paths(cls, seq: np.ndarray, experts: np.ndarray, num_experts: int) -> "RoutingStats":
        """seq: int64[P] sequence (request) index per token occurrence; experts: int64[P, L, K]
        (-1 = none). Any integer dtypes; the arrays are read, never copied whole."""
        seq, experts = np.asarray(seq), np.asarray(experts)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(f"experts must be an integer array [P, L, K], got {experts.dtype} {experts.shape}")
        if seq.shape != experts.shape[:1] or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"seq must be an integer array [P] with P = {experts.shape[0]}, "
                             f"got {seq.dtype} {seq.shape}")
        if experts.size and (experts.min() < -1 or experts.max() >= num_experts):
            raise ValueError(f"experts holds ids outside -1..{num_experts - 1}: {experts.min()}..{experts.max()}")
        layers = range(experts.shape[1])
        load = np.array([_counts(experts[:, layer, :], num_experts) for layer in layers]).reshape(-1, num_experts)
        coactivation = np.array([_pair_counts(experts[:, layer, :], num_experts) for layer in layers]) \
            .reshape(-1, num_experts, num_experts)
        factors = _co_use_factors(seq, experts, num_experts)
        kept = _sampled(len(seq), experts.shape[1] * experts.shape[2])
        return cls(load=load, coactivation=coactivation, co_use_factors=factors,
                   sample=experts[kept].astype(np.int32), tokens_per_sample=max(1.0, len(seq) / max(1, len(kept))))


def _sampled(num_tokens: int, entries_per_token: int) -> np.ndarray:
    """int64[N]: ascending indices of the token occurrences kept, at most SAMPLE_ENTRIES entries'
    worth, drawn at random (seeded: deterministic); not every n-th, which could keep only one
    position of requests of equal length."""
    room = max(1, SAMPLE_ENTRIES // max(1, entries_per_token))
    if num_tokens <= room:
        return np.arange(num_tokens)
    return np.sort(np.random.default_rng(0).choice(num_tokens, room, replace=False))


def _counts(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """chosen: int[P, K] -> float64[E] activations per expert."""
    flat = chosen.ravel()
    return np.bincount(flat[flat >= 0], minlength=num_experts).astype(np.float64)


def _pair_counts(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """chosen: int[P, K] -> float64[E, E] rows that chose both experts, symmetric, zero diagonal
    (an expert chosen twice by one row, which no router does, is not a pair). "None" (-1) is
    counted as an extra expert E and cut off at the end: cheaper than masking every pair."""
    width = num_experts + 1
    code_type = np.int32 if width * width < 2 ** 31 else np.int64
    ids = np.where(chosen < 0, num_experts, chosen).astype(code_type)
    first, second = np.triu_indices(chosen.shape[1], 1)
    codes = ids[:, first] * width + ids[:, second]
    pairs = np.bincount(codes.ravel(), minlength=width * width).reshape(width, width)[:num_experts, :num_experts]
    pairs = (pairs + pairs.T).astype(np.float64)
    np.fill_diagonal(pairs, 0.0)
    return pairs


def _co_use_factors(seq: np.ndarray, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float64[L, E, D]: the Nystrom sketch of U = S^T S (see the module docstring), from one
    pass over the requests in chunks; the random test matrix is seeded, so the sketch is
    deterministic."""
    num_tokens, layers, _ = experts.shape
    items = layers * num_experts
    rank = min(CO_USE_RANK, items)
    if items == 0 or num_tokens == 0:
        return np.zeros((layers, num_experts, rank))
    test = np.random.default_rng(0).standard_normal((items, rank))
    _, request = np.unique(seq, return_inverse=True)
    request = request.ravel()
    order = np.argsort(request, kind="stable")
    sorted_already = bool(np.all(order == np.arange(num_tokens)))
    starts = np.searchsorted(request[order], np.arange(request.max() + 2))  # token range of each request
    per_chunk = max(1, _CHUNK_ENTRIES // items)
    offsets = (np.arange(layers, dtype=np.int64) * num_experts)[None, :, None]
    sketch = np.zeros((items, rank))
    for first in range(0, len(starts) - 1, per_chunk):
        last = min(first + per_chunk, len(starts) - 1)
        span = slice(starts[first], starts[last])
        rows = order[span]
        chosen = experts[span] if sorted_already else experts[rows]
        codes = (request[rows] - first).astype(np.int64)[:, None, None] * items + offsets + chosen
        counts = np.bincount(codes[chosen >= 0], minlength=(last - first) * items).reshape(last - first, items)
        profiles = counts / np.sqrt(np.maximum(counts.sum(axis=1, keepdims=True), 1))
        sketch += profiles.T @ (profiles @ test)
    return _nystrom_factors(sketch, test).reshape(layers, num_experts, rank)


def _nystrom_factors(sketch: np.ndarray, test: np.ndarray) -> np.ndarray:
    """sketch: float64[N, D] = U @ test for a PSD U: float64[N, N]; test: float64[N, D].
    Returns F: float64[N, D] with U ~ F F^T: the Nystrom approximation
    U test (test^T U test)^+ test^T U, shifted slightly for stability, with the pseudo-inverse
    taken over the core's eigenvalues that are not rounding noise (U is often far from full
    rank: a few topics)."""
    scale = np.linalg.norm(sketch)
    factors = np.zeros_like(sketch)
    if scale == 0:
        return factors
    shift = np.sqrt(sketch.shape[0]) * np.finfo(np.float64).eps * scale
    shifted = sketch + shift * test
    core = test.T @ shifted
    values, vectors = np.linalg.eigh((core + core.T) / 2)
    keep = values > 1e-12 * values.max()
    spread = (shifted @ vectors[:, keep]) / np.sqrt(values[keep])  # U ~ spread spread^T
    # Its singular vectors from the small Gram matrix (an SVD of the tall matrix is slower).
    squares, right = np.linalg.eigh(spread.T @ spread)
    left = (spread @ right) / np.sqrt(np.maximum(squares, 1e-300))
    factors[:, :keep.sum()] = left * np.sqrt(np.maximum(squares - shift, 0.0))
    return factors
