"""The serving benchmark's metrics, as vLLM's `benchmark_serving` defines them, from what the
client saw of each request (pure functions).

  TTFT   time from sending the request to the first streamed chunk with a choice
  ITL    each gap between two consecutive such chunks (every gap of every request is one sample;
         a chunk carrying several tokens counts as one gap, as in vLLM's client)
  TPOT   per request, (end-to-end latency - TTFT) / (output tokens - 1): the mean gap per token
  E2E    time from sending the request to its last chunk with a choice
  goodput  completed requests per second that met every SLO: TTFT <= its limit and TPOT (the
         per-request mean inter-token latency, vLLM's `--goodput tpot:`) <= the ITL limit; a
         one-token request has no gap and meets the ITL limit
  output tokens/s and requests/s count completed requests over the load's whole duration (first
  send to last completion).
A unary request (its output whole in one response) has no first chunk and no gaps: it counts in
the throughput and E2E only, never in TTFT, ITL or goodput (whose SLO is on TTFT and ITL).
"""

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    ttft_s: float = 0.0
    chunk_gaps_s: tuple[float, ...] = ()
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str | None = None
    streamed: bool = True

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass
class StreamClock:
    """Times one streamed request as the client sees it: started when made, `chunk()` at each
    streamed chunk with output (the first gives TTFT, each later one a gap), `record()` at the end."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def record(self, output_tokens: int) -> RequestRecord:
        return RequestRecord(ok=True, ttft_s=self.first - self.start, chunk_gaps_s=tuple(self.gaps),
                             e2e_s=self.last - self.start, output_tokens=output_tokens)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (numpy's linear interpolation, as vLLM), None for no samples."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_s: float, slo_itl_s: float) -> dict:
    """One load's metrics; latencies in seconds."""
    done = [r for r in records if r.ok]
    streamed = [r for r in done if r.streamed]
    good = [r for r in streamed if r.ttft_s <= slo_ttft_s and r.tpot_s <= slo_itl_s]
    errors = [r.error for r in records if not r.ok]
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "duration_s": duration_s,
        "output_tokens": sum(r.output_tokens for r in done),
        "output_tokens_per_s": sum(r.output_tokens for r in done) / duration_s,
        # > 1 where the server writes several tokens in one chunk (each such chunk is one ITL gap)
        "tokens_per_chunk": (sum(r.output_tokens for r in streamed) / sum(len(r.chunk_gaps_s) + 1 for r in streamed)
                             if streamed else None),
        "requests_per_s": len(done) / duration_s,
        "goodput_per_s": len(good) / duration_s if streamed else None,
        "ttft_s": percentiles([r.ttft_s for r in streamed]),
        "itl_s": percentiles([gap for r in streamed for gap in r.chunk_gaps_s]),
        "tpot_s": percentiles([r.tpot_s for r in streamed if r.output_tokens > 1]),
        "e2e_s": percentiles([r.e2e_s for r in done]),
    }


def median_over_rounds(summaries: list[dict]) -> dict:
    """One load's metrics over several rounds: each number (each percentile) the median of its own
    (the higher middle one for an even count); errors and requests summed, memory the highest."""
    def middle(values: list) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median_high(present) if present else None

    merged = {}
    for key, first in summaries[0].items():
        if isinstance(first, dict):
            merged[key] = {p: middle([s[key][p] for s in summaries]) for p in first}
        elif first is None or isinstance(first, (int, float)):
            merged[key] = middle([s[key] for s in summaries])
    merged.update(rounds=len(summaries), errors_total=sum(s["errors"] for s in summaries),
                  requests_total=sum(s["requests"] for s in summaries),
                  first_errors=sorted({e for s in summaries for e in s["first_errors"]})[:3])
    for key in ("peak_rss_mib", "pss_mib"):
        if key in summaries[0]:
            merged[key] = max(s[key] for s in summaries)
    return merged
