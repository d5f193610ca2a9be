"""Per-expert load counters: a sliding window of steps for the planner, a running total for metrics."""

import random

import torch

from moefleet.cluster.engine.load_counters import ExpertLoadCounters


def test_window_and_total_against_a_plain_bincount():
    counters = ExpertLoadCounters([1, 3], num_experts=4, window_steps=3)
    rng = random.Random(0)
    per_step, total = [], torch.zeros(2, 4, dtype=torch.long)
    for _ in range(7):
        counters.begin_step()
        step = torch.zeros(2, 4, dtype=torch.long)
        for layer, row in ((1, 0), (3, 1)):
            ids = torch.tensor([[rng.randrange(4) for _ in range(2)] for _ in range(rng.randrange(1, 40))])
            counters.record(layer, ids)
            step[row] += torch.bincount(ids.flatten(), minlength=4)
        per_step.append(step)
        total += step
        assert torch.equal(counters.total, total)
        assert (counters.window() == sum(per_step[-3:]).numpy()).all()
