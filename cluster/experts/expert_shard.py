"""ExpertShard: owns the weights of a set of (layer, expert) pairs on one device and computes
pre-reduced partial sums for the token rows routed to them. A plain class; a Ray shell is
applied where shards run remotely.

Placement epochs live here as slot maps over one store of weights: an expert that stays on the
shard from one epoch to the next is neither reloaded nor copied, a new epoch is staged (its
missing experts loaded) while the current one serves, and every request names the epoch it was
planned under, so a step always finishes on the epoch it started with. Retiring old epochs frees
the experts no kept epoch uses."""

from dataclasses import dataclass

import torch

from moefleet.kernels.expert_ffn import ExpertPair, expert_weight_lists, grouped_swiglu, swiglu_linears

ExpertKey = tuple[int, int]  # (layer, logical expert)


@dataclass
class _LayerSlots:
    local_slot: torch.Tensor  # [E] local slot of each logical expert, -1 if absent
    pairs: list[ExpertPair]  # per local slot (gate_up, down)
    weight_lists: tuple[list[torch.Tensor], list[torch.Tensor]] | None  # the same, for the compiled kernel
    # Every logical expert in its own slot (a shard holding the whole layer in order, as a lone
    # in-process shard does): expert ids are slots, with nothing to map or check per step.
    identity: bool = False


class ExpertShard:
    def __init__(self, shard_id: int, num_experts: int):
        self.shard_id = shard_id
        self.num_experts = num_experts
        self.weights: dict[ExpertKey, ExpertPair] = {}
        self.epochs: dict[int, dict[int, _LayerSlots]] = {}  # epoch -> MoE layer -> its slots

    @classmethod
    def from_checkpoint(cls, shard_id: int, reader, experts_by_layer: dict[int, tuple[int, ...]],
                        epoch: int = 0) -> "ExpertShard":
        """Load only this shard's experts (memory-mapped reads of just those tensors)."""
        shard = cls(shard_id, reader.spec.moe.num_experts)
        shard.load_missing(reader, experts_by_layer)
        shard.install_epoch(epoch, experts_by_layer)
        return shard

    # ----- weights -----
    def missing(self, experts_by_layer: dict[int, tuple[int, ...]]) -> list[ExpertKey]:
        return [(layer, e) for layer, experts in experts_by_layer.items() for e in experts
                if (layer, e) not in self.weights]

    def load_missing(self, reader, experts_by_layer: dict[int, tuple[int, ...]]) -> int:
        """Read from the checkpoint the experts of `experts_by_layer` this shard lacks; returns how many."""
        keys = self.missing(experts_by_layer)
        for layer, e in keys:
            self.weights[(layer, e)] = swiglu_linears(*reader.expert(layer, e))
        return len(keys)

    def put_expert(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """w13 [2I, D] (gate rows, then up rows), w2 [D, I]: what a peer's export_expert gives."""
        inter = w13.shape[0] // 2
        self.weights[(layer, expert)] = swiglu_linears(w13[:inter], w13[inter:], w2)

    def export_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's weights in checkpoint layout, for a peer shard to take over."""
        gate_up, down = self.weights[(layer, expert)]
        return gate_up.dense_weight(), down.dense_weight()

    # ----- epochs -----
    def install_epoch(self, epoch: int, experts_by_layer: dict[int, tuple[int, ...]]) -> None:
        """Slot maps of `epoch`; every expert must already be loaded (see load_missing/put_expert)."""
        absent = self.missing(experts_by_layer)
        if absent:
            raise KeyError(f"shard {self.shard_id} cannot install epoch {epoch}: (layer, expert) {absent[:8]} not loaded")
        layers = {}
        for layer, experts in experts_by_layer.items():
            slots = torch.full((self.num_experts,), -1, dtype=torch.long)
            slots[list(experts)] = torch.arange(len(experts))
            pairs = [self.weights[(layer, e)] for e in experts]
            identity = tuple(experts) == tuple(range(self.num_experts))
            layers[layer] = _LayerSlots(slots, pairs, expert_weight_lists(pairs), identity)
        self.epochs[epoch] = layers

    @property
    def latest_epoch(self) -> int:
        return max(self.epochs)

    def retire_before(self, epoch: int) -> int:
        """Drop the slot maps of epochs older than `epoch` (the newest is always kept) and free the
        experts that no kept epoch uses; returns how many experts were freed."""
        keep_from = min(epoch, self.latest_epoch)
        for old in [e for e in self.epochs if e < keep_from]:
            del self.epochs[old]
        used = {(layer, e) for layers in self.epochs.values() for layer, s in layers.items()
                for e in torch.nonzero(s.local_slot >= 0).flatten().tolist()}
        unused = [key for key in self.weights if key not in used]
        for key in unused:
            del self.weights[key]
        return len(unused)

    def experts_of(self, epoch: int) -> dict[int, tuple[int, ...]]:
        """Logical experts per layer in slot order, for `epoch` (empty if unknown)."""
        out = {}
        for layer, s in self.epochs.get(epoch, {}).items():
            held = torch.nonzero(s.local_slot >= 0).flatten()
            out[layer] = tuple(held[torch.argsort(s.local_slot[held])].tolist())
        return out

    # ----- compute -----
    def compute(self, layer: int, rows: torch.Tensor, row_index: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                epoch: int | None = None) -> torch.Tensor:
        """rows [R, D]; row_index, experts (logical ids), weights: [N] one per (token, expert)
        pair -> [R, D], each row's weighted sum over its pairs' experts, with the slots of `epoch`
        (the newest when None)."""
        layers = self.epochs.get(self.latest_epoch if epoch is None else epoch)
        if layers is None:
            raise KeyError(f"shard {self.shard_id} has no epoch {epoch} (holds {sorted(self.epochs)})")
        slots_of_layer = layers.get(layer)
        if slots_of_layer is None:
            raise KeyError(f"shard {self.shard_id} holds no experts of layer {layer} in epoch {epoch}")
        if slots_of_layer.identity:
            slots = experts
        else:
            slots = slots_of_layer.local_slot[experts]
            if bool((slots < 0).any()):
                missing = sorted(set(experts[slots < 0].tolist()))
                raise KeyError(f"shard {self.shard_id} holds no copy of layer {layer} experts {missing}")
        return grouped_swiglu(rows, row_index, slots, weights, slots_of_layer.pairs, rows.shape[0],
                              slots_of_layer.weight_lists)

    def nbytes(self) -> int:
        return sum(lin.nbytes for pair in self.weights.values() for lin in pair)
