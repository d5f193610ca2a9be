"""The engine's plain parts: block manager, placement, dispatcher replica choice, sampler."""

import pytest
import torch

from moefleet import SamplingParams
from moefleet.cluster.engine.block_manager import BlockManager
from moefleet.cluster.engine.sampler import filtered_probs
from moefleet.cluster.engine.sequence import Sequence
from moefleet.cluster.experts.dispatcher import Dispatcher
from moefleet.cluster.experts.transport import InProcessTransport
from moefleet.cluster.placement.placement import Placement, round_robin_placement
from tests.conftest import shard_with_layer


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


def test_block_manager_reuses_warm_blocks_before_cached_prefixes():
    """Blocks without a prefix come back most recently freed first (their pages are mapped and
    warm); cached prefix blocks are taken last, oldest first, and forget their prefix."""
    blocks = BlockManager(num_blocks=6, block_size=2)
    a = Sequence("a", None, [1, 2, 3, 4, 5], SamplingParams())  # 3 blocks: two full, one partial
    blocks.allocate(a)
    assert a.block_table == [0, 1, 2]
    a.num_computed_tokens = 5
    blocks.register_full_blocks(a)
    blocks.free_sequence(a)  # blocks 0 and 1 keep the prefix; block 2 holds none
    b = Sequence("b", None, [9, 8, 7, 6, 5, 4, 3], SamplingParams())  # 4 blocks
    blocks.allocate(b)
    assert b.block_table == [2, 3, 4, 5]  # the warm block first, never-used ones next, prefixes kept
    c = Sequence("c", None, [7, 7, 7], SamplingParams())  # 2 blocks: only the prefix blocks are left
    blocks.allocate(c)
    assert c.block_table == [1, 0] and c.num_computed_tokens == 0  # a prefix's tail goes before its head
    blocks.free_sequence(c)
    d = Sequence("d", None, [1, 2, 3, 4, 5], SamplingParams())
    blocks.allocate(d)
    assert d.num_computed_tokens == 0  # a's prefix was forgotten when its blocks were taken


def test_placement_rejects_lost_experts():
    with pytest.raises(ValueError, match="layer 0 has no shard for experts \\[3\\]"):
        Placement(epoch=1, num_experts=4, shard_experts={0: ((0, 1), (2,))}).validate()
    p = round_robin_placement([0, 1], 8, 3, replicate={1: [0]})
    assert p.holders(1, 0) == [0, 1] and p.holders(0, 0) == [0]


def test_dispatcher_prefers_replicas_on_shards_the_token_already_visits():
    d, e = 4, 4
    placement = Placement(epoch=0, num_experts=e, shard_experts={0: ((0, 1), (1, 2, 3))})  # expert 1 on both
    shards = [shard_with_layer(s, e, 0, experts, torch.randn(len(experts), 2 * 3, d), torch.randn(len(experts), d, 3))
              for s, experts in enumerate(placement.shard_experts[0])]
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


def test_prometheus_metrics_count_tokens_traffic_and_fanout(engines):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from moefleet.cluster.engine.metrics import start_metrics_server

    llm = engines("mixtral", engine_shards=2, transport="local")
    spec = llm.engine.spec
    before = int(llm.engine.dispatcher.fanout[1] + llm.engine.dispatcher.fanout[2])
    llm.generate({"prompt_token_ids": list(range(3, 13))}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    server = start_metrics_server(llm.engine, model_name="tiny")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics").read().decode()
    finally:
        server.shutdown()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    visits = (10 + 2) * len(spec.moe_layer_indices)  # 10 prompt tokens + 2 decodes, per MoE layer
    assert samples[("moefleet_token_shard_fanout_bucket", (("le", "+Inf"),))] == before + visits
    assert samples[("moefleet_token_shard_fanout_count", ())] == before + visits
    layer0 = sum(v for (name, labels), v in samples.items()
                 if name == "moefleet_expert_tokens_total" and ("layer", "0") in labels)
    assert layer0 >= visits // len(spec.moe_layer_indices) * spec.moe.top_k
    assert ("moefleet_shard_sends_total", (("locality", "local"), ("shard", "1"))) in samples
    assert samples[("moefleet_shard_compute_seconds_total", (("shard", "0"),))] > 0
    assert samples[("vllm:num_requests_running", (("model_name", "tiny"),))] == 0  # the engine's state, too
