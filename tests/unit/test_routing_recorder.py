"""The routing recorder: what it records is what the router chose (transformers' router logits as
the reference), it samples the token stream at its rate and keeps whole paths, its buffer stays
bounded, and recording changes no token."""

import pytest
import torch

from moefleet import SamplingParams
from moefleet.cluster.engine.routing_recorder import RecordedTokens
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_recorded_experts_are_the_routers_choice(engines, hf_model, arch):
    llm = engines(arch, routing_sample_rate=1.0, max_num_batched_tokens=5)  # the prompt in 3 chunks
    llm.engine.routing.take()
    prompt = random_prompts(llm.engine.spec.vocab_size, [13], seed=3)[0]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))
    recorded = llm.engine.routing.take()
    assert len(recorded) > 1  # a step per prefill chunk: joined in order, as a replica hands them on
    merged = RecordedTokens.concatenate(recorded)
    positions, tokens, experts = (torch.from_numpy(a) for a in (merged.positions, merged.tokens, merged.experts))
    assert len(merged.request_ids) == len(positions)
    assert positions.tolist() == list(range(13)) and tokens.tolist() == prompt  # every prompt token, once
    with torch.no_grad():
        router_logits = hf_model(arch)(torch.tensor([prompt]), output_router_logits=True).router_logits
    top_k = llm.engine.spec.moe.top_k
    assert experts.shape == (13, len(router_logits), top_k)
    for layer, logits in enumerate(router_logits):
        expected = logits.reshape(13, -1).topk(top_k, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(experts[:, layer].sort(dim=-1).values, expected), f"layer {layer}"


def test_sampling_takes_every_stride_th_token_with_its_whole_path(engines):
    llm = engines("mixtral", routing_sample_rate=0.25)
    recorder = llm.engine.routing
    recorder.take()
    prompts = random_prompts(llm.engine.spec.vocab_size, [17, 9, 30], seed=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    recorded = recorder.take()
    run = sum(len(p) for p in prompts) + 3 * (GREEDY.max_tokens - 1)  # the last sampled token is never run
    sampled = sum(len(r.request_ids) for r in recorded)
    assert abs(sampled - run / 4) <= 1
    sequences = {o.request_id: o.prompt_token_ids + o.outputs[0].token_ids for o in outputs}
    for r in recorded:
        assert (r.experts >= 0).all()  # every MoE layer of every sampled token
        for request_id, position, token in zip(r.request_ids, r.positions, r.tokens):
            assert sequences[request_id][position] == token
    events = recorded[0].events()
    assert {e.layer for e in events} == set(range(len(llm.engine.spec.moe_layer_indices)))
    assert all(len(e.experts) == llm.engine.spec.moe.top_k for e in events)


def test_the_buffer_keeps_the_newest_tokens_and_counts_the_dropped(engines):
    llm = engines("mixtral", routing_sample_rate=1.0)
    spec = llm.engine.spec
    llm.engine.record_routing(1.0, capacity_tokens=20)
    small = llm.engine.routing
    prompts = random_prompts(spec.vocab_size, [12, 12, 12], seed=5)
    for p in prompts:
        llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1))
    kept = small.take()
    assert sum(len(r.request_ids) for r in kept) <= 20 and small.dropped_tokens == 36 - sum(
        len(r.request_ids) for r in kept)
    assert kept[-1].tokens.tolist() == prompts[-1]  # the newest step is kept


def test_recording_changes_no_token(engines):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(1000, [5, 40, 23], seed=6)]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=20)
    off = engines("qwen2_moe", routing_sample_rate=0.0).generate(prompts, params)
    on = engines("qwen2_moe", routing_sample_rate=1.0).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]


def test_a_bad_rate_is_refused():
    from moefleet.cluster.engine.routing_recorder import RoutingRecorder

    with pytest.raises(ValueError, match="sample_rate"):
        RoutingRecorder([0, 1], 2, 1.5)
