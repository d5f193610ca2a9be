"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index),
memory-mapped, with per-architecture tensor names.

Routed experts are read one (layer, expert) at a time so that a shard loads only its own
experts; both the per-expert layout (`experts.{e}.w1/w3/w2` or `gate_proj/up_proj/down_proj`,
as real checkpoints and `save_pretrained` write them) and the fused layout
(`experts.gate_up_proj [E, 2I, D]`, `experts.down_proj [E, D, I]`) are understood.
"""

import glob
import json
import os

import torch
from safetensors import safe_open

from moefleet.models.errors import CheckpointError
from moefleet.models.spec import ModelSpec


class SafetensorsDir:
    """Name → file index over a checkpoint directory; tensors are read lazily."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        self.file_of: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(index_path, "weight_map", f"unreadable index ({e})") from None
            for name, file in weight_map.items():
                self.file_of[name] = os.path.join(model_dir, file)
        else:
            files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
            if not files:
                raise CheckpointError(model_dir, "*.safetensors", "no safetensors weights in the model directory")
            for file in files:
                for name in self._open(file).keys():
                    self.file_of[name] = file
        self._handles: dict[str, object] = {}

    def _open(self, file: str):
        handle = getattr(self, "_handles", {}).get(file)
        if handle is None:
            if not os.path.isfile(file):
                raise CheckpointError(file, "weights file", "listed in the index but missing")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(file, "safetensors header", f"unreadable ({e})") from None
            if hasattr(self, "_handles"):
                self._handles[file] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(self.model_dir, name, "tensor missing from the checkpoint")
        tensor = self._open(self.file_of[name]).get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(self.file_of[name], name, f"shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """Row `index` of a stacked tensor, read without loading the others."""
        if name not in self.file_of:
            raise CheckpointError(self.model_dir, name, "tensor missing from the checkpoint")
        return self._open(self.file_of[name]).get_slice(name)[index : index + 1][0]


class CheckpointReader:
    """The tensors of one model in canonical form (float tensors in the requested dtype)."""

    def __init__(self, model_dir: str, spec: ModelSpec, dtype: torch.dtype):
        self.files = SafetensorsDir(model_dir)
        self.spec, self.dtype = spec, dtype
        mixtral_old = spec.arch == "mixtral" and self.files.has("model.layers.0.block_sparse_moe.gate.weight")
        self.moe_prefix = "block_sparse_moe" if mixtral_old else "mlp"
        self.expert_names = ("w1", "w3", "w2") if spec.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.files.get(name, shape).to(self.dtype)

    def optional(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.tensor(name, shape) if self.files.has(name) else None

    def layer(self, i: int, suffix: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.tensor(f"model.layers.{i}.{suffix}", shape)

    def mlp(self, prefix: str, intermediate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A dense SwiGLU MLP at `prefix` as (gate [I, D], up [I, D], down [D, I])."""
        d = self.spec.hidden_size
        return (self.tensor(f"{prefix}.gate_proj.weight", (intermediate, d)),
                self.tensor(f"{prefix}.up_proj.weight", (intermediate, d)),
                self.tensor(f"{prefix}.down_proj.weight", (d, intermediate)))

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed expert `expert` of MoE layer `layer` as (gate [I, D], up [I, D], down [D, I]);
        from a fused checkpoint, gate and up are views of its gate_up rows."""
        d, inter = self.spec.hidden_size, self.spec.moe.intermediate_size
        base = f"model.layers.{layer}.{self.moe_prefix}.experts"
        fused = f"{base}.gate_up_proj"
        if self.files.has(fused):
            w13 = self.files.get_rows(fused, expert).to(self.dtype)
            w2 = self.files.get_rows(f"{base}.down_proj", expert).to(self.dtype)
            if tuple(w13.shape) == (d, 2 * inter):  # transposed fused layout [E, D, 2I]
                w13, w2 = w13.t(), w2.t()
            if tuple(w13.shape) != (2 * inter, d) or tuple(w2.shape) != (d, inter):
                raise CheckpointError(self.files.file_of[fused], fused,
                                      f"expert {expert} has shape {tuple(w13.shape)}, expected {(2 * inter, d)}")
            return w13[:inter].contiguous(), w13[inter:].contiguous(), w2.contiguous()  # no copy unless transposed
        g, u, dn = self.expert_names
        return (self.tensor(f"{base}.{expert}.{g}.weight", (inter, d)), self.tensor(f"{base}.{expert}.{u}.weight", (inter, d)),
                self.tensor(f"{base}.{expert}.{dn}.weight", (d, inter)))
