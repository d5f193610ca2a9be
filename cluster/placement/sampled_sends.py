"""The sends a layout costs, counted token by token on a sample of the routing: what the affinity
planner's local search minimises (pure: numpy and the standard library).

Shapes: N sampled token occurrences, L MoE layers, K experts chosen per token and layer, E experts
per layer, S shards, M nodes.

The count (routing/evaluate.py's model). A token runs on one node, its request's replica, and per
MoE layer sends its rows once to each shard serving one of its chosen experts. Seen from node m,
expert e is served by its first copy on m (by shard index) where m holds one, else by its first
copy anywhere: `servers`, int[..., M]. A send to a shard on the token's own node costs 1, one to
another node `cross_node_weight`. Which node a token runs on is not known when planning (request
shuffling decides it, from the plan), so every node counts with the same weight 1 / M: a layer
costs
    sum over sampled tokens i, nodes m: 1/M x sum over the distinct servers s of i's experts: c_m(s)
times tokens_per_sample (the routing each sampled token stands for). Where an expert has several
copies off the token's node, the dispatcher prefers one the token already visits; here it is
always the first, so the count can only overstate what the dispatcher sends.

Why count sends rather than pairs of co-chosen experts on a shard: three experts on one shard
save two sends, not three pairs, and a copy on every node makes an expert local to every token,
after which grouping it with others saves nothing across nodes; the pairs cannot tell.

Gains. For a change to one expert's copies the cost changes only in the tokens that chose it, and
per token and node only where its server changes, from s to s': it saves c(s) when s served
nothing else of that token, and costs c(s') when s' served nothing of it yet. So per node, with
alone[i, s] (s serves exactly one of token i's experts) and empty[i, s] (none) summed over each
expert's tokens, every single-expert change (a move, a new copy, a dropped one) is scored from
tables made in one O(N K S M) pass per layer (`tables`, `change_gain`). Changes of several
experts (swaps) are counted exactly on the tokens they touch (`cost` over `tokens_of`).
"""

import numpy as np


class SampledSends:
    """paths: int[N, L, K] the sampled tokens' chosen experts (-1 = none); tokens_per_sample: the
    routing each stands for; node_of_shard: int[S] (nodes 0..M-1); cross_node_weight >= 1."""

    def __init__(self, paths: np.ndarray, tokens_per_sample: float, node_of_shard: np.ndarray,
                 cross_node_weight: float, num_experts: int):
        self.paths = [np.ascontiguousarray(paths[:, layer]) for layer in range(paths.shape[1])]  # L x [N, K]
        num_nodes = int(node_of_shard.max()) + 1
        self.on_node = node_of_shard[None, :] == np.arange(num_nodes)[:, None]  # [M, S]
        self.send_cost = np.where(self.on_node, 1.0, cross_node_weight) / num_nodes  # [M, S], weight 1/M in
        self.mean_send_cost = float(self.send_cost.sum(axis=0).mean())  # one send, over the nodes
        self.scale = float(tokens_per_sample)
        self.num_experts = num_experts
        # Per layer, each expert's tokens: token indices ordered by expert, and where each expert's start.
        self.token_index, self.starts = [], []
        for chosen in self.paths:
            flat = chosen.ravel()
            kept = np.flatnonzero(flat >= 0)
            order = kept[np.argsort(flat[kept], kind="stable")]
            self.token_index.append(order // chosen.shape[1])
            self.starts.append(np.searchsorted(flat[order], np.arange(num_experts + 1)))

    def servers(self, holders: np.ndarray) -> np.ndarray:
        """holders: bool[..., S] -> int[..., M]: the shard serving the expert to a token on each
        node (its first copy on the node, else its first copy)."""
        on_node = holders[..., None, :] & self.on_node  # [..., M, S]
        first = np.argmax(holders, axis=-1)[..., None]
        return np.where(on_node.any(axis=-1), np.argmax(on_node, axis=-1), first)

    def tokens_of(self, layer: int, experts) -> np.ndarray:
        """int64[n]: the sampled tokens that chose any of `experts` at `layer`, ascending."""
        index, starts = self.token_index[layer], self.starts[layer]
        return np.unique(np.concatenate([index[starts[e]:starts[e + 1]] for e in experts]))

    def cost(self, layer: int, server: np.ndarray, tokens: np.ndarray | None = None) -> float:
        """server: int[E, M], a layout's `servers`. The layer's cost (module docstring) over the
        sampled tokens, or over `tokens` of them only, scaled to the routing."""
        chosen = self.paths[layer] if tokens is None else self.paths[layer][tokens]  # [n, K]
        ids = np.where(chosen[None] >= 0, server.T[:, np.maximum(chosen, 0)], -1)  # [M, n, K]
        ordered = np.sort(ids, axis=2)
        new = np.ones(ordered.shape, dtype=bool)
        new[:, :, 1:] = ordered[:, :, 1:] != ordered[:, :, :-1]
        new &= ordered >= 0
        nodes = np.arange(len(self.send_cost))[:, None, None]
        return float(np.sum(self.send_cost[nodes, np.maximum(ordered, 0)] * new)) * self.scale

    def tables(self, layer: int, server: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """server: int[E, M], a layout's `servers` -> (the same; alone float64[E, M]: the expert's tokens whose
        server of it serves nothing else of theirs, per node; empty float64[E, S, M]: its tokens
        that no shard s serves anything of yet, per node). Sums over each expert's tokens as one
        product with the token x expert incidence (float32: exact for counts below 2**24)."""
        chosen = self.paths[layer]
        tokens, shards = chosen.shape[0], self.send_cost.shape[1]
        nodes = server.shape[1]
        valid = chosen >= 0
        rows = np.broadcast_to(np.arange(tokens)[:, None], chosen.shape)[valid]
        cells = (rows[:, None] * nodes + np.arange(nodes)) * shards + server[chosen[valid]]  # [nnz, M]
        pins = np.bincount(cells.ravel(), minlength=tokens * nodes * shards).reshape(tokens, nodes * shards)
        incidence = np.zeros((tokens, self.num_experts), dtype=np.float32)
        incidence[rows, chosen[valid]] = 1
        sums = incidence.T @ np.concatenate([pins > 0, pins == 1], axis=1).astype(np.float32)  # [E, 2 M S]
        occupied = sums[:, :nodes * shards].reshape(-1, nodes, shards).astype(np.float64)
        single = sums[:, nodes * shards:].reshape(-1, nodes, shards).astype(np.float64)
        experts = np.arange(len(server))[:, None]
        alone = single[experts, np.arange(nodes), server]  # [E, M]
        empty = (incidence.sum(axis=0)[:, None, None] - occupied).transpose(0, 2, 1)  # [E, S, M]
        return server, alone, empty

    def change_gain(self, tables: tuple, experts: np.ndarray, servers: np.ndarray) -> np.ndarray:
        """experts: int[...]; servers: int[..., M] each expert's servers after a change of its
        copies alone -> float64[...]: the cost it saves (module docstring), scaled."""
        server, alone, empty = tables
        before = server[experts]  # [..., M]
        nodes = np.arange(before.shape[-1])
        saved = self.send_cost[nodes, before] * alone[experts]
        spent = self.send_cost[nodes, servers] * empty[np.asarray(experts)[..., None], servers, nodes]
        return np.sum(np.where(before != servers, saved - spent, 0.0), axis=-1) * self.scale

