"""When to rebalance ahead of the load (issue 26, part 5): the controller's proactive rule. Pure:
numpy, the standard library and the placement types; time arrives as an argument.

The reactive rule (rebalance_rule.py) waits until the observed imbalance has stayed high for a
whole window, and then plans toward that window's load, which by then is partly stale: after a
workload shift it acts a window late. This rule also looks at the requests that have not run
yet. The controller predicts each request's expert load from its prompt tokens when it arrives
(AffinityModel.expected_load) and hands in two sums of those predictions: over the queued and
newly arrived requests (what comes), and over the requests that ran in the observed window (what
was seen, as the same model saw it). Their difference is the change the model expects; added to
the observed load it makes the forecast, and the rule says to rebalance as soon as the forecast,
laid on the current placement, is above the threshold while the predicted change is what puts it
there (the forecast's imbalance at least `min_lead` above the observed one): experts are moved or
copied before they turn hot, and toward the load that comes rather than the one that passed.
Where the prediction adds nothing (an imbalance already observed that the coming requests merely
keep), the reactive rule stays the judge: this rule runs beside it, not instead of it, so a load
that drifts without a predicted cause is not chased round after round.

A proactive change is a bet on the forecast, and the forecast is only as good as the model. So
each one is watched for `check_s` after it (proactive_change_missed): the first imbalance sample
above the threshold in that time says the bet missed, and the controller plans again toward the
load it observed, without waiting out the reactive rule's window and cooldown (the reactive rule
needs the imbalance above the threshold for a whole window, so a placement that misses by a
little, above the bar now and then, would stay for minutes). At most one such correction follows
each proactive change, so a noisy forecast costs a bounded number of moves.

Per MoE layer, with shares of the layer's activations:

    forecast = max(0, observed share + w x (coming share - seen share)), renormalised
    w        = min(1, coming tokens / full_weight_tokens)

scaled to the observed window's activations. Why a difference: the model's predictions are
smoother than the routing (a token's counts are shrunk toward the layer's prior, and a token routes
differently in another context), so its predicted load alone understates how hot an expert gets;
the same bias is in both of its sums and cancels in their difference, while the observed load
keeps the real peaks. A handful of requests says little about the next minute: the change weighs
in proportion to the coming tokens, fully from `full_weight_tokens` on. Planning toward the
forecast (placement/planner.plan_placement) is what moves or replicates the experts.
"""

from dataclasses import dataclass

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.planner import imbalance


@dataclass(frozen=True)
class ProactiveSettings:
    """threshold: forecast imbalance (max / mean shard load, worst layer) above which to rebalance.
    min_lead: how far the forecast's imbalance must be above the observed one (the prediction's
    part). full_weight_tokens: prompt tokens of coming requests from which the predicted change
    counts in full (fewer count proportionally less). cooldown_s: least time between two changes.
    check_s: how long a proactive change is watched against the observed load."""

    threshold: float = 1.2
    min_lead: float = 0.03
    full_weight_tokens: float = 2048.0
    cooldown_s: float = 10.0
    check_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.threshold > 1:
            raise ValueError(f"threshold must be > 1 (max / mean shard load), got {self.threshold}")
        if not self.min_lead >= 0:
            raise ValueError(f"min_lead must be >= 0, got {self.min_lead}")
        if not self.full_weight_tokens > 0:
            raise ValueError(f"full_weight_tokens must be > 0, got {self.full_weight_tokens}")
        if not self.cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if not self.check_s > 0:
            raise ValueError(f"check_s must be > 0, got {self.check_s}")


@dataclass(frozen=True, eq=False)
class ProactiveDecision:
    """due: rebalance now, toward `forecast` (float64[L, E], activations per expert per MoE layer);
    forecast_imbalance and observed_imbalance: of the current placement under each load; reason:
    why (or why not), in words for the controller's log."""

    due: bool
    forecast: np.ndarray
    forecast_imbalance: float
    observed_imbalance: float
    reason: str


def forecast_load(observed: np.ndarray, seen: np.ndarray, coming: np.ndarray, coming_tokens: float,
                  settings: ProactiveSettings) -> np.ndarray:
    """float64[L, E]: the forecast of the module docstring. observed: activations per expert over the
    observed window; seen: the predicted activations of the requests that ran in it; coming: those
    of the queued and newly arrived requests, from their `coming_tokens` prompt tokens (all
    float64[L, E]). A layer with nothing observed takes the coming share alone."""
    observed, seen, coming = _load("observed", observed), _load("seen", seen), _load("coming", coming)
    for name, other in (("seen", seen), ("coming", coming)):
        if other.shape != observed.shape:
            raise ValueError(f"{name} has shape {other.shape}, observed {observed.shape}: all are [L, E]")
    if not coming_tokens >= 0:
        raise ValueError(f"coming_tokens must be >= 0, got {coming_tokens}")
    weight = min(1.0, coming_tokens / settings.full_weight_tokens)
    change = _shares(coming) - _shares(seen)
    change[coming.sum(axis=1) == 0] = 0.0  # nothing coming: no change predicted
    total = observed.sum(axis=1, keepdims=True)
    forecast = np.where(total > 0, np.maximum(_shares(observed) + weight * change, 0.0), _shares(coming))
    return _shares(forecast) * np.where(total > 0, total, coming.sum(axis=1, keepdims=True))


def proactive_rebalance(observed: np.ndarray, seen: np.ndarray, coming: np.ndarray, coming_tokens: float,
                        placement: Placement, moe_layers: list[int], now: float, last_change_at: float | None,
                        settings: ProactiveSettings) -> ProactiveDecision:
    """Whether to rebalance at time `now`, and toward which load (module docstring; the loads as in
    forecast_load, row i for MoE layer moe_layers[i] of `placement`). Not due during the cooldown
    after the last change, nor while the forecast is within the threshold, nor while its imbalance
    is less than min_lead above the observed one."""
    forecast = forecast_load(observed, seen, coming, coming_tokens, settings)
    if len(moe_layers) != forecast.shape[0]:
        raise ValueError(f"moe_layers names {len(moe_layers)} layers, the loads have {forecast.shape[0]} rows")
    if forecast.shape[1] != placement.num_experts:
        raise ValueError(f"the loads have {forecast.shape[1]} experts per layer, the placement {placement.num_experts}")
    ahead = imbalance(forecast, placement, moe_layers)
    now_seen = imbalance(np.asarray(observed, dtype=np.float64), placement, moe_layers)
    if last_change_at is not None and now - last_change_at < settings.cooldown_s:
        return ProactiveDecision(False, forecast, ahead, now_seen,
                                 f"cooling down until {last_change_at + settings.cooldown_s}")
    if ahead <= settings.threshold:
        return ProactiveDecision(False, forecast, ahead, now_seen,
                                 f"forecast imbalance {ahead:.3f} within {settings.threshold}")
    if ahead - now_seen < settings.min_lead:
        return ProactiveDecision(False, forecast, ahead, now_seen,
                                 f"forecast imbalance {ahead:.3f} not {settings.min_lead} above the observed "
                                 f"{now_seen:.3f}: nothing predicted beyond what is seen (the reactive rule's case)")
    return ProactiveDecision(True, forecast, ahead, now_seen,
                             f"forecast imbalance {ahead:.3f} above {settings.threshold} and the observed "
                             f"{now_seen:.3f}")


def proactive_change_missed(samples: list[tuple[float, float]], now: float, changed_at: float,
                            settings: ProactiveSettings) -> bool | None:
    """The watch over a proactive change made at `changed_at` (module docstring). samples: (time,
    imbalance of the observed load on the placement in force), oldest first. True as soon as a
    sample taken in the settings.check_s after the change is above settings.threshold (the bet
    missed: plan toward the observed load); False once check_s has passed without one (the bet
    held: the reactive rule watches from there on); None while the watch goes on."""
    watched = [value for t, value in samples if changed_at < t <= min(now, changed_at + settings.check_s)]
    if any(value > settings.threshold for value in watched):
        return True
    return None if now - changed_at < settings.check_s else False


def _shares(load: np.ndarray) -> np.ndarray:
    """float64[L, E]: each layer's row over its sum (zeros where the sum is zero)."""
    total = load.sum(axis=1, keepdims=True)
    return load / np.where(total > 0, total, 1.0)


def _load(name: str, value: np.ndarray) -> np.ndarray:
    load = np.asarray(value, dtype=np.float64)
    if load.ndim != 2 or not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ValueError(f"{name} must be a finite, non-negative float64[L, E], got shape {load.shape}")
    return load
