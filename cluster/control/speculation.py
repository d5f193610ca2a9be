"""The controller's speculative scheduling, over plain data: the affinity model it learns from the
replicas' sampled routing, how well that model predicts (measured on each sample before it is
learned from), and what the model is used for: the table gateways shuffle requests by and the
grouping plans of rebalancing. The controller owns the I/O (the replicas, the state store); this
class only computes, so it is tested without either.

Node topology: every shard and replica reports the Ray node it runs on (an id string; "local" for
a process outside Ray or shards inside a replica). Nodes are numbered by their sorted ids, the
numbering the planner and the gateway tables use."""

from dataclasses import dataclass

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.affinity import AffinityModel
from moefleet.cluster.routing.evaluate import distinct_per_row
from moefleet.cluster.routing.request_placement import NodeAffinityTable, node_affinity_table, node_share

QUALITY_DECAY = 0.95  # per learned sample: the quality gauges follow roughly the last 20 samples
# Below this many sampled token occurrences, grouping plans follow noise: plan for load alone. At the
# default sampling rate (1/32) that is about 16K tokens served.
MIN_OCCURRENCES_TO_PLAN = 512


@dataclass(frozen=True)
class ArrivingLoad:
    """The affinity model's predicted expert load, float64[L, E], of the prompts the replicas
    admitted over the last coming_span_s seconds (coming_tokens tokens) and over the seen_span_s
    seconds before (0: none seen yet): what proactive rebalancing and the autoscaler look ahead by."""

    seen: np.ndarray
    seen_span_s: float
    coming: np.ndarray
    coming_span_s: float
    coming_tokens: int


@dataclass(frozen=True)
class Topology:
    """Where things run. shard_nodes[s]: node index of shard s (() when the experts live inside each
    replica); replica_nodes: replica id -> node index; node_ids[i]: the Ray node id of index i."""

    node_ids: tuple[str, ...]
    shard_nodes: tuple[int, ...]
    replica_nodes: dict[str, int]

    @classmethod
    def from_ids(cls, shard_node_ids: list[str], replica_node_ids: dict[str, str]) -> "Topology":
        ids = tuple(sorted(set(shard_node_ids) | set(replica_node_ids.values())))
        index = {node: i for i, node in enumerate(ids)}
        return cls(ids, tuple(index[n] for n in shard_node_ids), {r: index[n] for r, n in replica_node_ids.items()})

    @property
    def spans_nodes(self) -> bool:
        """Whether any expert can be on another node than a replica (else locality means nothing)."""
        return len(self.node_ids) > 1 and bool(self.shard_nodes)


@dataclass(frozen=True)
class GatewayLocality:
    """What a gateway shuffles requests by: the node table, each replica's node in it, and the
    checkpoint whose tokenizer turns text prompts into the table's token ids."""

    table: NodeAffinityTable
    replica_nodes: dict[str, int]
    model_dir: str

    def replica_scores(self, prompt_token_ids) -> dict[str, float]:
        """replica id -> share of the prompt's predicted expert activations on that replica's node."""
        scores = self.table.request_scores(prompt_token_ids)
        return {rid: float(scores[node]) if node < len(scores) else 0.0 for rid, node in self.replica_nodes.items()}


class PredictionQuality:
    """Decayed sums over the samples seen, for the Prometheus gauges: the model's precision (its top-k
    against the router's top-k), the local fraction it predicted against the one that happened
    (activations on a shard of the sampled token's own node), fan-out and cross-node bytes per token."""

    def __init__(self, row_bytes: int):
        self.row_bytes = row_bytes  # one hidden-state row, sent to a remote shard and summed back
        self.sums = dict.fromkeys(("hits", "predicted", "local", "predicted_local", "pairs", "distinct_shards",
                                   "token_layers", "remote_sends", "tokens"), 0.0)

    def add(self, **counts: float) -> None:
        for name in self.sums:
            self.sums[name] = self.sums[name] * QUALITY_DECAY + counts.get(name, 0.0)

    def gauges(self) -> dict[str, float | None]:
        s = self.sums

        def ratio(a, b):
            return s[a] / s[b] if s[b] else None

        per_token = ratio("remote_sends", "tokens")
        return {"precision": ratio("hits", "predicted"), "actual_local_fraction": ratio("local", "pairs"),
                "predicted_local_fraction": ratio("predicted_local", "predicted"),
                "fanout": ratio("distinct_shards", "token_layers"),
                "cross_node_bytes_per_token": None if per_token is None else per_token * 2 * self.row_bytes}


class Speculation:
    def __init__(self, model: AffinityModel, row_bytes: int):
        self.model = model
        self.quality = PredictionQuality(row_bytes)

    def learn(self, tokens: np.ndarray, experts: np.ndarray, token_node: int | None, placement: Placement | None,
              moe_layers: list[int], topology: Topology) -> None:
        """One replica's sample: tokens int64[N], experts int64[N, L, K] (-1: layer not reached),
        sampled on the node `token_node` under `placement`. Scored first, then learned from."""
        if len(tokens) == 0:
            return
        if placement is not None:
            self.quality.add(**self._score(tokens, experts, token_node, placement, moe_layers, topology))
        self.model.observe(tokens, experts)

    def _score(self, tokens, experts, token_node, placement, moe_layers, topology) -> dict[str, float]:
        counts = dict.fromkeys(("hits", "predicted", "local", "predicted_local", "pairs", "distinct_shards",
                                "token_layers", "remote_sends"), 0.0)
        shard_nodes = np.array(topology.shard_nodes or (0,) * placement.num_shards)
        local_node = token_node if topology.shard_nodes else 0  # shards inside the replica: all local
        held = placement.holder_matrix(moe_layers)  # [L, E, S]
        for ordinal in range(len(moe_layers)):
            actual = experts[:, ordinal]
            reached = (actual >= 0).all(axis=1)
            if not reached.any():
                continue
            actual = actual[reached]
            predicted, _ = self.model.predict(tokens[reached], ordinal, k=actual.shape[1])
            counts["hits"] += float((predicted[:, :, None] == actual[:, None, :]).any(axis=2).sum())
            counts["predicted"] += predicted.size
            holders = held[ordinal]  # bool[E, S]
            on_node = (holders & (shard_nodes == local_node)[None, :]).any(axis=1)  # bool[E]
            counts["local"] += float(on_node[actual].sum())
            counts["predicted_local"] += float(on_node[predicted].sum())
            counts["pairs"] += actual.size
            serving = np.where(holders & (shard_nodes == local_node)[None, :], 1, 0).argmax(axis=1)
            first = holders.argmax(axis=1)
            chosen = np.where(on_node, serving, first)[actual]  # [N, K]: a copy on the token's node if any
            counts["distinct_shards"] += float(distinct_per_row(chosen).sum())
            counts["token_layers"] += len(actual)
            counts["remote_sends"] += float(distinct_per_row(np.where(on_node[actual], -1, chosen)).sum())
        counts["tokens"] = float(len(tokens))
        return counts

    def can_plan(self) -> bool:
        return self.model.num_observed >= MIN_OCCURRENCES_TO_PLAN

    def gateway_locality(self, placement: Placement, moe_layers: list[int], topology: Topology,
                         model_dir: str) -> GatewayLocality | None:
        """The table gateways route by, or None where locality means nothing (one node, or nothing
        learned yet)."""
        if not topology.spans_nodes or not self.can_plan():
            return None
        share = node_share(placement, topology.shard_nodes, moe_layers)
        return GatewayLocality(node_affinity_table(self.model, share), dict(topology.replica_nodes), model_dir)
