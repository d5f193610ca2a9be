"""Placement files: what `moefleet routing plan` writes and `moefleet serve --placement` (the
controller's initial_placement) starts from. JSON of placement_to_dict with the MoE layers keyed
0..L-1 (the routing trace's numbering, not the model's layer indices), plus an optional
"shard_nodes": [node of shard 0, ...], the topology the plan was made for."""

import json

from moefleet.cluster.placement.placement import Placement, placement_from_dict, placement_to_dict


def load_placement_file(path: str) -> tuple[Placement, tuple[int, ...] | None]:
    """(placement keyed 0..L-1, shard_nodes or None). ValueError naming the file for anything wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    try:
        placement = placement_from_dict(data)
        placement.validate()
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise ValueError(f"{path}: not a placement ({type(e).__name__}: {e})") from None
    nodes = data.get("shard_nodes")
    if nodes is None:
        return placement, None
    if (not isinstance(nodes, list) or len(nodes) != placement.num_shards
            or not all(type(n) is int and n >= 0 for n in nodes)):
        raise ValueError(f"{path}: shard_nodes must give each of the {placement.num_shards} shards a node >= 0")
    return placement, tuple(nodes)


def check_shard_nodes(path: str, shard_nodes: tuple[int, ...], shard_resources: list[dict[str, float]] | None) -> None:
    """ValueError when the Ray resources that place shard s (shard_resources[s], cycled) do not put
    the shards together as the plan's shard_nodes does: shards planned on one node must share
    their resources, shards planned on different nodes must not. Without shard_resources every
    shard lands wherever Ray puts it, which is the single-node case, so nothing to check."""
    if not shard_resources:
        return
    resources = [shard_resources[s % len(shard_resources)] for s in range(len(shard_nodes))]
    for s in range(len(shard_nodes)):
        for t in range(s):
            planned_together, placed_together = shard_nodes[s] == shard_nodes[t], resources[s] == resources[t]
            if planned_together != placed_together:
                raise ValueError(
                    f"{path} plans shards {t} and {s} on {'one node' if planned_together else 'different nodes'} "
                    f"(shard_nodes {list(shard_nodes)}), but engine.shard_resources places them on "
                    f"{resources[t]} and {resources[s]}: give each shard the resources of its planned node")


def save_placement_file(path: str, placement: Placement, shard_nodes: tuple[int, ...]) -> None:
    data = placement_to_dict(placement)
    data["shard_nodes"] = list(shard_nodes)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None


def on_model_layers(placement: Placement, moe_layers: list[int], num_experts: int, epoch: int,
                    source: str) -> Placement:
    """`placement` (MoE layers keyed 0..L-1) keyed by the model's MoE layer indices instead, as
    epoch `epoch`; ValueError naming `source` when it does not fit the model."""
    if sorted(placement.shard_experts) != list(range(len(moe_layers))):
        raise ValueError(f"{source}: places MoE layers {sorted(placement.shard_experts)}, the model has "
                         f"{len(moe_layers)} (0..{len(moe_layers) - 1})")
    if placement.num_experts != num_experts:
        raise ValueError(f"{source}: places {placement.num_experts} experts per layer, the model has {num_experts}")
    return relabel_layers(placement, moe_layers, epoch)


def relabel_layers(placement: Placement, layers: list[int], epoch: int | None = None) -> Placement:
    """`placement` with its MoE layers (in ascending order) keyed by `layers` instead: the model's
    layer indices <-> the 0..L-1 of routing traces and the affinity planner. Slot layouts are
    dropped (a relabelled placement is a plan, diffed anew against the current epoch)."""
    own = sorted(placement.shard_experts)
    if len(own) != len(layers):
        raise ValueError(f"the placement has {len(own)} MoE layers, {len(layers)} labels given")
    layout = {label: placement.shard_experts[layer] for layer, label in zip(own, layers)}
    keyed = Placement(epoch=placement.epoch if epoch is None else epoch, num_experts=placement.num_experts,
                      shard_experts=layout)
    keyed.validate()
    return keyed
