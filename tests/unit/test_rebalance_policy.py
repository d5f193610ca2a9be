"""The automatic-rebalance rule, the state the controller keeps for it, and the epoch staging
plan: pure functions, no cluster, no clock."""

from hypothesis import given
from hypothesis import strategies as st

from moefleet.autoscaler.rebalance_config import AutoRebalance
from moefleet.autoscaler.rebalance_rule import rebalance_due
from moefleet.cluster.control.records import RebalanceState
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.staging_plan import peer_sources, without_shards

POLICY = AutoRebalance(enabled=True, threshold=1.5, window_s=10.0, cooldown_s=30.0)


def samples(values, start=0.0):
    return [(start + i, v) for i, v in enumerate(values)]


def test_due_only_after_a_whole_window_above_threshold():
    high = samples([2.0] * 12)
    assert rebalance_due(high, now=11.0, policy=POLICY, last_change_at=None)
    assert not rebalance_due(high[:5], now=4.0, policy=POLICY, last_change_at=None)  # watched 4 s of 10
    dip = samples([2.0] * 6 + [1.2] + [2.0] * 5)  # one sample under the threshold inside the window
    assert not rebalance_due(dip, now=11.0, policy=POLICY, last_change_at=None)
    assert not rebalance_due(high, now=11.0, policy=POLICY.model_copy(update={"enabled": False}), last_change_at=None)


def test_cooldown_and_samples_from_before_the_last_change_do_not_count():
    high = samples([2.0] * 60)
    assert not rebalance_due(high, now=59.0, policy=POLICY, last_change_at=40.0)  # cooling down until 70
    assert not rebalance_due(high[:45], now=44.0, policy=POLICY.model_copy(update={"cooldown_s": 0.0}),
                             last_change_at=40.0)  # only 4 s watched since the change
    assert rebalance_due(high, now=59.0, policy=POLICY.model_copy(update={"cooldown_s": 0.0}), last_change_at=40.0)


@given(gaps=st.lists(st.floats(0.1, 8.0), min_size=1, max_size=40),
       values=st.lists(st.sampled_from([1.2, 1.6, 2.5]), min_size=40, max_size=40),
       change_after=st.integers(0, 40))
def test_kept_samples_give_the_rule_the_same_answer_as_all_of_them(gaps, values, change_after):
    """RebalanceState keeps only the samples the rule can still use (what the controller writes to
    the store every round stays small): at every later time the rule answers as it would with
    every sample taken. A change part-way resets both."""
    state, taken, last_change, now = RebalanceState(), [], None, 0.0
    for n, (gap, value) in enumerate(zip(gaps, values)):
        now += gap
        if n == change_after:
            state, last_change = state.changed(now - gap / 2), now - gap / 2
        state = state.sampled(now, value, POLICY.window_s)
        taken.append((now, value))
        for later in (now, now + 0.5, now + POLICY.window_s, now + POLICY.cooldown_s + 1):
            assert rebalance_due(list(state.samples), later, POLICY, last_change) == \
                rebalance_due(taken, later, POLICY, last_change)
    assert len(state.samples) <= POLICY.window_s / 0.1 + 2


def test_staging_copies_from_live_peers_only():
    old = Placement(0, 4, {0: ((0, 1), (2, 3))})
    new = Placement(1, 4, {0: ((0, 1), (2,), (3, 1))})  # shard 2 joins with experts 3 and 1
    assert peer_sources(old, new) == {2: {1: [(0, 3)], 0: [(0, 1)]}}
    assert peer_sources(None, new) == {}  # first epoch: everything from the checkpoint
    # shard 1 lost: a fresh shard 1 takes its experts, none of which has a live copy elsewhere
    replaced = Placement(1, 4, {0: ((0, 1), (2, 3))})
    assert peer_sources(old, replaced, lost={1}) == {}
    with_copy = Placement(0, 4, {0: ((0, 1, 2), (2, 3))})
    assert peer_sources(with_copy, Placement(1, 4, with_copy.shard_experts), lost={1}) == {1: {0: [(0, 2)]}}
    assert without_shards(old, {0}).shard_experts == {0: ((), (2, 3))}
