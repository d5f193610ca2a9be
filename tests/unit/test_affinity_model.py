"""The token -> expert affinity model (cluster/routing/affinity.py): hand-computed golden cases, then
its behaviour on synthetic routers (trained, uniform, layer-correlated, shifting), eviction, the
state round trip and bad input."""

import json
import math

import numpy as np
import pytest

from moefleet.cluster.routing.affinity import PRIOR_STRENGTH, AffinityModel


def _golden_top2_model() -> AffinityModel:
    """2 layers, 4 experts, top-2, no decay. Four occurrences, experts per layer:
         token 5: layer 0 [0, 1], layer 1 [2, 3]
         token 5: layer 0 [0, 1], layer 1 [2, 0]
         token 6: layer 0 [2, 3], layer 1 [1, 0]
         unknown: layer 0 [0, 2], layer 1 none
    With a = PRIOR_STRENGTH = 1, pi(e) = (M(e) + a K / E) / (N + a):
      layer 0: N = 4, M = [3, 2, 2, 1]  -> pi0 = [3.5, 2.5, 2.5, 1.5] / 5 = [0.7, 0.5, 0.5, 0.3]
      layer 1: N = 3, M = [2, 1, 2, 1]  -> pi1 = [2.5, 1.5, 2.5, 1.5] / 4 = [0.625, 0.375, 0.625, 0.375]
    Transitions into layer 1 (rows: the expert at layer 0; the unknown token was not routed at 1):
      T = [[1, 0, 2, 1], [1, 0, 2, 1], [1, 1, 0, 0], [1, 1, 0, 0]],  F = [2, 2, 1, 1]"""
    assert PRIOR_STRENGTH == 1.0
    model = AffinityModel(num_layers=2, num_experts=4, top_k=2, half_life=math.inf)
    model.observe(np.array([5, 5, 6, -1]),
                  np.array([[[0, 1], [2, 3]], [[0, 1], [2, 0]], [[2, 3], [1, 0]], [[0, 2], [-1, -1]]]))
    return model


def test_golden_token_counts_blend_with_the_prior():
    model = _golden_top2_model()
    assert model.num_observed == 4 and model.num_tokens == 2
    # token 5, layer 0: n = 2, c = {0: 2, 1: 2}; p = (c + pi0) / (2 + 1) = [2.7, 2.5, 0.5, 0.3] / 3
    experts, confidence = model.predict(np.array([5]), layer=0, k=1)
    assert experts.tolist() == [[0]]
    np.testing.assert_allclose(confidence, [0.9], atol=1e-9)
    experts, confidence = model.predict(np.array([5]), layer=0)  # k defaults to top_k = 2
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(confidence, [(0.9 + 2.5 / 3) / 2], atol=1e-9)  # 0.8666...
    # token 5, layer 1: n = 2, c = {2: 2, 3: 1, 0: 1}; p = (c + pi1) / 3 = [1.625, 0.375, 2.625, 1.375] / 3
    experts, confidence = model.predict(np.array([5]), layer=1, k=2)
    assert experts.tolist() == [[2, 0]]
    np.testing.assert_allclose(confidence, [(2.625 + 1.625) / 3 / 2], atol=1e-9)  # 0.708333...
    # unseen (9) and unknown (-1) tokens get the prior pi0 = [0.7, 0.5, 0.5, 0.3]: the tie between
    # experts 1 and 2 goes to the lower id; confidence (0.7 + 0.5) / 2 = 0.6
    experts, confidence = model.predict(np.array([9, -1]), layer=0, k=2)
    assert experts.tolist() == [[0, 1], [0, 1]]
    np.testing.assert_allclose(confidence, [0.6, 0.6], atol=1e-9)


def test_golden_previous_layer_blend():
    model = _golden_top2_model()
    # Token 6 at layer 1 alone: n = 1, c = {1: 1, 0: 1}; p_t = (c + pi1) / 2 = [0.8125, 0.6875, 0.3125, 0.1875]
    experts, confidence = model.predict(np.array([6]), layer=1)
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(confidence, [(0.8125 + 0.6875) / 2], atol=1e-9)
    # With previous = {2, 3}: p_P = (T[2] + T[3] + pi1) / (F[2] + F[3] + 1) = [2.625, 2.375, 0.625, 0.375] / 3.
    # Odds p/(1-p) multiply, the prior's divide: odds = odds(p_t) * odds(p_P) / odds(pi1):
    #   e0: (13/3) * 7 / (5/3) = 91/5 -> 91/96      e1: 2.2 * 3.8 / 0.6 = 209/15 -> 209/224
    #   e2: (5/11) * (5/19) / (5/3) = 15/209 -> 15/224      e3: (3/13) * (1/7) / (3/5) = 5/91 -> 5/96
    experts, confidence = model.predict(np.array([6]), layer=1, k=4, previous=np.array([[2, 3]]))
    assert experts.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_allclose(confidence, [(91 / 96 + 209 / 224 + 15 / 224 + 5 / 96) / 4], atol=1e-9)
    experts, confidence = model.predict(np.array([6]), layer=1, k=2, previous=np.array([[2, 3]]))
    np.testing.assert_allclose(confidence, [79 / 84], atol=1e-9)  # (91/96 + 209/224) / 2
    # An unseen token says nothing (p_t = pi1), so the blend is p_P itself, and the previous layer
    # turns the prior's [0, 2] (pi1 = [0.625, 0.375, 0.625, 0.375]) into [0, 1] (p_P above).
    experts, confidence = model.predict(np.array([9]), layer=1)
    assert experts.tolist() == [[0, 2]]
    np.testing.assert_allclose(confidence, [0.625], atol=1e-9)
    experts, confidence = model.predict(np.array([9]), layer=1, previous=np.array([[3, 2]]))
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(confidence, [(2.625 + 2.375) / 3 / 2], atol=1e-9)
    # A previous row with no expert (-1) leaves the token's own prediction unchanged.
    experts, confidence = model.predict(np.array([6]), layer=1, previous=np.array([[-1, -1]]))
    assert experts.tolist() == [[0, 1]]
    np.testing.assert_allclose(confidence, [0.75], atol=1e-9)


def test_golden_expected_load_and_predicted_shards():
    model = _golden_top2_model()
    # Tokens [5, 5, 9]: layer 0: 2 * [0.9, 2.5/3, 0.5/3, 0.1] + pi0 = [2.5, 13/6, 5/6, 0.5] (sum 6 = N x K)
    # layer 1: 2 * [1.625, 0.375, 2.625, 1.375] / 3 + pi1 = [41/24, 0.625, 2.375, 31/24]
    load = model.expected_load(np.array([5, 5, 9]))
    np.testing.assert_allclose(load, [[2.5, 13 / 6, 5 / 6, 0.5], [41 / 24, 0.625, 2.375, 31 / 24]], atol=1e-9)
    np.testing.assert_allclose(load.sum(axis=1), [6.0, 6.0], atol=1e-9)
    assert model.expected_load(np.zeros(0, dtype=np.int64)).tolist() == [[0.0] * 4] * 2
    # Shards: layer 0 puts experts {0, 1} on shard 0 and {2, 3} on shard 1; layer 1 {0, 2} and {1, 3}.
    # token 5: layer 0 shard 0 (0.9 + 0.833 against 0.267), layer 1 shard 0 (1.417 against 0.583);
    # token 6: layer 0 p = (c + pi0) / 2 = [0.35, 0.25, 0.75, 0.65]: shard 1 (1.4 against 0.6),
    #          layer 1 [0.8125, 0.6875, 0.3125, 0.1875]: shard 0 (1.125 against 0.875).
    shard_of_expert = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    assert model.predicted_shards(np.array([5, 6, 5]), shard_of_expert).tolist() == [[0, 0], [1, 0], [0, 0]]


def test_golden_top1_choices_beyond_the_slots_go_to_the_residual():
    # top-1 of 4 experts: C = 2 slots per token. Six occurrences of token 7 choose, at layer 0,
    # experts 0, 0, 0, 1, 1, 2 (layer 1 always expert 3): slots {0: 3, 1: 2}, residual r = 1.
    model = AffinityModel(num_layers=2, num_experts=4, top_k=1, half_life=math.inf)
    model.observe(np.full(6, 7), np.array([[[e], [3]] for e in (0, 0, 0, 1, 1, 2)]))
    # pi0 = (M + 1/4) / (6 + 1) = [3.25, 2.25, 1.25, 0.25] / 7; the residual spreads over the experts
    # outside the slots in proportion to pi0: q = {2: 1.25/1.5 = 5/6, 3: 1/6}.
    # p = (c + r q + pi0) / (6 + 1) = [24.25/49, 16.25/49, (5/6 + 1.25/7)/7 = 85/588, (1/6 + 0.25/7)/7 = 17/588]
    experts, confidence = model.predict(np.array([7]), layer=0, k=1)
    assert experts.tolist() == [[0]]
    np.testing.assert_allclose(confidence, [24.25 / 49], atol=1e-9)
    experts, confidence = model.predict(np.array([7]), layer=0, k=4)
    assert experts.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_allclose(confidence, [(24.25 / 49 + 16.25 / 49 + 85 / 588 + 17 / 588) / 4], atol=1e-9)
    np.testing.assert_allclose(model.expected_load(np.array([7]))[0],
                               [24.25 / 49, 16.25 / 49, 85 / 588, 17 / 588], atol=1e-9)
    # Three more choose expert 2: counts {0: 3, 1: 2, 2: 3}, so expert 1 loses its slot (r = 1 + 2 = 3).
    # pi0 = (M + 1/4) / (9 + 1) with M = [3, 2, 4, 0] -> [0.325, 0.225, 0.425, 0.025]; q = {1: 0.9, 3: 0.1}
    # p = (c + r q + pi0) / (9 + 1) = [3.325, 2.925, 3.425, 0.325] / 10
    model.observe(np.full(3, 7), np.array([[[2], [3]]] * 3))
    experts, confidence = model.predict(np.array([7]), layer=0, k=2)
    assert experts.tolist() == [[2, 0]]
    np.testing.assert_allclose(confidence, [(0.3425 + 0.3325) / 2], atol=1e-9)
    np.testing.assert_allclose(model.expected_load(np.array([7]))[0], [0.3325, 0.2925, 0.3425, 0.0325], atol=1e-9)


# ---- synthetic routers ---------------------------------------------------------------------------------------------

def _random_sets(rng: np.random.Generator, shape: tuple[int, ...], num_experts: int, top_k: int) -> np.ndarray:
    """int64[*shape, top_k]: distinct experts drawn uniformly per cell."""
    return np.argsort(rng.random((*shape, num_experts)), axis=-1)[..., :top_k]


def _trained_routing(rng, table: np.ndarray, tokens: np.ndarray, noise: float) -> np.ndarray:
    """table int64[V, L, K]: each token's fixed experts per layer; with probability `noise` an
    occurrence's choice at a layer is a uniformly random set instead."""
    num_experts = int(table.max()) + 1
    chosen = table[tokens].copy()
    noisy = rng.random(chosen.shape[:2]) < noise
    chosen[noisy] = _random_sets(rng, chosen.shape[:2], num_experts, table.shape[2])[noisy]
    return chosen


def _precision(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of predicted experts [N, k] that the actual choice [N, K] holds."""
    return float((predicted[:, :, None] == actual[:, None, :]).any(axis=2).mean())


LAYERS, EXPERTS, TOP_K, VOCAB = 3, 16, 2, 200


def test_trained_router_is_predicted_with_high_precision_and_confidence():
    rng = np.random.default_rng(0)
    table = _random_sets(rng, (VOCAB, LAYERS), EXPERTS, TOP_K)
    model = AffinityModel(LAYERS, EXPERTS, TOP_K)
    train = rng.integers(0, VOCAB, 4000)
    model.observe(train, _trained_routing(rng, table, train, noise=0.1))
    held_out = rng.integers(0, VOCAB, 2000)
    actual = _trained_routing(rng, table, held_out, noise=0.1)
    for layer in range(LAYERS):
        predicted, confidence = model.predict(held_out, layer)
        assert _precision(predicted, actual[:, layer]) >= 0.85
        assert confidence.mean() >= 0.8
        if layer:
            with_previous, _ = model.predict(held_out, layer, previous=actual[:, layer - 1])
            assert _precision(with_previous, actual[:, layer]) >= 0.85
    # The expected load of the held-out batch is close to what it routed.
    actual_load = np.stack([np.bincount(actual[:, layer].ravel(), minlength=EXPERTS) for layer in range(LAYERS)])
    load = model.expected_load(held_out)
    np.testing.assert_allclose(load.sum(axis=1), len(held_out) * TOP_K)
    assert np.abs(load - actual_load).sum() / actual_load.sum() < 0.1


def test_uniform_router_is_predicted_at_chance_with_low_confidence():
    rng = np.random.default_rng(1)
    model = AffinityModel(LAYERS, EXPERTS, TOP_K)
    train = rng.integers(0, VOCAB, 4000)
    model.observe(train, _random_sets(rng, (len(train), LAYERS), EXPERTS, TOP_K))
    held_out = rng.integers(0, VOCAB, 4000)
    actual = _random_sets(rng, (len(held_out), LAYERS), EXPERTS, TOP_K)
    chance = TOP_K / EXPERTS  # 0.125
    for layer in range(LAYERS):
        predicted, confidence = model.predict(held_out, layer)
        assert abs(_precision(predicted, actual[:, layer]) - chance) < 0.03
        # ~20 occurrences per token: the top counts stand somewhat above chance, never near certainty
        assert confidence.mean() < 0.3


def test_previous_layer_helps_when_the_token_says_nothing():
    # Tokens route uniformly at layer 0, and layer 1 maps each layer-0 expert e to (3e + 1) mod E.
    rng = np.random.default_rng(2)
    model = AffinityModel(2, EXPERTS, TOP_K)

    def routing(count):
        first = _random_sets(rng, (count,), EXPERTS, TOP_K)
        return np.stack([first, (3 * first + 1) % EXPERTS], axis=1)

    train = rng.integers(0, VOCAB, 4000)
    model.observe(train, routing(len(train)))
    held_out = rng.integers(0, VOCAB, 2000)
    actual = routing(len(held_out))
    alone, _ = model.predict(held_out, 1)
    blended, _ = model.predict(held_out, 1, previous=actual[:, 0])
    assert _precision(alone, actual[:, 1]) < 0.2
    assert _precision(blended, actual[:, 1]) == 1.0


def test_workload_shift_flips_the_prediction_after_about_a_half_life():
    rng = np.random.default_rng(3)
    half_life, vocab = 2000, 20
    before = _random_sets(rng, (vocab, 1), 4, 2)  # experts 0-3 ...
    after = before + 4  # ... then 4-7: each token's choice moves to a disjoint set
    model = AffinityModel(1, 8, 2, half_life=half_life)
    steady = rng.integers(0, vocab, 10 * half_life)  # long enough that the old counts are at steady state
    model.observe(steady, before[steady])
    probe = np.arange(vocab)

    def share_predicting(sets):
        return (np.sort(model.predict(probe, 0)[0], axis=1) == np.sort(sets[:, 0], axis=1)).all(axis=1).mean()

    assert share_predicting(before) == 1.0
    flipped_after = None
    for batch in range(40):
        tokens = rng.integers(0, vocab, 100)
        model.observe(tokens, after[tokens])
        if share_predicting(after) >= 0.5:
            flipped_after = (batch + 1) * 100
            break
    # Old counts weigh 2**(-t / h), new ones 1 - 2**(-t / h): for most tokens they cross near t = h.
    assert flipped_after is not None and 0.7 * half_life <= flipped_after <= 1.3 * half_life


def test_decay_is_the_same_in_one_batch_or_many_and_survives_rescaling():
    # half_life 3: the stored scale passes 2**64 after ~192 occurrences, so 600 rescale several times.
    # 4 experts, top-2: every expert has a slot (C = 4), so no choice of slots depends on the batching.
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 30, 600)
    experts = _random_sets(rng, (600, 2), 4, 2)
    whole, pieces = AffinityModel(2, 4, 2, half_life=3.0), AffinityModel(2, 4, 2, half_life=3.0)
    whole.observe(tokens, experts)
    for start in range(0, 600, 37):
        pieces.observe(tokens[start:start + 37], experts[start:start + 37])
    probe = np.arange(-1, 31)
    for layer in range(2):
        for model in (whole, pieces):
            assert np.isfinite(model.predict(probe, layer)[1]).all()
        np.testing.assert_allclose(whole.expected_load(probe), pieces.expected_load(probe), rtol=1e-6)
        np.testing.assert_array_equal(whole.predict(probe, layer, k=1)[0], pieces.predict(probe, layer, k=1)[0])
    # With h = 3, only the last few occurrences matter: the newest token's last choice is top-ranked.
    experts_now = whole.predict(tokens[-1:], 0, k=2)[0]
    assert set(experts_now[0]) == set(experts[-1, 0])


def test_eviction_keeps_memory_bounded_and_the_frequent_tokens():
    rng = np.random.default_rng(5)
    frequent = np.arange(10)
    table = _random_sets(rng, (1000, 2), EXPERTS, TOP_K)
    model = AffinityModel(2, EXPERTS, TOP_K, max_tokens=50, half_life=math.inf)
    for batch in range(30):
        rare = 100 + batch * 30 + np.arange(30)  # each rare token seen once, 900 in all
        tokens = np.concatenate([np.repeat(frequent, 3), rare])
        model.observe(tokens, table[tokens])
        assert model.num_tokens <= 50
    assert model.num_tokens == 50
    assert model.state()["arrays"]["slot_count"]["shape"] == [2, 50, 4]
    assert len(model._tokens) == 50  # the table never grows past max_tokens rows
    predicted, confidence = model.predict(frequent, 1)
    assert (np.sort(predicted, axis=1) == np.sort(table[frequent, 1], axis=1)).all()
    assert confidence.min() > 0.9
    # An early rare token was evicted: it gets the layer's prior, like a token never seen.
    np.testing.assert_allclose(model.predict(np.array([100]), 0)[1], model.predict(np.array([99999]), 0)[1])


def test_state_round_trips_through_json_exactly():
    rng = np.random.default_rng(6)
    model = AffinityModel(LAYERS, EXPERTS, TOP_K, max_tokens=64, half_life=500.0)
    tokens = rng.integers(-1, 150, 3000)  # more tokens than rows: evictions, and unknown tokens
    table = _random_sets(rng, (150, LAYERS), EXPERTS, TOP_K)
    model.observe(tokens, table[tokens])
    restored = AffinityModel.from_state(json.loads(json.dumps(model.state())))
    assert restored.num_observed == model.num_observed and restored.num_tokens == model.num_tokens == 64
    probe = np.arange(-1, 150)
    shard_of_expert = np.tile(np.arange(EXPERTS) % 4, (LAYERS, 1))
    for layer in range(LAYERS):
        for a, b in zip(model.predict(probe, layer), restored.predict(probe, layer), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.expected_load(probe), restored.expected_load(probe))
    np.testing.assert_array_equal(model.predicted_shards(probe, shard_of_expert),
                                  restored.predicted_shards(probe, shard_of_expert))
    # Both keep learning the same way.
    more = rng.integers(0, 150, 500)
    model.observe(more, table[more])
    restored.observe(more, table[more])
    assert json.dumps(model.state()) == json.dumps(restored.state())
    # No decay (half_life inf) is stored as null, which strict JSON accepts.
    endless = AffinityModel(1, 4, 1, half_life=math.inf)
    assert json.loads(json.dumps(endless.state(), allow_nan=False))["half_life"] is None
    assert AffinityModel.from_state(endless.state()).half_life == math.inf


# ---- bad input -----------------------------------------------------------------------------------------------------

def _bad_state(change) -> dict:
    state = _golden_top2_model().state()
    change(state)
    return state


@pytest.mark.parametrize("call, name", [
    (lambda m: m.observe(np.array([[1, 2]]), np.zeros((1, 2, 2), dtype=np.int64)), "tokens"),
    (lambda m: m.observe(np.array([1.5]), np.zeros((1, 2, 2), dtype=np.int64)), "tokens"),
    (lambda m: m.observe(np.array([-2]), np.zeros((1, 2, 2), dtype=np.int64)), "tokens"),
    (lambda m: m.observe(np.array([1, 2]), np.zeros((1, 2, 2), dtype=np.int64)), "experts"),
    (lambda m: m.observe(np.array([1]), np.zeros((1, 3, 2), dtype=np.int64)), "experts"),
    (lambda m: m.observe(np.array([1]), np.array([[[0, 1, 2], [0, 1, 2]]])), "experts"),
    (lambda m: m.observe(np.array([1]), np.array([[[0, 4], [0, 1]]])), "experts"),
    (lambda m: m.observe(np.array([1]), np.array([[[0, -2], [0, 1]]])), "experts"),
    (lambda m: m.observe(np.array([1]), np.array([[[3, 3], [0, 1]]])), "experts"),
    (lambda m: m.predict(np.array([1]), layer=2), "layer"),
    (lambda m: m.predict(np.array([1]), layer=-1), "layer"),
    (lambda m: m.predict(np.array([1]), layer=0, k=0), "k"),
    (lambda m: m.predict(np.array([1]), layer=0, k=5), "k"),
    (lambda m: m.predict(np.array([1]), layer=0, previous=np.array([[0, 1]])), "previous"),
    (lambda m: m.predict(np.array([1]), layer=1, previous=np.array([[0, 1], [1, 2]])), "previous"),
    (lambda m: m.predict(np.array([1]), layer=1, previous=np.array([[0, 9]])), "previous"),
    (lambda m: m.predicted_shards(np.array([1]), np.zeros((2, 3), dtype=np.int64)), "shard_of_expert"),
    (lambda m: m.predicted_shards(np.array([1]), np.full((2, 4), -1)), "shard_of_expert"),
    (lambda m: AffinityModel.from_state(_bad_state(lambda s: s.pop("arrays"))), "state"),
    (lambda m: AffinityModel.from_state(_bad_state(lambda s: s.update(version=99))), "state"),
    (lambda m: AffinityModel.from_state(_bad_state(lambda s: s["arrays"]["picks"].update(shape=[4, 2]))), "state"),
])
def test_bad_input_names_the_argument(call, name):
    model = _golden_top2_model()
    with pytest.raises(ValueError, match=name):
        call(model)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_layers": 0}, "num_layers"), ({"num_experts": 0}, "num_experts"), ({"top_k": 5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"half_life": 0.0}, "half_life"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    settings = {"num_layers": 2, "num_experts": 4, "top_k": 2} | kwargs
    with pytest.raises(ValueError, match=name):
        AffinityModel(**settings)
