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
        self.total = torch.zeros(len(moe_layers), num_experts, dtype=torch.long)

    def begin_step(self) -> None:
        self.step += 1
        self.counts[self.step % self.window_steps].zero_()

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: [T, K] chosen experts of one layer in this step."""
        counts = torch.bincount(expert_ids.flatten(), minlength=self.counts.shape[-1])
        self.counts[self.step % self.window_steps, self.row_of[layer]] += counts
        self.total[self.row_of[layer]] += counts

    def window(self) -> np.ndarray:
        """[num_moe_layers, E] tokens per expert over the last `window_steps` steps."""
        return self.counts.sum(dim=0).numpy()
