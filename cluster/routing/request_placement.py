"""Where a request's experts live: per node, the share of a prompt's predicted expert activations
that the node's shards hold, for the gateway to send the request to the replica on that node
(request shuffling; the router weighs it against load). Pure: numpy and the standard library.

The gateway must score a request in microseconds and must not carry the affinity model, so the
controller condenses model and placement into a NodeAffinityTable: per token id the model keeps,
the share of its expected activations (over all MoE layers) held on each node; one row for every
other token (the prior). A request's score on a node is the mean of its prompt tokens' rows."""

from dataclasses import dataclass

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.affinity import AffinityModel


@dataclass(frozen=True, eq=False)
class NodeAffinityTable:
    """token_ids int64[T] ascending; per_node float32[T, M]: for token token_ids[i], the share of its
    expected activations held on node m (a share in [0, 1]; an expert with copies on several nodes
    counts on each); unseen float64[M]: the same for any other token."""

    token_ids: np.ndarray
    per_node: np.ndarray
    unseen: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.unseen)

    def request_scores(self, prompt_token_ids) -> np.ndarray:
        """float64[M]: the mean over the prompt's tokens of each token's share on each node."""
        tokens = np.asarray(prompt_token_ids, dtype=np.int64)
        if tokens.size == 0:
            return self.unseen.copy()
        position = np.minimum(np.searchsorted(self.token_ids, tokens), max(0, len(self.token_ids) - 1))
        known = self.token_ids[position] == tokens if len(self.token_ids) else np.zeros(tokens.size, dtype=bool)
        total = self.per_node[position[known]].sum(axis=0, dtype=np.float64) + self.unseen * (~known).sum()
        return total / tokens.size


def node_share(placement: Placement, shard_nodes: tuple[int, ...], moe_layers: list[int]) -> np.ndarray:
    """float64[L, E, M]: 1 where node m holds a copy of expert e of the l-th MoE layer (moe_layers[l]
    keys the placement), else 0."""
    if len(shard_nodes) != placement.num_shards:
        raise ValueError(f"shard_nodes names {len(shard_nodes)} shards, the placement has {placement.num_shards}")
    on_node = np.eye(max(shard_nodes) + 1)[list(shard_nodes)]  # [S, M]: shard s is on node m
    return (placement.holder_matrix(moe_layers) @ on_node > 0).astype(np.float64)


def node_affinity_table(model: AffinityModel, share: np.ndarray, chunk: int = 4096) -> NodeAffinityTable:
    """The table for `model`'s kept tokens under the node layout `share` (float64[L, E, M], see
    node_share); tokens are scored `chunk` at a time to bound memory at chunk x E per layer."""
    if share.shape[:2] != (model.num_layers, model.num_experts):
        raise ValueError(f"share: expected shape ({model.num_layers}, {model.num_experts}, M), got {share.shape}")
    tokens = model.known_tokens()
    num_nodes = share.shape[2]

    def shares(batch: np.ndarray) -> np.ndarray:
        held, total = np.zeros((len(batch), num_nodes)), np.zeros(len(batch))
        for layer in range(model.num_layers):
            activation = model.activations(batch, layer)
            held += activation @ share[layer]
            total += activation.sum(axis=1)
        return held / np.maximum(total, 1e-12)[:, None]

    per_node = np.concatenate([shares(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
                              or [np.zeros((0, num_nodes))]).astype(np.float32)
    unseen = shares(np.array([-1], dtype=np.int64))[0]
    return NodeAffinityTable(tokens, per_node, unseen)
