"""The token -> expert affinity model: which experts a token will choose at each MoE layer, learned
online from recorded routing. Pure: numpy and the standard library only.

Sem-MoE found a token's experts largely predictable from the token id, ExFlow found the experts of
consecutive layers correlated; the model keeps both statistics, decayed, in bounded memory.

Shapes: N token occurrences, L MoE layers, E experts per layer, K experts chosen per token (top_k),
C = min(E, SLOTS_PER_TOP_K x K) experts kept per token and layer.

Memory: 6 C + 16 bytes per kept token and layer (int16 expert and float32 count per slot, float64
n_t and r_t), 112 bytes at top-8: 336 MiB for 48 layers x 65536 tokens, plus 8 E^2 bytes of
transitions per layer (6 MiB for 48 x 128 experts). The table grows with the tokens seen, up to
max_tokens. observe needs a dense float64[U, E] per layer for the U distinct tokens of the batch.

Decay. Every count below is a decayed count of token occurrences: an occurrence weighs
2**(-m / half_life) once m further occurrences (of any token) have been observed. Counts are stored
multiplied by a global scale that grows with each observation (the newest occurrence is stored with
weight 2**(observed / half_life), rescaled now and then so it stays below 2**64), so observing
touches only the new data, never the whole table. `num_observed` is the clock: occurrences
observed, not decayed.

Tables, per layer l (all decayed):
  n_t       occurrences of the kept token t routed at l
  c_t(e)    those that chose e, for at most C experts per token (its slots: a token chooses few of
            E; when more compete, the C most chosen keep their slots, the rest move to r_t)
  r_t       choices of t for experts that lost or never got a slot
  N, M(e)   occurrences routed at l, and those that chose e (every token, unknown ones included)
  T(i, e)   occurrences that chose i at l - 1 and e at l;  F(i): chose i at l - 1 and were routed at l
At most `max_tokens` distinct tokens are kept, the same ones at every layer; when a new token needs a
row of a full table, the kept token seen least (decayed, over all layers) gives up its row if it was
seen no more than the newcomer in this batch (ties go to the newcomer, so stale tokens age out).

Predictions are activation probabilities, p(e) = P(the token chooses e at l), summing to about K.
With a = PRIOR_STRENGTH:
  prior       pi(e)  = (M(e) + a K / E) / (N + a)                      (uniform K / E with no data)
  token       p_t(e) = (c_t(e) + r_t q_t(e) + a pi(e)) / (n_t + a)
              q_t(e) = pi(e) / sum of pi over the experts outside t's slots, for e outside them, else 0
              A Bayesian-style shrinkage: the prior weighs as `a` occurrences, so an unseen token
              (n_t = 0) gets pi and a token seen n_t >> a times its own frequencies.
  transition  p_P(e) = (sum_{i in P} T(i, e) + a pi(e)) / (sum_{i in P} F(i) + a)
              for P the experts the token actually chose at l - 1 (known to the engine at run time).
  blend       logit p(e) = logit p_t(e) + logit p_P(e) - logit pi(e)
              Each expert's activation taken as a binary event with the token and the previous
              layer as independent evidence about it (naive Bayes in log-odds): a source that says
              nothing (p = pi) leaves the other unchanged, and two that agree sharpen each other
              (overconfident when both carry the same information).
Every p is clipped to [0, 1]. The confidence of a predicted set S of k experts is its expected
precision, the mean of p(e) over S: near 1 for a token that always routes the same way, near K / E
for one that routes uniformly.
"""

import base64
import math

import numpy as np

SLOTS_PER_TOP_K = 2  # experts kept per token and layer, per expert it chooses: room for some noise
PRIOR_STRENGTH = 1.0  # the prior's weight, in occurrences, in every shrinkage above
_MAX_LOG2_SCALE = 64.0  # stored counts are rescaled when the newest occurrence's weight passes 2**64
_MIN_ROWS = 256  # first allocation of the token table, which then doubles up to max_tokens
_LOGIT_CLIP = 1e-9
_STATE_VERSION = 1


class AffinityModel:
    """Per MoE layer: token -> expert counts, the layer's prior and layer -> layer transitions, with
    the predictions, expected loads and predicted shards drawn from them (module docstring).
    num_observed: token occurrences observed, unknown tokens included, not decayed (the decay's clock)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, max_tokens: int = 65536,
                 half_life: float = 1_000_000.0):
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 1 <= num_experts <= np.iinfo(np.int16).max:
            raise ValueError(f"num_experts must lie in [1, {np.iinfo(np.int16).max}], got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not half_life > 0:  # math.inf: no decay
            raise ValueError(f"half_life must be positive, got {half_life}")
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)
        self.max_tokens, self.half_life = int(max_tokens), float(half_life)
        self.slots = min(self.num_experts, SLOTS_PER_TOP_K * self.top_k)
        self.num_observed = 0
        self._log2_base = 0.0  # log2 of the scale the stored counts were divided by at the last rescale
        layers, experts = self.num_layers, self.num_experts
        self._picks = np.zeros((layers, experts))  # M(e), stored scale
        self._routed = np.zeros(layers)  # N
        self._transition = np.zeros((layers, experts, experts))  # T(i, e); layer 0's stays empty
        self._transition_from = np.zeros((layers, experts))  # F(i)
        # The token table: rows [0, _used) hold tokens; a row freed by eviction is reused at once.
        self._used = 0
        self._tokens = np.full(0, -1, dtype=np.int64)  # int64[R]: the token of each row
        self._seen = np.zeros(0)  # float64[R]: occurrences of the row's token, any layer
        self._occurrences = np.zeros((layers, 0))  # float64[L, R]: n_t
        self._residual = np.zeros((layers, 0))  # float64[L, R]: r_t
        self._slot_expert = np.full((layers, 0, self.slots), -1, dtype=np.int16)  # int16[L, R, C], -1 free
        self._slot_count = np.zeros((layers, 0, self.slots), dtype=np.float32)  # float32[L, R, C]: c_t(e)
        self._sorted_tokens = np.zeros(0, dtype=np.int64)  # the kept tokens, ascending, for lookups
        self._sorted_rows = np.zeros(0, dtype=np.int64)  # their rows

    @property
    def num_tokens(self) -> int:
        """Distinct tokens kept in the table (at most max_tokens)."""
        return self._used

    def known_tokens(self) -> np.ndarray:
        """int64[T]: the token ids kept in the table, ascending (others are predicted by the prior)."""
        return self._sorted_tokens.copy()

    def activations(self, tokens: np.ndarray, layer: int) -> np.ndarray:
        """float64[N, E]: p_t(e), the probability that each token chooses each expert at `layer`
        (from its own counts shrunk to the prior; the prior for a token not kept)."""
        return self._activation(self._check_layer(layer), self._check_tokens(tokens))

    # ---- learning -------------------------------------------------------------------------------

    def observe(self, tokens: np.ndarray, experts: np.ndarray) -> None:
        """tokens: int64[N] (-1 unknown); experts: int64[N, L, K] (-1 = none): one row per token
        occurrence, its chosen experts at every MoE layer. Occurrences count in order (the last is
        the newest). Unknown tokens, and tokens the full table does not admit, still count in the
        priors and the transitions."""
        tokens = self._check_tokens(tokens)
        experts = self._check_experts(experts, len(tokens))
        if len(tokens) == 0:
            return
        weight = self._take_weights(len(tokens))
        rows, group = self._admit(tokens, weight)
        # Counting is all np.bincount: "no expert" (-1) and "no row" count in one extra bin each,
        # dropped afterwards, which is cheaper than masking them out.
        num_experts, width = self.num_experts, self.num_experts + 1
        weight_per_choice = np.repeat(weight, self.top_k)  # float64[N * K]: experts[n, l, :] weigh weight[n]
        group = np.where(group >= 0, group, rows.size)
        previous = None
        for layer in range(self.num_layers):
            current = np.where(experts[:, layer] >= 0, experts[:, layer], num_experts)  # int64[N, K]
            routed = (current < num_experts).any(axis=1)
            self._picks[layer] += np.bincount(current.ravel(), weight_per_choice, minlength=width)[:num_experts]
            self._routed[layer] += weight[routed].sum()
            if previous is not None:
                self._observe_transition(layer, previous, current, routed, weight_per_choice)
            previous = current
            if rows.size:
                cells = (group[:, None] * width + current).ravel()
                batch_counts = np.bincount(cells, weight_per_choice, minlength=(rows.size + 1) * width)
                self._merge_slots(layer, rows, batch_counts.reshape(rows.size + 1, width)[:-1, :-1])
                routed_group = np.where(routed, group, rows.size)
                self._occurrences[layer, rows] += np.bincount(routed_group, weight, minlength=rows.size + 1)[:-1]

    def _take_weights(self, count: int) -> np.ndarray:
        """float64[count]: the stored weights of the next `count` occurrences (advances the clock)."""
        newest = (self.num_observed + count) / self.half_life - self._log2_base
        if newest > _MAX_LOG2_SCALE:
            self._rescale(newest)
        clock = self.num_observed + 1 + np.arange(count, dtype=np.float64)
        self.num_observed += count
        return np.exp2(clock / self.half_life - self._log2_base)

    def _rescale(self, log2_factor: float) -> None:
        """Divides every stored count by 2**log2_factor (rare: once per ~64 half-lives)."""
        factor = np.exp2(-log2_factor)
        for table in (self._picks, self._routed, self._transition, self._transition_from, self._seen,
                      self._occurrences, self._residual, self._slot_count):
            table *= factor
        self._log2_base += log2_factor

    def _unit(self) -> float:
        """The stored weight of one occurrence observed now: stored counts / this = decayed counts."""
        return float(np.exp2(self.num_observed / self.half_life - self._log2_base))

    def _observe_transition(self, layer: int, previous: np.ndarray, current: np.ndarray, routed: np.ndarray,
                            weight_per_choice: np.ndarray) -> None:
        """previous, current: int64[N, K] the experts at layer - 1 and layer (E for none); routed:
        bool[N]; weight_per_choice: float64[N * K], the weight of each of current's cells."""
        num_experts, width = self.num_experts, self.num_experts + 1
        counts = np.zeros(width * width)
        for source in previous.T:  # one column at a time: N x K cells, not N x K x K at once
            counts += np.bincount((source[:, None] * width + current).ravel(), weight_per_choice,
                                  minlength=width * width)
        self._transition[layer] += counts.reshape(width, width)[:num_experts, :num_experts]
        source = np.where(routed[:, None], previous, num_experts).ravel()
        self._transition_from[layer] += np.bincount(source, weight_per_choice, minlength=width)[:num_experts]

    def _admit(self, tokens: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The table rows of this batch's tokens, admitting new ones. Returns (rows int64[U]: the
        row of each distinct token kept, group int64[N]: per occurrence its index into rows, -1
        for an unknown token or one the full table did not admit)."""
        group = np.full(len(tokens), -1, dtype=np.int64)
        known = tokens >= 0
        if not known.any():
            return np.zeros(0, dtype=np.int64), group
        distinct, inverse = np.unique(tokens[known], return_inverse=True)
        batch_seen = np.bincount(inverse, weight[known], minlength=len(distinct))
        rows = self._lookup(distinct)
        new = rows < 0
        if new.any():
            rows[new] = self._place(distinct[new], batch_seen[new], protected=rows[~new])
        kept = rows >= 0
        self._seen[rows[kept]] += batch_seen[kept]
        index_among_kept = np.cumsum(kept) - 1
        group[known] = np.where(kept[inverse], index_among_kept[inverse], -1)
        return rows[kept], group

    def _place(self, tokens: np.ndarray, batch_seen: np.ndarray, protected: np.ndarray) -> np.ndarray:
        """Rows for new tokens (int64[n], -1 where not admitted): free rows first, most seen first,
        then rows of the least-seen kept tokens other than `protected` (rows this batch uses)."""
        rows = np.full(len(tokens), -1, dtype=np.int64)
        order = np.argsort(-batch_seen, kind="stable")
        free = min(len(tokens), self.max_tokens - self._used)
        self._reserve(self._used + free)
        rows[order[:free]] = np.arange(self._used, self._used + free)
        self._used += free
        waiting = order[free:]
        if waiting.size:
            evictable = np.ones(self._used, dtype=bool)
            evictable[protected] = False
            evictable[rows[order[:free]]] = False
            candidates = np.nonzero(evictable)[0]
            candidates = candidates[np.argsort(self._seen[candidates], kind="stable")]
            pairs = min(waiting.size, candidates.size)
            # Newcomers by decreasing weight against victims by increasing: the wins form a prefix.
            wins = int(np.count_nonzero(batch_seen[waiting[:pairs]] >= self._seen[candidates[:pairs]]))
            victims = candidates[:wins]
            self._clear(victims)
            rows[waiting[:wins]] = victims
        admitted = rows >= 0
        self._tokens[rows[admitted]] = tokens[admitted]
        used_tokens = self._tokens[:self._used]
        self._sorted_rows = np.argsort(used_tokens, kind="stable")
        self._sorted_tokens = used_tokens[self._sorted_rows]
        return rows

    def _reserve(self, rows: int) -> None:
        """Grows the token table to hold `rows` rows (doubling, up to max_tokens)."""
        capacity = len(self._tokens)
        if rows <= capacity:
            return
        grown = min(self.max_tokens, max(rows, 2 * capacity, _MIN_ROWS))
        extra = grown - capacity
        layers = self.num_layers
        self._tokens = np.concatenate([self._tokens, np.full(extra, -1, dtype=np.int64)])
        self._seen = np.concatenate([self._seen, np.zeros(extra)])
        self._occurrences = np.concatenate([self._occurrences, np.zeros((layers, extra))], axis=1)
        self._residual = np.concatenate([self._residual, np.zeros((layers, extra))], axis=1)
        self._slot_expert = np.concatenate(
            [self._slot_expert, np.full((layers, extra, self.slots), -1, dtype=np.int16)], axis=1)
        self._slot_count = np.concatenate(
            [self._slot_count, np.zeros((layers, extra, self.slots), dtype=np.float32)], axis=1)

    def _clear(self, rows: np.ndarray) -> None:
        self._seen[rows] = 0.0
        self._occurrences[:, rows] = 0.0
        self._residual[:, rows] = 0.0
        self._slot_expert[:, rows] = -1
        self._slot_count[:, rows] = 0.0

    def _merge_slots(self, layer: int, rows: np.ndarray, batch_counts: np.ndarray) -> None:
        """Adds batch_counts float64[U, E] (this batch's choices of the tokens in `rows`) to their
        slots: per token the C most chosen experts keep a slot, the other choices go to r_t."""
        counts = batch_counts
        slot_expert = self._slot_expert[layer, rows]
        held = slot_expert >= 0
        counts[np.nonzero(held)[0], slot_expert[held]] += self._slot_count[layer, rows][held]
        chosen = counts > 0
        per_row = chosen.sum(axis=1)
        new_expert = np.full((len(rows), self.slots), -1, dtype=np.int16)
        new_count = np.zeros((len(rows), self.slots), dtype=np.float32)
        # Most tokens chose no more experts than they have slots: each keeps them all, no selection.
        row, expert = np.nonzero(chosen)  # row by row, so a row's cells are consecutive
        position = np.arange(len(row)) - (np.cumsum(per_row) - per_row)[row]
        fits = per_row[row] <= self.slots
        row, expert, position = row[fits], expert[fits], position[fits]
        new_expert[row, position] = expert
        new_count[row, position] = counts[row, expert]
        over = np.nonzero(per_row > self.slots)[0]
        if over.size:
            over_counts = counts[over]
            dropped = self.num_experts - self.slots
            best = np.argpartition(over_counts, dropped, axis=1)[:, dropped:]
            kept = np.take_along_axis(over_counts, best, axis=1)
            new_expert[over], new_count[over] = best, kept
            self._residual[layer, rows[over]] += over_counts.sum(axis=1) - kept.sum(axis=1)
        self._slot_expert[layer, rows] = new_expert
        self._slot_count[layer, rows] = new_count

    def _lookup(self, tokens: np.ndarray) -> np.ndarray:
        """int64[n]: the row of each token, -1 where it is not kept."""
        if self._sorted_tokens.size == 0:
            return np.full(len(tokens), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(self._sorted_tokens, tokens), self._sorted_tokens.size - 1)
        found = self._sorted_tokens[position] == tokens
        return np.where(found, self._sorted_rows[position], -1)

    # ---- predicting -----------------------------------------------------------------------------

    def predict(self, tokens: np.ndarray, layer: int, k: int | None = None,
                previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(experts int64[N, k] best first, confidence float64[N] in [0, 1]); `previous`:
        int64[N, K] the actual experts at layer-1 when known (the engine knows them at run time).
        Ties go to the lower expert id. Confidence: the expected precision of the k experts."""
        tokens = self._check_tokens(tokens)
        layer = self._check_layer(layer)
        k = self.top_k if k is None else k
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"k must lie in [1, num_experts={self.num_experts}], got {k}")
        activation = self._activation(layer, tokens)
        if previous is not None:
            if layer == 0:
                raise ValueError("previous: layer 0 has no previous MoE layer")
            previous = self._check_choices("previous", previous, 2)
            if previous.shape[0] != len(tokens):
                raise ValueError(f"previous: expected {len(tokens)} rows (one per token), got {previous.shape[0]}")
            activation = _blend(activation, self._transition_activation(layer, previous), self._prior(layer))
        best = np.argsort(-activation, axis=1, kind="stable")[:, :k]
        confidence = np.take_along_axis(activation, best, axis=1).mean(axis=1)
        return best.astype(np.int64), np.clip(confidence, 0.0, 1.0)

    def expected_load(self, tokens: np.ndarray) -> np.ndarray:
        """float64[L, E]: expected activations per expert per layer for a batch of token ids (sums
        to N x top_k per layer): the tokens' p_t(e), summed and scaled to that total."""
        tokens = self._check_tokens(tokens)
        load = np.zeros((self.num_layers, self.num_experts))
        if len(tokens) == 0:
            return load
        distinct, multiplicity = np.unique(tokens, return_counts=True)
        for layer in range(self.num_layers):
            expected = multiplicity @ self._activation(layer, distinct)
            load[layer] = expected * (len(tokens) * self.top_k / expected.sum())
        return load

    def predicted_shards(self, tokens: np.ndarray, shard_of_expert: np.ndarray) -> np.ndarray:
        """int64[N, L]: per token and layer the shard expected to receive most of its routing,
        given shard_of_expert int64[L, E] (for replicated experts the caller passes one holder).
        Ties go to the lower shard id."""
        tokens = self._check_tokens(tokens)
        shard_of_expert = _integers("shard_of_expert", shard_of_expert, 2)
        if shard_of_expert.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"shard_of_expert: expected shape {(self.num_layers, self.num_experts)}, "
                             f"got {shard_of_expert.shape}")
        if shard_of_expert.min() < 0:
            raise ValueError(f"shard_of_expert: shard ids must be >= 0, got {shard_of_expert.min()}")
        shards = np.zeros((len(tokens), self.num_layers), dtype=np.int64)
        if len(tokens) == 0:
            return shards
        distinct, inverse = np.unique(tokens, return_inverse=True)
        for layer in range(self.num_layers):
            holder = shard_of_expert[layer]
            on_shard = np.zeros((self.num_experts, int(holder.max()) + 1))
            on_shard[np.arange(self.num_experts), holder] = 1.0
            shards[:, layer] = np.argmax(self._activation(layer, distinct) @ on_shard, axis=1)[inverse]
        return shards

    def _prior(self, layer: int) -> np.ndarray:
        """float64[E]: pi(e), the layer's smoothed activation rate."""
        unit = self._unit()
        uniform = self.top_k / self.num_experts
        return (self._picks[layer] / unit + PRIOR_STRENGTH * uniform) / (self._routed[layer] / unit + PRIOR_STRENGTH)

    def _activation(self, layer: int, tokens: np.ndarray) -> np.ndarray:
        """float64[N, E]: p_t(e) for each token (the prior for tokens not kept)."""
        unit = self._unit()
        prior = self._prior(layer)
        numerator = np.tile(PRIOR_STRENGTH * prior, (len(tokens), 1))
        denominator = np.full(len(tokens), PRIOR_STRENGTH)
        rows = self._lookup(tokens)
        known = np.nonzero(rows >= 0)[0]
        if known.size:
            kept_rows = rows[known]
            slot_expert = self._slot_expert[layer, kept_rows]
            held = slot_expert >= 0
            held_token = np.nonzero(held)[0]
            outside = np.tile(prior, (known.size, 1))
            outside[held_token, slot_expert[held]] = 0.0
            outside_total = outside.sum(axis=1)
            residual = self._residual[layer, kept_rows] / unit
            spread = np.divide(residual, outside_total, out=np.zeros(known.size), where=outside_total > 0)
            own = outside * spread[:, None]
            own[held_token, slot_expert[held]] += self._slot_count[layer, kept_rows][held] / unit
            numerator[known] += own
            denominator[known] += self._occurrences[layer, kept_rows] / unit
        return np.minimum(numerator / denominator[:, None], 1.0)

    def _transition_activation(self, layer: int, previous: np.ndarray) -> np.ndarray:
        """float64[N, E]: p_P(e) for previous int64[N, K'] (the experts chosen at layer - 1)."""
        unit = self._unit()
        prior = self._prior(layer)
        numerator = np.tile(PRIOR_STRENGTH * prior, (len(previous), 1))
        denominator = np.full(len(previous), PRIOR_STRENGTH)
        for column in previous.T:
            chosen = column >= 0
            numerator[chosen] += self._transition[layer, column[chosen]] / unit
            denominator[chosen] += self._transition_from[layer, column[chosen]] / unit
        return np.minimum(numerator / denominator[:, None], 1.0)

    # ---- state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-able (numbers, strings, lists): the settings, the clock and every table (numpy
        arrays as base64 of their bytes, exact). half_life None stands for math.inf."""
        used = self._used
        arrays = {"tokens": self._tokens[:used], "seen": self._seen[:used],
                  "occurrences": self._occurrences[:, :used], "residual": self._residual[:, :used],
                  "slot_expert": self._slot_expert[:, :used], "slot_count": self._slot_count[:, :used],
                  "picks": self._picks, "routed": self._routed, "transition": self._transition,
                  "transition_from": self._transition_from}
        return {"version": _STATE_VERSION, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "top_k": self.top_k, "max_tokens": self.max_tokens,
                "half_life": None if math.isinf(self.half_life) else self.half_life,
                "num_observed": self.num_observed, "log2_base": self._log2_base,
                "arrays": {name: _encode(array) for name, array in arrays.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "AffinityModel":
        """The model `state()` described, exactly."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state: version {state.get('version')!r} is not {_STATE_VERSION}")
        try:
            half_life = math.inf if state["half_life"] is None else state["half_life"]
            model = cls(state["num_layers"], state["num_experts"], state["top_k"], state["max_tokens"], half_life)
            model.num_observed, model._log2_base = int(state["num_observed"]), float(state["log2_base"])
            arrays = state["arrays"]
            used = int(arrays["tokens"]["shape"][0])
        except (KeyError, TypeError, IndexError) as missing:
            raise ValueError(f"state: missing or malformed field {missing}") from None
        if not 0 <= used <= model.max_tokens:
            raise ValueError(f"state: arrays.tokens must hold 0 to max_tokens={model.max_tokens} tokens")
        layers, experts, slots = model.num_layers, model.num_experts, model.slots
        model._reserve(used)
        model._used = used
        for name, table, shape in (("picks", model._picks, (layers, experts)), ("routed", model._routed, (layers,)),
                                   ("transition", model._transition, (layers, experts, experts)),
                                   ("transition_from", model._transition_from, (layers, experts))):
            table[...] = _decode(arrays, name, table.dtype, shape)
        model._tokens[:used] = _decode(arrays, "tokens", np.dtype(np.int64), (used,))
        model._seen[:used] = _decode(arrays, "seen", np.dtype(np.float64), (used,))
        model._occurrences[:, :used] = _decode(arrays, "occurrences", np.dtype(np.float64), (layers, used))
        model._residual[:, :used] = _decode(arrays, "residual", np.dtype(np.float64), (layers, used))
        model._slot_expert[:, :used] = _decode(arrays, "slot_expert", np.dtype(np.int16), (layers, used, slots))
        model._slot_count[:, :used] = _decode(arrays, "slot_count", np.dtype(np.float32), (layers, used, slots))
        model._sorted_rows = np.argsort(model._tokens[:used], kind="stable")
        model._sorted_tokens = model._tokens[:used][model._sorted_rows]
        return model

    # ---- input checks ---------------------------------------------------------------------------

    def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = _integers("tokens", tokens, 1)
        if tokens.size and tokens.min() < -1:
            raise ValueError(f"tokens: ids must be >= 0 (or -1 for unknown), got {tokens.min()}")
        return tokens

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an integer in [0, num_layers={self.num_layers}), got {layer!r}")
        return int(layer)

    def _check_experts(self, experts: np.ndarray, num_tokens: int) -> np.ndarray:
        experts = self._check_choices("experts", experts, 3)
        expected = (num_tokens, self.num_layers, self.top_k)
        if experts.shape != expected:
            raise ValueError(f"experts: expected shape (N, L, K) = {expected} (N from tokens), got {experts.shape}")
        return experts

    def _check_choices(self, name: str, choices: np.ndarray, ndim: int) -> np.ndarray:
        """Expert ids in [-1, E), no expert twice in one choice (the last axis)."""
        choices = _integers(name, choices, ndim)
        if choices.size == 0:
            return choices
        if choices.min() < -1 or choices.max() >= self.num_experts:
            raise ValueError(f"{name}: expert ids must lie in [-1, num_experts={self.num_experts}), "
                             f"got {choices.min()} to {choices.max()}")
        # Pairwise over the last axis (K is small), on a compact copy with that axis first: a few
        # times cheaper than sorting every row.
        columns = np.moveaxis(choices, -1, 0).astype(np.int16)
        for first in range(len(columns)):
            chosen = columns[first] >= 0
            for second in range(first + 1, len(columns)):
                if (chosen & (columns[first] == columns[second])).any():
                    raise ValueError(f"{name}: an expert appears twice in one token's choice")
        return choices


def _blend(token: np.ndarray, transition: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """float64[N, E]: sigmoid(logit token + logit transition - logit prior), prior float64[E]."""
    log_odds = _logit(token) + _logit(transition) - _logit(prior)
    return 1.0 / (1.0 + np.exp(-log_odds))


def _logit(probability: np.ndarray) -> np.ndarray:
    clipped = np.clip(probability, _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    return np.log(clipped) - np.log1p(-clipped)


def _integers(name: str, value: np.ndarray, ndim: int) -> np.ndarray:
    """`value` as int64 with `ndim` dimensions; ValueError naming `name` otherwise."""
    array = np.asarray(value)
    if array.size == 0 and array.dtype == np.float64:  # np.asarray([]) is float64
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected integers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _encode(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "base64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")}


def _decode(arrays: dict, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """arrays[name] (from _encode) as an array of `dtype` and `shape`; ValueError naming it otherwise."""
    try:
        field = arrays[name]
        data = base64.b64decode(field["base64"], validate=True)
        stored = np.dtype(field["dtype"])
        declared = tuple(field["shape"])
    except (KeyError, TypeError, ValueError) as bad:
        raise ValueError(f"state: arrays.{name} is missing or malformed ({bad})") from None
    if stored != dtype or declared != shape or len(data) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"state: arrays.{name} must be {dtype} of shape {shape}, got {stored} of shape {declared}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)
