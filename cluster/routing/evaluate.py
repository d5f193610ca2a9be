"""How a placement serves a routing trace: how many shards and nodes each token's expert work reaches.

The model: every node runs one model replica; a sequence's tokens run on the replica of the node
its request was routed to, and each token sends its rows, per MoE layer, to the shards serving its
chosen experts. A send is local when that shard is on the token's node. The real router's
choices (the trace) always decide; a placement and a request routing only change where the work
goes, so the counts below are exact for the trace, not estimates.

Which copy serves an expert held by several shards (as the dispatcher chooses them): the copy on
the token's node if there is one; among several candidates, one the token already visits in that
layer, then the least loaded so far (loads per layer and shard: first every pair with a single
candidate, then the others in trace order), then the lower shard id.

Which node a sequence runs on: `round_robin`, the sequence's index modulo the node count;
`affinity`, the gateway's request shuffling: the node whose shards hold most of the predicted
expert activations of the sequence's first `prompt_tokens` tokens (ties to the lower node), but
never more than ceil(overload_factor x sequences / nodes) sequences per node (OVERLOAD_FACTOR
unless given); past that, the next best node.

With a predictor, the sequences are split in two by a stable hash of their names
(`evaluation_split`): the caller fits the predictor on the profiling half
(`observe_profiling_half`) and every metric is computed on the evaluation half; a caller whose
predictor was fitted on other data (a profiling set of its own) passes `measured` instead. Its precision
and recall compare its top-k experts for each (token, layer) with the trace's, from the token
alone (what the gateway knows before the request runs).
"""

import hashlib
import math

import numpy as np

from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.routing.trace import RoutingTrace

REQUEST_ROUTINGS = ("round_robin", "affinity")
OVERLOAD_FACTOR = 1.1  # at most this many times an even share of the sequences on one node
DEFAULT_PROMPT_TOKENS = 32


def default_shard_nodes(num_shards: int, num_nodes: int) -> tuple[int, ...]:
    """Contiguous groups: shard s on node s * num_nodes // num_shards."""
    if num_shards < 1:
        raise ValueError(f"shards must be >= 1, got {num_shards}")
    if not 1 <= num_nodes <= num_shards:
        raise ValueError(f"nodes must be between 1 and the shard count {num_shards}, got {num_nodes}")
    return tuple(s * num_nodes // num_shards for s in range(num_shards))


def evaluation_split(seq_names: tuple) -> np.ndarray:
    """bool[S]: True for the sequences of the evaluation half. The sequences are ordered by a
    stable hash of their names (the same in every process), the first floor(S / 2) profile."""
    digests = np.array([int.from_bytes(hashlib.blake2b(repr(name).encode(), digest_size=8).digest(), "big")
                        for name in seq_names], dtype=np.uint64)
    evaluation = np.ones(len(seq_names), dtype=bool)
    evaluation[np.argsort(digests, kind="stable")[:len(seq_names) // 2]] = False
    return evaluation


def observe_profiling_half(trace: RoutingTrace, predictor) -> int:
    """Feeds the profiling half's token paths to predictor.observe(tokens, experts); returns how
    many token occurrences it observed."""
    seq, tokens, experts = trace.paths()
    profiling = ~evaluation_split(trace.seq_names)[seq]
    predictor.observe(tokens[profiling], experts[profiling])
    return int(profiling.sum())


def evaluate(trace: RoutingTrace, placement: Placement, shard_nodes: tuple[int, ...], predictor=None,
             request_routing: str = "round_robin", prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
             measured: np.ndarray | None = None, overload_factor: float = OVERLOAD_FACTOR) -> dict:
    """The metrics of `placement` (MoE layers keyed 0..L-1, as in the trace) on `trace`, with shard
    s on node shard_nodes[s]; predictor: an AffinityModel fitted on the profiling half, or None.
    measured: bool[S], the sequences to measure (default: the evaluation half with a predictor,
    every sequence without one); overload_factor: the `affinity` routing's cap on a node's share.

    fanout: mean distinct shards per (token, layer) event; local_fraction: share of expert
    activations served on the token's node; cross_node_sends_per_token: per token occurrence,
    distinct shards on other nodes summed over its layers, averaged; imbalance: max over mean
    activations per shard, all layers together; imbalance_per_layer_max: the worst layer's;
    precision, recall: the predictor's (None without one or without token ids); events, tokens:
    how many the metrics cover; sequences: in the trace; eval_sequences: those measured."""
    shard_nodes = _check(trace, placement, shard_nodes, predictor, request_routing, prompt_tokens)
    if not overload_factor >= 1:
        raise ValueError(f"overload_factor must be >= 1 (a node takes at least an even share), got {overload_factor}")
    if measured is not None:
        evaluated = np.asarray(measured, dtype=bool)
        if evaluated.shape != (trace.num_sequences,) or not evaluated.any():
            raise ValueError(f"measured must flag each of the trace's {trace.num_sequences} sequences, at least one "
                             f"True, got shape {evaluated.shape} with {int(evaluated.sum())} True")
    else:
        evaluated = evaluation_split(trace.seq_names) if predictor is not None else np.ones(trace.num_sequences, bool)
    events = trace.subset(evaluated[trace.seq])
    holders = _holders(placement, trace.num_layers, trace.num_experts)
    of_event, occurrence_seq = events.occurrences()
    if request_routing == "round_robin":
        node_of_seq = np.arange(trace.num_sequences) % (shard_nodes.max() + 1)
    else:
        node_of_seq = _affinity_nodes(events, of_event, occurrence_seq, evaluated, holders, shard_nodes, predictor,
                                      prompt_tokens, overload_factor)
    token_node = node_of_seq[events.seq]
    chosen = _serving_shards(events, holders, shard_nodes, token_node)
    valid = events.experts >= 0
    local = valid & (shard_nodes[np.maximum(chosen, 0)] == token_node[:, None])
    num_shards = len(shard_nodes)
    shard_load = np.bincount((events.layer[:, None] * num_shards + chosen)[valid],
                             minlength=trace.num_layers * num_shards).reshape(trace.num_layers, num_shards)
    busy = shard_load.sum(axis=1) > 0
    per_layer = shard_load[busy].max(axis=1) / shard_load[busy].mean(axis=1)
    total = shard_load.sum(axis=0)
    precision, recall = _prediction_quality(events, predictor)
    return {
        "fanout": float(distinct_per_row(np.where(valid, chosen, -1)).mean()),
        "local_fraction": float(local.sum() / valid.sum()),
        "cross_node_sends_per_token": float(distinct_per_row(np.where(valid & ~local, chosen, -1)).sum()
                                            / len(occurrence_seq)),
        "imbalance": float(total.max() / total.mean()),
        "imbalance_per_layer_max": float(per_layer.max()),
        "precision": precision,
        "recall": recall,
        "events": events.num_events,
        "tokens": len(occurrence_seq),
        "sequences": trace.num_sequences,
        "eval_sequences": int(evaluated.sum()),
    }


def _check(trace: RoutingTrace, placement: Placement, shard_nodes, predictor, request_routing: str,
           prompt_tokens: int) -> np.ndarray:
    if request_routing not in REQUEST_ROUTINGS:
        raise ValueError(f"request_routing must be one of {REQUEST_ROUTINGS}, got {request_routing!r}")
    if request_routing == "affinity" and predictor is None:
        raise ValueError("request_routing 'affinity' needs a predictor")
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    nodes = np.asarray(shard_nodes, dtype=np.int64)
    if nodes.shape != (placement.num_shards,) or (nodes < 0).any():
        raise ValueError(f"shard_nodes must give each of the placement's {placement.num_shards} shards a node >= 0, "
                         f"got {list(shard_nodes)}")
    layers = sorted(placement.shard_experts)
    if layers != list(range(trace.num_layers)):
        raise ValueError(f"the trace has {trace.num_layers} MoE layers (0..{trace.num_layers - 1}) but the placement "
                         f"places {len(layers)} (layers {layers[:3]}{'...' if len(layers) > 3 else ''})")
    if trace.num_experts > placement.num_experts:
        raise ValueError(f"the trace routes to {trace.num_experts} experts but the placement has "
                         f"{placement.num_experts}")
    placement.validate()
    return nodes


def _holders(placement: Placement, num_layers: int, num_experts: int) -> np.ndarray:
    """bool[L, E, S]: shard s holds expert e of layer l (the trace's experts: E <= the placement's)."""
    return placement.holder_matrix(list(range(num_layers)))[:, :num_experts]


def distinct_per_row(values: np.ndarray) -> np.ndarray:
    """int64[N]: distinct values >= 0 in each row of values int64[N, K]."""
    ordered = np.sort(values, axis=1)
    new = np.ones(ordered.shape, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (new & (ordered >= 0)).sum(axis=1)


def _serving_shards(events: RoutingTrace, holders: np.ndarray, shard_nodes: np.ndarray,
                    token_node: np.ndarray) -> np.ndarray:
    """int64[N, K]: the shard serving each (event, expert) pair, -1 for padding (module docstring)."""
    valid = events.experts >= 0
    expert = np.where(valid, events.experts, 0)
    layer = np.broadcast_to(events.layer[:, None], expert.shape)
    copies = holders.sum(axis=2)
    chosen = np.where(valid & (copies[layer, expert] == 1), holders.argmax(axis=2)[layer, expert], -1)
    row, slot = np.nonzero(valid & (copies[layer, expert] > 1))
    if row.size == 0:
        return chosen
    pair_layer, pair_expert = layer[row, slot], expert[row, slot]
    on_node = holders[pair_layer, pair_expert] & (shard_nodes[None, :] == token_node[row, None])
    single = on_node.sum(axis=1) == 1
    chosen[row[single], slot[single]] = on_node[single].argmax(axis=1)
    num_layers, num_shards = holders.shape[0], holders.shape[2]
    served = chosen >= 0
    load = np.bincount((layer * num_shards + chosen)[served], minlength=num_layers * num_shards)
    load = load.reshape(num_layers, num_shards).tolist()
    candidates_of: dict[tuple[int, int, int], list[int]] = {}
    for i, s, lay, e, node in zip(row[~single].tolist(), slot[~single].tolist(), pair_layer[~single].tolist(),
                                  pair_expert[~single].tolist(), token_node[row[~single]].tolist()):
        key = (lay, e, node)
        if key not in candidates_of:
            everywhere = np.nonzero(holders[lay, e])[0].tolist()
            candidates_of[key] = [h for h in everywhere if shard_nodes[h] == node] or everywhere
        visited = set(chosen[i].tolist())
        layer_load = load[lay]
        best = min(candidates_of[key], key=lambda h: (h not in visited, layer_load[h], h))
        chosen[i, s] = best
        layer_load[best] += 1
    return chosen


def _affinity_nodes(events: RoutingTrace, of_event: np.ndarray, occurrence_seq: np.ndarray, evaluated: np.ndarray,
                    holders: np.ndarray, shard_nodes: np.ndarray, predictor, prompt_tokens: int,
                    overload_factor: float) -> np.ndarray:
    """int64[S]: the node of each evaluated sequence (-1 for the others), by predicted locality
    under the overload cap (module docstring)."""
    num_nodes = int(shard_nodes.max()) + 1
    node_local = (holders.astype(np.float64) @ (shard_nodes[:, None] == np.arange(num_nodes)).astype(np.float64)) > 0
    occurrence_token = np.full(len(occurrence_seq), -1, dtype=np.int64)
    np.maximum.at(occurrence_token, of_event, events.token)
    sequences = np.nonzero(evaluated)[0]
    starts = np.searchsorted(occurrence_seq, sequences)  # occurrences are ordered by sequence, then position
    ends = np.minimum(np.searchsorted(occurrence_seq, sequences, side="right"), starts + prompt_tokens)
    cap = math.ceil(overload_factor * len(sequences) / num_nodes)
    taken = np.zeros(num_nodes, dtype=np.int64)
    node_of_seq = np.full(len(evaluated), -1, dtype=np.int64)
    for s, start, end in zip(sequences.tolist(), starts.tolist(), ends.tolist()):
        tokens = occurrence_token[start:end]
        score = np.einsum("le,len->n", predictor.expected_load(tokens), node_local)
        node = next(n for n in sorted(range(num_nodes), key=lambda n: (-score[n], n)) if taken[n] < cap)
        node_of_seq[s] = node
        taken[node] += 1
    return node_of_seq


def _prediction_quality(events: RoutingTrace, predictor) -> tuple[float | None, float | None]:
    """The predictor's top-k (k = the trace's) against the actual experts, over events with a
    token id: (precision, recall), micro-averaged; (None, None) without a predictor or token ids."""
    known = events.token >= 0
    if predictor is None or not known.any():
        return None, None
    hits = predicted = actual = 0
    for layer in range(events.num_layers):
        rows = np.nonzero(known & (events.layer == layer))[0]
        if rows.size == 0:
            continue
        distinct, inverse = np.unique(events.token[rows], return_inverse=True)
        guess = predictor.predict(distinct, layer, k=events.top_k)[0][inverse.reshape(-1)]
        truth = events.experts[rows]
        hits += int(((guess[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)).any(axis=2).sum())
        predicted += int((guess >= 0).sum())
        actual += int((truth >= 0).sum())
    return hits / predicted, hits / actual
