"""The load ahead, as a factor on the load now: a unit asked for now joins after its start time, so the
policy sizes each pool for the load predicted that far ahead. Pure; the predictor's memory is a plain
TrendState the policy keeps in its own state.

  constant: the load ahead is the load now (factor 1).
  ewma_trend: Holt's linear trend on the request rate (level and per-second trend, smoothed exponentially
    over irregular intervals), projected `horizon_s` ahead; factor = projected rate / rate now.
  predicted_expert_load: the replicas as ewma_trend; the shards by the predicted expert load of the
    requests queued and arriving against the load observed (both over a window of the same length)."""

from dataclasses import dataclass

import numpy as np

from moefleet.autoscaler.policy_file import ConstantPredictor, EwmaTrendPredictor
from moefleet.autoscaler.signals import AutoscalingContext

# A factor is clipped to this range: one odd sample must not ask for ten times the units.
MIN_FACTOR, MAX_FACTOR = 0.0, 4.0


@dataclass(frozen=True)
class TrendState:
    """Holt's level (requests/s) and trend (requests/s per second) as of `at_s`; level None: no sample yet."""

    level: float | None = None
    trend: float = 0.0
    at_s: float | None = None

    def to_dict(self) -> dict:
        return {"level": self.level, "trend": self.trend, "at_s": self.at_s}

    @classmethod
    def from_dict(cls, data: dict) -> "TrendState":
        return cls(level=data["level"], trend=data["trend"], at_s=data["at_s"])


def update_trend(state: TrendState, value: float, now_s: float, alpha: float, beta: float) -> TrendState:
    """Holt's update with the sample `value` taken at `now_s`; the trend is per second, so samples need not be
    evenly spaced."""
    if state.level is None or state.at_s is None:
        return TrendState(level=value, trend=0.0, at_s=now_s)
    elapsed = now_s - state.at_s
    if elapsed <= 0:
        return state
    level = alpha * value + (1 - alpha) * (state.level + state.trend * elapsed)
    trend = beta * (level - state.level) / elapsed + (1 - beta) * state.trend
    return TrendState(level=level, trend=trend, at_s=now_s)


def forecast(state: TrendState, horizon_s: float) -> float | None:
    """The rate `horizon_s` after the last sample (never below 0); None before the first sample."""
    if state.level is None:
        return None
    return max(0.0, state.level + state.trend * horizon_s)


def rate_factor(state: TrendState, rate_now: float, horizon_s: float) -> float:
    """Projected rate / rate now, clipped; 1 while either is unknown or nothing arrives now."""
    projected = forecast(state, horizon_s)
    if projected is None or rate_now <= 0:
        return 1.0
    return min(MAX_FACTOR, max(MIN_FACTOR, projected / rate_now))


def expert_load_factor(observed_total: float | None, predicted_total: float | None) -> float:
    """Predicted / observed expert load, clipped; 1 when either is missing or nothing was observed."""
    if observed_total is None or predicted_total is None or observed_total <= 0:
        return 1.0
    return min(MAX_FACTOR, max(MIN_FACTOR, predicted_total / observed_total))


def arriving_expert_load(observed: np.ndarray | None, seen: np.ndarray, seen_span_s: float, coming: np.ndarray,
                         coming_span_s: float) -> np.ndarray | None:
    """float64[L, E]: the load window as the requests now arriving will make it. `observed` is the
    window's load; `coming` the affinity model's predicted load of the prompts admitted over the
    last `coming_span_s` seconds, `seen` that of the prompts admitted over the `seen_span_s` before.
    The result is shaped like `coming` (which experts the arrivals need) and as large as `observed`
    times the arrivals' predicted rate over the earlier rate (how much more, or less, is coming).
    None when there is nothing to compare: no observed load, no arrival, or no earlier arrivals."""
    if (observed is None or observed.sum() <= 0 or coming.sum() <= 0 or seen.sum() <= 0 or seen_span_s <= 0
            or coming_span_s <= 0):
        return None
    rate_ratio = (coming.sum() / coming_span_s) / (seen.sum() / seen_span_s)
    return coming / coming.sum() * observed.sum() * rate_ratio


def observe(settings: ConstantPredictor | EwmaTrendPredictor, state: TrendState,
            ctx: AutoscalingContext) -> TrendState:
    """The predictor's memory after this round's request rate (the constant predictor keeps none)."""
    if settings.kind == "constant":
        return state
    return update_trend(state, ctx.request_rate, ctx.now_s, settings.alpha, settings.beta)


def load_factor(settings: ConstantPredictor | EwmaTrendPredictor, state: TrendState, ctx: AutoscalingContext,
                pool: str) -> float:
    """How much the load on `pool` will have grown (or shrunk) by the time a unit asked for now joins:
    `horizon_s` ahead, or by default the pool's next start time."""
    if settings.kind == "constant":
        return 1.0
    if pool == "expert_shards" and settings.kind == "predicted_expert_load" and ctx.predicted_expert_load is not None:
        observed = None if ctx.expert_load is None else float(ctx.expert_load.sum())
        return expert_load_factor(observed, float(ctx.predicted_expert_load.sum()))
    horizon_s = settings.horizon_s if settings.horizon_s is not None else ctx.pool(pool).next_start_s
    return rate_factor(state, ctx.request_rate, horizon_s)
