"""Engine behaviour: stop conditions, logprobs, streaming, cancellation, preemption, chunked prefill."""

import pytest
import torch

from moefleet import SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def test_stop_token_ids_and_eos(engines):
    llm = engines("mixtral")
    full = llm.generate("Hello there", GREEDY)[0].outputs[0]
    stop_at = full.token_ids[5]
    first = full.token_ids.index(stop_at)
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_strings_truncate_text(engines):
    llm = engines("olmoe")
    full = llm.generate("Hello there", GREEDY)[0].outputs[0]
    # A 3-character stop string from the output, clear of whitespace (the tokenizer is trained
    # afresh on each machine, so which text comes out is not fixed).
    start = next((i for i in range(3, len(full.text) - 2) if not any(c.isspace() for c in full.text[i:i + 3])), None)
    assert start is not None, full.text
    needle = full.text[start:start + 3]
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[needle]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == needle
    assert out.text == full.text[: full.text.index(needle)]
    kept = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=needle,
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[: full.text.index(needle) + len(needle)]


def test_logprobs_hold_sampled_token_and_top_k(engines):
    llm = engines("qwen2_moe")
    out = llm.generate("Hi", SamplingParams(temperature=0.8, seed=3, max_tokens=8, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 8
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())
        top = sorted(entry.values(), reverse=True)[:3]
        assert abs(sum(torch.tensor(top).exp()).item()) <= 1.0 + 1e-5
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_streaming_equals_generate_and_cancel_frees_blocks(engines):
    llm = engines("deepseek_v3")
    blocks = llm.engine.blocks
    expected = llm.generate("Stream me", GREEDY)[0].outputs[0]
    pieces = list(llm.stream("Stream me", GREEDY))
    assert [len(p.outputs[0].token_ids) for p in pieces] == list(range(1, 33))
    assert pieces[-1].outputs[0].token_ids == expected.token_ids and pieces[-1].finished
    assert pieces[-1].outputs[0].text == expected.text

    stream = llm.stream({"prompt_token_ids": list(range(3, 200))}, GREEDY)
    next(stream)
    assert blocks.num_free_blocks < blocks.num_blocks
    stream.close()  # the caller goes away
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not llm.engine.requests


def test_abort_by_request_id(engines):
    llm = engines("qwen3_moe")
    seq = llm.engine.add_request("abort me", GREEDY, request_id="r1")
    llm.engine.step()
    assert llm.engine.abort("r1") and seq.finish_reason == "abort"
    assert not llm.engine.abort("r1")
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_preemption_when_blocks_run_out_loses_nothing(engines):
    ample = engines("mixtral")
    # 12 blocks of 16 tokens cannot hold 6 sequences of 30 + 32 tokens at once: the scheduler must preempt.
    tight = engines("mixtral", kv_cache_blocks=12)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(ample.engine.spec.vocab_size, (30,) * 6, seed=9)]
    expected = ample.generate(prompts, GREEDY)
    got = tight.generate(prompts, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert tight.engine.blocks.num_free_blocks == 12


def test_chunked_prefill_matches_whole_prefill(engines):
    whole = engines("qwen2_moe")
    chunked = engines("qwen2_moe", max_num_batched_tokens=24)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(whole.engine.spec.vocab_size, (100, 5, 61), seed=10)]
    expected = whole.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == [o.outputs[0].token_ids for o in expected]


def test_one_token_prefill_chunks_beside_decodes_do_not_sample(engines):
    # A budget of 4 with 3 sequences decoding leaves one token for the next prompt: a one-token
    # prefill chunk right after the decodes, attended with them, whose logits must not be sampled.
    whole = engines("mixtral")
    tight = engines("mixtral", max_num_batched_tokens=4)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(whole.engine.spec.vocab_size, (1, 1, 1, 9, 6), seed=12)]
    run, seen, rows = tight.engine.runner.run, [], []

    def spy(chunks, all_rows=False):
        logits = run(chunks, all_rows)
        seen.extend(c for c in chunks if c.num_tokens == 1 and not c.samples)
        rows.append((logits.shape[0], sum(c.samples for c in chunks)))
        return logits

    tight.engine.runner.run = spy
    try:
        got = tight.generate(prompts, GREEDY)
    finally:
        del tight.engine.runner.run
    assert seen, "the budget never produced a one-token chunk that does not sample"
    assert all(n == sampling for n, sampling in rows), "one logits row per chunk that samples"
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in whole.generate(prompts, GREEDY)]


def test_repetition_penalty_and_min_p_change_sampling_deterministically(engines):
    llm = engines("mixtral")
    base = llm.generate("Once", GREEDY)[0].outputs[0].token_ids
    penalised = llm.generate("Once", SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, repetition_penalty=5.0))[0]
    assert len(set(penalised.outputs[0].token_ids)) > len(set(base))  # a strong penalty avoids repeats
    a = llm.generate("Once", SamplingParams(temperature=1.0, min_p=0.5, seed=4, max_tokens=16, ignore_eos=True))[0]
    b = llm.generate("Once", SamplingParams(temperature=1.0, min_p=0.5, seed=4, max_tokens=16, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_chat_uses_the_checkpoint_template(engines):
    llm = engines("mixtral")
    tokenizer = llm.get_tokenizer()
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert tokenizer.decode(out.prompt_token_ids).endswith("<|assistant|>\n")


def test_expert_load_counters_count_every_routed_token(engines):
    llm = engines("qwen3_moe", load_window_steps=1000)
    before = llm.engine.load.window().sum(axis=1)
    llm.generate({"prompt_token_ids": list(range(3, 23))}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    spec = llm.engine.spec
    routed = llm.engine.load.window().sum(axis=1) - before
    # 20 prompt tokens + 4 decode steps, top_k choices each, in every MoE layer
    assert routed.tolist() == [(20 + 4) * spec.moe.top_k] * len(spec.moe_layer_indices)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_two_microbatch_overlap_gives_the_same_tokens(arch, engines):
    plain = engines(arch)
    overlapped = engines(arch, engine_shards=2, transport="local", overlap_microbatches=True)
    assert overlapped.engine.runner.overlap
    prompts = [{"prompt_token_ids": p} for p in random_prompts(plain.engine.spec.vocab_size, (4, 37, 9, 21), seed=12)]
    expected = plain.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in overlapped.generate(prompts, GREEDY)] == [o.outputs[0].token_ids for o in expected]
