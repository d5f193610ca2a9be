"""Per-expert load: tokens routed to each expert of each MoE layer over a sliding window of
engine steps, for the controller's placement planner."""

import numpy as np
import torch


class ExpertLoadCounters:
    def __init__(self, moe_layers: list[int], num_experts: int, window_steps: int = 256):
        self.row_of = {layer: i for i, layer in enumerate(moe_layers)}
        self.window_steps = window_steps
        self.counts = torch.zeros(window_steps, len(moe_layers), num_experts, dtype=torch.long)
        self.step = 0
        self._earlier_total = torch.zeros(len(moe_layers), num_experts, dtype=torch.long)  # steps before this one
        self._this_step = self.counts[0]
        self._ones = torch.ones(0, dtype=torch.long)

    def begin_step(self) -> None:
        self._earlier_total += self._this_step
        self.step += 1
        self._this_step = self.counts[self.step % self.window_steps]
        self._this_step.zero_()

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: [T, K] chosen experts of one layer in this step. Called per layer per
        step on the serving path: one op."""
        flat = expert_ids.flatten()
        if self._ones.numel() < flat.numel():
            self._ones = torch.ones(max(flat.numel(), 2 * self._ones.numel()), dtype=torch.long)
        self._this_step[self.row_of[layer]].index_add_(0, flat, self._ones[: flat.numel()])

    @property
    def total(self) -> torch.Tensor:
        """[num_moe_layers, E] tokens per expert since the engine started."""
        return self._earlier_total + self._this_step

    def window(self) -> np.ndarray:
        """[num_moe_layers, E] tokens per expert over the last `window_steps` steps."""
        return self.counts.sum(dim=0).numpy()
