"""When to rebalance on its own: a pure function of the imbalance samples the controller takes
(max / mean shard load, see placement_planner.imbalance), so the rule is testable without a
cluster or a clock."""

from pydantic import BaseModel, ConfigDict, Field


class AutoRebalance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="Rebalance without being asked when the imbalance stays high.")
    threshold: float = Field(1.5, gt=1.0, description="Imbalance (max / mean shard load) that counts as high.")
    window_s: float = Field(30.0, gt=0, description="How long the imbalance must stay above the threshold.")
    interval_s: float = Field(5.0, gt=0, description="How often the controller samples the load.")
    cooldown_s: float = Field(60.0, ge=0, description="Least time between two automatic rebalances.")


def rebalance_due(samples: list[tuple[float, float]], now: float, policy: AutoRebalance,
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
