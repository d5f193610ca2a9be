"""The MoE layer contract: router on the replica, routed experts through the dispatcher,
shared experts (Qwen2-MoE's sigmoid-gated one, DeepSeek's) computed locally; and the dense
SwiGLU MLP used by non-MoE layers."""

import torch
import torch.nn.functional as F

from moefleet.kernels.expert_ffn import swiglu, swiglu_linears
from moefleet.kernels.routing import router_softmax_topk, sigmoid_grouped_topk
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.spec import ModelSpec


class DenseMLP:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int):
        self.gate_up, self.down = swiglu_linears(*reader.mlp(f"model.layers.{layer}.mlp", spec.dense_intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up, self.down)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def finish(self, started: torch.Tensor) -> torch.Tensor:
        return started


class MoELayer:
    def __init__(self, reader: CheckpointReader, spec: ModelSpec, layer: int, dispatcher):
        moe, d = spec.moe, spec.hidden_size
        p = f"model.layers.{layer}.{reader.moe_prefix}"
        self.layer, self.moe, self.dispatcher = layer, moe, dispatcher
        # The router runs in float32 whatever the model's dtype, its weight converted once
        # (converting it per call cost ~4 us a layer). Softmax routers go through one compiled
        # call (logits, softmax, top k); sigmoid ones through F.linear: for E = 8-256 outputs,
        # MKL's GEMM beat the packed panel kernel at 1-64 rows (2.5 vs 6.5 us at one row).
        self.router = reader.tensor(f"{p}.gate.weight", (moe.num_experts, d)).float()
        self.bias = reader.tensor(f"{p}.gate.e_score_correction_bias", (moe.num_experts,)) if moe.has_correction_bias else None
        self.shared = None
        if moe.shared_intermediate_size:
            name = "shared_expert" if moe.shared_expert_gate else "shared_experts"
            self.shared = swiglu_linears(*reader.mlp(f"{p}.{name}", moe.shared_intermediate_size))
        self.shared_gate = reader.tensor(f"{p}.shared_expert_gate.weight", (1, d)) if moe.shared_expert_gate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K], expert ids [T, K]). The real router always decides."""
        moe = self.moe
        if moe.scoring == "sigmoid":
            return sigmoid_grouped_topk(F.linear(x.float(), self.router), self.bias, moe.top_k, moe.num_groups,
                                        moe.topk_groups, moe.renormalize, moe.routed_scaling_factor)
        weights, ids = router_softmax_topk(x, self.router, moe.top_k, moe.renormalize)
        return weights * moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else weights, ids

    def start(self, x: torch.Tensor) -> tuple:
        """Route and send the routed experts' work to the shards; the shared expert runs here
        meanwhile. Finish with `finish`."""
        weights, ids = self.route(x)
        pending = self.dispatcher.start(self.layer, x, weights.to(x.dtype), ids)
        shared = None
        if self.shared is not None:
            shared = swiglu(x, *self.shared)
            if self.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return pending, shared

    def finish(self, started: tuple) -> torch.Tensor:
        pending, shared = started
        out = self.dispatcher.finish(pending)
        return out if shared is None else out + shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))
