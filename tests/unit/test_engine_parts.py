"""The engine's plain parts: block manager, placement, dispatcher replica choice, sampler."""

import pytest
import torch

from moefleet import SamplingParams
from moefleet.actors.expert_shard import ExpertShard
from moefleet.cluster.block_manager import BlockManager
from moefleet.cluster.dispatcher import Dispatcher
from moefleet.cluster.placement import Placement, round_robin_placement
from moefleet.cluster.sampler import filtered_probs
from moefleet.cluster.sequence import Sequence
from moefleet.cluster.transport import InProcessTransport


def test_block_manager_shares_prefix_blocks_and_frees_them():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a = Sequence("a", None, list(range(10)), SamplingParams())
    blocks.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed_tokens == 0
    a.num_computed_tokens = 10
    blocks.register_full_blocks(a)
    b = Sequence("b", None, list(range(8)) + [99], SamplingParams())
    blocks.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    first_block = a.block_table[0]
    blocks.free_sequence(a)
    blocks.free_sequence(b)
    assert blocks.num_free_blocks == 8
    # a prompt that is entirely cached still computes its last block privately
    c = Sequence("c", None, list(range(8)), SamplingParams())
    blocks.allocate(c)
    assert c.num_computed_tokens == 4 and c.block_table[0] == first_block


def test_placement_rejects_lost_experts():
    with pytest.raises(ValueError, match="layer 0 has no shard for experts \\[3\\]"):
        Placement(epoch=1, num_experts=4, shard_experts={0: ((0, 1), (2,))}).validate()
    p = round_robin_placement([0, 1], 8, 3, replicate={1: [0]})
    assert p.holders(1, 0) == [0, 1] and p.holders(0, 0) == [0]


def test_dispatcher_prefers_replicas_on_shards_the_token_already_visits():
    d, e = 4, 4
    placement = Placement(epoch=0, num_experts=e, shard_experts={0: ((0, 1), (1, 2, 3))})  # expert 1 on both
    shards = []
    for s, experts in enumerate(placement.shard_experts[0]):
        shard = ExpertShard(s, e)
        shard.set_layer(0, experts, torch.randn(len(experts), 2 * 3, d), torch.randn(len(experts), d, 3))
        shards.append(shard)
    calls = []

    class Recording(InProcessTransport):
        def send(self, work):
            calls.extend((w.shard, w.experts.tolist()) for w in work)
            return super().send(work)

    dispatcher = Dispatcher(placement, Recording(shards))
    ids = torch.tensor([[0, 1], [2, 1]])  # token 0 visits shard 0, token 1 visits shard 1
    dispatcher.combine(0, torch.randn(2, d), torch.ones(2, 2), ids)
    assert dict(calls) == {0: [0, 1], 1: [2, 1]}  # each token touches one shard only


def test_top_k_top_p_min_p_filters():
    seqs = lambda **kw: [Sequence("x", None, [1], SamplingParams(**kw))]  # noqa: E731
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filtered_probs(logits, seqs(top_k=2)) > 0).tolist() == [[True, True, False, False]]
    assert (filtered_probs(logits, seqs(top_p=0.7)) > 0).tolist() == [[True, True, False, False]]
    assert (filtered_probs(logits, seqs(top_p=0.1)) > 0).tolist() == [[True, False, False, False]]
    assert (filtered_probs(logits, seqs(min_p=0.5)) > 0).tolist() == [[True, True, False, False]]
    probs = filtered_probs(logits, seqs(top_k=3))
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
