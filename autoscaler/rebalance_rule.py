"""When to rebalance on its own: a pure function of the imbalance samples the controller takes
(max / mean shard load, see placement/planner.imbalance), so the rule is testable without a
cluster or a clock. It reads its settings through the small protocol below (an AutoRebalance
from rebalance_config.py fits it), so the rule itself imports only the standard library."""

from typing import Protocol


class RebalanceSettings(Protocol):
    enabled: bool
    threshold: float
    window_s: float
    cooldown_s: float


def rebalance_due(samples: list[tuple[float, float]], now: float, policy: RebalanceSettings,
                  last_change_at: float | None) -> bool:
    """samples: (time, imbalance), oldest first. Due when the samples cover the whole window,
    every one inside it is above the threshold, and the cooldown since the last change is over
    (load observed under the old placement says nothing about the new one)."""
    if not policy.enabled or not samples:
        return False
    if last_change_at is not None and now - last_change_at < policy.cooldown_s:
        return False
    start = now - policy.window_s
    watched = [(t, value) for t, value in samples if last_change_at is None or t > last_change_at]
    if not watched or watched[0][0] > start:  # not watched for a whole window (since the last change) yet
        return False
    recent = [value for t, value in watched if t >= start]
    return bool(recent) and all(value > policy.threshold for value in recent)
