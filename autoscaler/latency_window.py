"""Latency percentiles over a sliding window, from cumulative histogram counts (pure). Replicas
report their TTFT and inter-token-latency histograms as cumulative counts per bucket (the same
buckets as their /metrics); the autoscaler wants, say, the p95 over the last minute. Like
Prometheus' histogram_quantile over a rate: the window's counts are the newest snapshot minus the
one at the window's start, and the percentile is interpolated linearly inside its bucket."""

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    at_s: float
    counts: tuple[int, ...]  # cumulative observations per bucket, summed over the replicas


class LatencyWindow:
    """bounds: the buckets' upper bounds in seconds (counts has one more entry: above the last)."""

    def __init__(self, bounds: tuple[float, ...], keep_s: float):
        self.bounds, self.keep_s = bounds, keep_s
        self.snapshots: deque[Snapshot] = deque()

    def add(self, at_s: float, counts: tuple[int, ...]) -> None:
        """A snapshot at `at_s`. Totals that went down (a replica left, taking its counts) restart
        the window: a difference across that would be wrong."""
        if len(counts) != len(self.bounds) + 1:
            raise ValueError(f"counts: expected {len(self.bounds) + 1} buckets, got {len(counts)}")
        if self.snapshots and any(new < old for new, old in zip(counts, self.snapshots[-1].counts)):
            self.snapshots.clear()
        self.snapshots.append(Snapshot(at_s, tuple(counts)))
        while len(self.snapshots) > 2 and self.snapshots[1].at_s <= at_s - self.keep_s:
            self.snapshots.popleft()

    def quantile(self, q: float, window_s: float, now_s: float) -> float | None:
        """The q-quantile (0 < q < 1) in seconds of what was observed in the `window_s` before
        `now_s`; None when nothing was. Above the last bound it answers the last bound."""
        if not 0 < q < 1:
            raise ValueError(f"q must lie in (0, 1), got {q}")
        if len(self.snapshots) < 2:
            return None
        start = next((s for s in reversed(self.snapshots) if s.at_s <= now_s - window_s), self.snapshots[0])
        return histogram_quantile(q, self.bounds, [new - old for new, old in zip(self.snapshots[-1].counts,
                                                                                 start.counts)])


def histogram_quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """The q-quantile of observations counted per bucket (`counts`: one per bound, then one above the last),
    interpolated linearly inside its bucket; above the last bound it answers the last bound; None when
    nothing was counted."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]
