from moefleet.autoscaler.counter_total import CounterTotal


def test_restarts_and_new_sources_count_from_zero_and_gone_ones_are_forgotten():
    total = CounterTotal()
    assert total.add({"a": 2.0, "b": 1.0}) == 3.0  # first reading: all of it
    assert total.add({"a": 5.0, "b": 1.5}) == 6.5  # +3, +0.5
    assert total.add({"a": 0.5, "b": 2.0}) == 7.5  # a restarted (a new placement): +0.5; b +0.5
    assert total.add({"b": 2.5, "c": 1.0}) == 9.0  # a gone; c new: +1; b +0.5
    assert total.add({"a": 1.0, "b": 2.5, "c": 1.0}) == 10.0  # a back: a new source again
    assert total.add({}) == 10.0
