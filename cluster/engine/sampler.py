"""Turning next-token logits into tokens: repetition penalty, temperature, min-p, top-k, top-p,
then greedy argmax or a random draw. A request with a seed draws its k-th output token from a
generator seeded by (seed, k) alone: the same text whatever else is in the batch, and a request
resumed elsewhere after k tokens (re-prefilled, see Sequence) draws exactly what the original
would have drawn next. Logprobs come from the model's raw distribution."""

import torch

from moefleet.cluster.engine.sequence import Sequence
from moefleet.kernels.greedy import argmax_rows


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, per row: tokens already in the prompt or output get logit/p if positive, logit*p if negative."""
    for row, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        values = logits[row, seen]
        logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)


def filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [N, V] of non-greedy rows -> probabilities after temperature, min-p, top-k, top-p."""
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype).unsqueeze(1)
    probs = torch.softmax(logits / temps, dim=-1)
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=logits.dtype).unsqueeze(1)
    probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs]).unsqueeze(1)
    ranks = torch.arange(vocab).unsqueeze(0)
    sorted_probs = sorted_probs.masked_fill(ranks >= top_k, 0.0)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype).unsqueeze(1)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for draw number `position` of a request seeded with `seed`
    (splitmix64's finaliser: nearby seeds and positions give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _generator_for(seq: Sequence, default_generator: torch.Generator) -> torch.Generator:
    if seq.params.seed is None:
        return default_generator
    return torch.Generator().manual_seed(position_seed(seq.params.seed, len(seq.output_token_ids)))


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator) -> list[int]:
    """logits [N, V] float32, one row per sequence -> one token per sequence."""
    raw_logits = logits
    if any(s.params.repetition_penalty != 1.0 for s in seqs):
        logits = logits.clone()
        apply_repetition_penalty(logits, seqs)
    tokens = argmax_rows(logits).tolist()
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        probs = filtered_probs(logits[random_rows], [seqs[i] for i in random_rows])
        for j, row in enumerate(random_rows):
            generator = _generator_for(seqs[row], default_generator)
            tokens[row] = int(torch.multinomial(probs[j], 1, generator=generator))
    _record_logprobs(raw_logits, seqs, tokens)
    return tokens


def _record_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
    if not rows:
        return
    logprobs = torch.log_softmax(logits[rows], dim=-1)
    k = max(seqs[i].params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    for j, row in enumerate(rows):
        seq, token = seqs[row], tokens[row]
        entry = {token: float(logprobs[j, token])}
        wanted = seq.params.logprobs
        if wanted:
            entry.update(zip(top_ids[j, :wanted].tolist(), top_values[j, :wanted].tolist()))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += entry[token]
