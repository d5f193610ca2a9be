"""Windowed latency percentiles from cumulative histogram counts, on hand-computed cases."""

import pytest

from moefleet.autoscaler.latency_window import LatencyWindow

BOUNDS = (0.1, 0.2, 0.5)  # buckets: <=0.1, (0.1, 0.2], (0.2, 0.5], above 0.5


def test_quantile_interpolates_inside_the_bucket_of_the_window_delta():
    window = LatencyWindow(BOUNDS, keep_s=60)
    window.add(0.0, (0, 0, 0, 0))
    window.add(10.0, (100, 0, 0, 0))  # before the window: 100 fast requests
    window.add(20.0, (110, 10, 0, 0))  # in the window: 10 at <=0.1 s, 10 in (0.1, 0.2]
    # p50 of those 20: rank 10, the last of the first bucket: 0.1 s. p75: rank 15, halfway into
    # the second bucket: 0.1 + 0.1 * 5 / 10 = 0.15 s.
    assert window.quantile(0.5, window_s=10, now_s=20) == pytest.approx(0.1)
    assert window.quantile(0.75, window_s=10, now_s=20) == pytest.approx(0.15)
    # Over the whole history the 100 fast ones dominate: p75 of 120 is rank 90 in the first bucket.
    assert window.quantile(0.75, window_s=30, now_s=20) == pytest.approx(0.1 * 90 / 110)


def test_above_the_last_bound_and_empty_windows():
    window = LatencyWindow(BOUNDS, keep_s=60)
    assert window.quantile(0.9, 10, 0) is None  # one snapshot or none: no window
    window.add(0.0, (0, 0, 0, 0))
    window.add(5.0, (0, 0, 0, 0))
    assert window.quantile(0.9, 10, 5) is None  # nothing observed
    window.add(6.0, (0, 0, 1, 3))
    assert window.quantile(0.99, 10, 6) == 0.5  # in the overflow bucket: the last bound


def test_a_replica_leaving_restarts_the_window_and_old_snapshots_go():
    window = LatencyWindow(BOUNDS, keep_s=10)
    window.add(0.0, (5, 5, 0, 0))
    window.add(1.0, (3, 2, 0, 0))  # totals went down: a replica's counts left with it
    assert len(window.snapshots) == 1
    for t in range(2, 30):
        window.add(float(t), (3 + t, 2, 0, 0))
    assert window.snapshots[0].at_s >= 29 - 10 - 1  # kept about keep_s, one snapshot older than it
    with pytest.raises(ValueError, match="expected 4 buckets"):
        window.add(31.0, (1, 2))
