"""The sends a layout costs on a token sample (cluster/placement/sampled_sends.py): a hand-counted
golden case, and every single-expert gain against counting again from scratch."""

import numpy as np

from moefleet.cluster.placement.sampled_sends import SampledSends


def golden() -> tuple[SampledSends, np.ndarray]:
    """Shards 0, 1 on node 0 and 2, 3 on node 1; expert e on shard e, expert 3 also on shard 0.
    Tokens chose {0, 1}, {0, 2}, {2, 3}; a cross-node send costs 4, each sampled token stands for 2."""
    held = np.zeros((4, 4), dtype=bool)
    held[[0, 1, 2, 3, 3], [0, 1, 2, 3, 0]] = True
    paths = np.array([[0, 1], [0, 2], [2, 3]])[:, None, :]
    return SampledSends(paths, 2.0, np.array([0, 0, 1, 1]), 4.0, 4), held


def test_golden_servers_and_cost():
    sends, held = golden()
    # Seen from node 0, expert 3 is served by its copy on shard 0; from node 1, by shard 3.
    assert sends.servers(held).tolist() == [[0, 0], [1, 1], [2, 2], [0, 3]]
    # A send costs 1 on the token's node, 4 off it; each node weighs 1/2. Token {0, 1}: from node 0
    # shards 0, 1 (1 + 1), from node 1 the same shards (4 + 4): 10 / 2. Token {0, 2}: (1 + 4) +
    # (4 + 1): 10 / 2. Token {2, 3}: from node 0 shards 2 and 0 (4 + 1), from node 1 shards 2 and 3
    # (1 + 1): 7 / 2. Each times 2 tokens per sampled one.
    assert sends.cost(0, sends.servers(held)) == 2.0 * (10 + 10 + 7) / 2
    assert sends.cost(0, sends.servers(held), np.array([2])) == 2.0 * 7 / 2
    assert sends.tokens_of(0, [1, 3]).tolist() == [0, 2]


def test_golden_move_gain():
    sends, held = golden()
    # Expert 1 to shard 0, beside expert 0: token {0, 1} no longer sends to shard 1, which served
    # nothing else of it: from node 0 it saves 1 / 2, from node 1 4 / 2; times 2 tokens per sample.
    after = held.copy()
    after[1] = [True, False, False, False]
    gain = sends.change_gain(sends.tables(0, sends.servers(held)), np.array([1]), sends.servers(after[1:2]))
    assert gain.tolist() == [2.0 * 2.5]
    assert sends.cost(0, sends.servers(held)) - sends.cost(0, sends.servers(after)) == 2.0 * 2.5


def test_every_single_expert_gain_matches_a_recount():
    rng = np.random.default_rng(3)
    experts, shards, nodes = 10, 6, 3
    paths = np.stack([rng.choice(experts, 3, replace=False) for _ in range(200)])[:, None, :]
    paths[::7, 0, 2] = -1  # some tokens chose fewer
    sends = SampledSends(paths, 1.5, np.arange(shards) % nodes, 3.0, experts)
    held = np.zeros((experts, shards), dtype=bool)
    held[np.arange(experts), rng.integers(0, shards, experts)] = True
    held[rng.integers(0, experts, 4), rng.integers(0, shards, 4)] = True  # a few copies
    tables = sends.tables(0, sends.servers(held))
    before = sends.cost(0, sends.servers(held))
    for e in range(experts):
        for holders in rng.random((20, shards)) < 0.3:
            if not holders.any():
                continue
            after = held.copy()
            after[e] = holders
            gain = sends.change_gain(tables, np.array(e), sends.servers(holders))
            assert np.isclose(gain, before - sends.cost(0, sends.servers(after)))
