"""The proactive rebalance rule: the forecast (observed load plus the predicted change) worked by
hand, when it is due (ahead of the observed load, never in the cooldown, never for what the
reactive rule already covers), and that planning toward its forecast copies the expert about to
turn hot."""

import numpy as np
import pytest

from moefleet.autoscaler.proactive_rebalance import (
    ProactiveSettings,
    forecast_load,
    proactive_change_missed,
    proactive_rebalance,
)
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.planner import PlacementLimits, imbalance, plan_placement

# One MoE layer, 4 experts; shard 0 holds experts 0 and 1, shard 1 holds 2 and 3.
PLACEMENT = Placement(epoch=3, num_experts=4, shard_experts={7: ((0, 1), (2, 3))})
SETTINGS = ProactiveSettings(threshold=1.2, min_lead=0.03, full_weight_tokens=2048.0, cooldown_s=10.0, check_s=30.0)
EVEN = np.array([[10.0, 10.0, 10.0, 10.0]])  # 40 activations, a quarter each
SEEN = np.array([[1.0, 1.0, 1.0, 1.0]])  # what ran, as predicted: a quarter each
COMING = np.array([[4.0, 2.0, 1.0, 1.0]])  # what comes, as predicted: shares 1/2, 1/4, 1/8, 1/8


def test_forecast_adds_the_predicted_change_to_the_observed_shares():
    # change = (1/2, 1/4, 1/8, 1/8) - (1/4, 1/4, 1/4, 1/4) = (1/4, 0, -1/8, -1/8); with 2048 coming
    # tokens it counts in full: 1/4 + change = (1/2, 1/4, 1/8, 1/8), times the 40 observed.
    assert forecast_load(EVEN, SEEN, COMING, 2048, SETTINGS).tolist() == [[20.0, 10.0, 5.0, 5.0]]
    # 1024 coming tokens count half: (3/8, 1/4, 3/16, 3/16) x 40.
    assert forecast_load(EVEN, SEEN, COMING, 1024, SETTINGS).tolist() == [[15.0, 10.0, 7.5, 7.5]]
    # The predictor's bias is in both of its sums and cancels: scaling `seen` or `coming` changes nothing.
    assert forecast_load(EVEN, 7 * SEEN, 3 * COMING, 4096, SETTINGS).tolist() == [[20.0, 10.0, 5.0, 5.0]]


def test_forecast_clips_at_zero_and_falls_back_on_either_side():
    # observed shares (3/4, 1/4, 0, 0), change (0, 0, 1/4, -1/4): (3/4, 1/4, 1/4, -1/4) -> clipped to
    # (3/4, 1/4, 1/4, 0), which sums to 5/4 -> (3/5, 1/5, 1/5, 0) x 40.
    observed = np.array([[30.0, 10.0, 0.0, 0.0]])
    coming = np.array([[1.0, 1.0, 2.0, 0.0]])
    np.testing.assert_allclose(forecast_load(observed, SEEN, coming, 2048, SETTINGS), [[24.0, 8.0, 8.0, 0.0]])
    # Nothing observed yet: the coming load as predicted; nothing coming: the observed load.
    assert forecast_load(np.zeros((1, 4)), SEEN, COMING, 2048, SETTINGS).tolist() == COMING.tolist()
    assert forecast_load(EVEN, SEEN, np.zeros((1, 4)), 0, SETTINGS).tolist() == EVEN.tolist()


def test_due_when_the_predicted_change_will_overload_a_shard():
    # The observed load is even (shards 20 and 20: imbalance 1). The forecast (20, 10, 5, 5) puts 30
    # on shard 0 and 10 on shard 1: 30 / 20 = 1.5, above 1.2 and 0.5 above the observed.
    decision = proactive_rebalance(EVEN, SEEN, COMING, 2048, PLACEMENT, [7], now=100.0, last_change_at=None,
                                   settings=SETTINGS)
    assert decision.due
    assert decision.forecast.tolist() == [[20.0, 10.0, 5.0, 5.0]]
    assert decision.forecast_imbalance == pytest.approx(1.5) and decision.observed_imbalance == pytest.approx(1.0)
    assert "above 1.2" in decision.reason
    # A change 95 s ago with a 10 s cooldown: wait until 105.
    cooling = proactive_rebalance(EVEN, SEEN, COMING, 2048, PLACEMENT, [7], now=100.0, last_change_at=95.0,
                                  settings=SETTINGS)
    assert not cooling.due and "cooling down until 105" in cooling.reason
    assert proactive_rebalance(EVEN, SEEN, COMING, 2048, PLACEMENT, [7], now=105.0, last_change_at=95.0,
                               settings=SETTINGS).due


def test_not_due_within_the_threshold_or_without_a_lead():
    # 256 coming tokens weigh 1/8: forecast shares 1/4 + (1/32, 0, -1/64, -1/64) -> shard 0 holds
    # 17/32 of the load: imbalance 17/16 = 1.0625, within 1.2.
    small = proactive_rebalance(EVEN, SEEN, COMING, 256, PLACEMENT, [7], 100.0, None, SETTINGS)
    assert not small.due and small.forecast_imbalance == pytest.approx(17 / 16) and "within 1.2" in small.reason
    # Already imbalanced (shards 30 and 10: 1.5) and the coming requests look like those that ran:
    # the forecast is the observed load, nothing predicted beyond it. That is the reactive rule's
    # case (it waits for the imbalance to last), not this one's.
    skewed = np.array([[20.0, 10.0, 5.0, 5.0]])
    kept = proactive_rebalance(skewed, SEEN, SEEN, 2048, PLACEMENT, [7], 100.0, None, SETTINGS)
    assert not kept.due and kept.forecast_imbalance == pytest.approx(1.5) and "reactive" in kept.reason


def test_planning_toward_the_forecast_copies_the_expert_before_it_turns_hot():
    # Three slots per shard: the planner gives expert 0 (half the forecast load) a copy on the other
    # shard, after which the forecast sits within the threshold and the rule is no longer due.
    decision = proactive_rebalance(EVEN, SEEN, COMING, 2048, PLACEMENT, [7], 100.0, None, SETTINGS)
    plan = plan_placement(decision.forecast, PLACEMENT, [7], PlacementLimits((3, 3)))
    assert plan.holders(7, 0) == [0, 1]
    assert imbalance(decision.forecast, plan, [7]) <= 1.1
    assert not proactive_rebalance(EVEN, SEEN, COMING, 2048, plan, [7], 100.0, None, SETTINGS).due


def test_a_proactive_change_is_watched_for_check_s_and_corrected_once_it_misses():
    # A proactive change at t=100, watched until t=130 at the threshold 1.2.
    before = [(90.0, 1.5), (100.0, 1.4)]  # taken up to the change: they judged the old placement
    assert proactive_change_missed(before, 110.0, 100.0, SETTINGS) is None  # nothing since: still watched
    held = before + [(110.0, 1.1), (120.0, 1.2)]  # at the threshold is not above it
    assert proactive_change_missed(held, 125.0, 100.0, SETTINGS) is None
    assert proactive_change_missed(held, 130.0, 100.0, SETTINGS) is False  # the watch is over: the bet held
    # The first sample above the threshold within the watch: missed at once, not at its end.
    assert proactive_change_missed(held + [(121.0, 1.25)], 121.0, 100.0, SETTINGS) is True
    # One after the watch is the reactive rule's to judge, not this check's.
    assert proactive_change_missed(held + [(131.0, 1.9)], 131.0, 100.0, SETTINGS) is False


@pytest.mark.parametrize("args, problem", [
    ((np.ones((1, 3)), SEEN, COMING, 10), "seen has shape"),
    ((EVEN, SEEN, np.ones((2, 4)), 10), "coming has shape"),
    ((-EVEN, SEEN, COMING, 10), "observed must be a finite, non-negative"),
    ((EVEN, np.full((1, 4), np.nan), COMING, 10), "seen must be a finite, non-negative"),
    ((EVEN, SEEN, COMING, -1), "coming_tokens must be >= 0"),
])
def test_bad_loads_are_refused(args, problem):
    with pytest.raises(ValueError, match=problem):
        forecast_load(*args, SETTINGS)


def test_mismatched_placement_and_settings_are_refused():
    with pytest.raises(ValueError, match="moe_layers names 2 layers, the loads have 1 rows"):
        proactive_rebalance(EVEN, SEEN, COMING, 10, PLACEMENT, [7, 8], 0.0, None, SETTINGS)
    with pytest.raises(ValueError, match="the loads have 3 experts per layer, the placement 4"):
        proactive_rebalance(EVEN[:, :3], SEEN[:, :3], COMING[:, :3], 10, PLACEMENT, [7], 0.0, None, SETTINGS)
    for field, value in (("threshold", 1.0), ("min_lead", -0.1), ("full_weight_tokens", 0.0), ("cooldown_s", -1.0),
                         ("check_s", 0.0)):
        with pytest.raises(ValueError, match=field):
            ProactiveSettings(**{field: value})
