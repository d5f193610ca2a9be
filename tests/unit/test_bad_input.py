"""Bad input raises a clear error naming the field; the engine keeps serving the others."""

import math

import pytest

from moefleet import SamplingParams
from moefleet.cluster.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("field,make", [
    ("max_tokens", lambda: SamplingParams(max_tokens=0)),
    ("max_tokens", lambda: SamplingParams(max_tokens=-3)),
    ("temperature", lambda: SamplingParams(temperature=-0.5)),
    ("temperature", lambda: SamplingParams(temperature=math.nan)),
    ("top_p", lambda: SamplingParams(top_p=0.0)),
    ("top_p", lambda: SamplingParams(top_p=1.5)),
    ("top_k", lambda: SamplingParams(top_k=-2)),
    ("min_p", lambda: SamplingParams(min_p=2.0)),
    ("repetition_penalty", lambda: SamplingParams(repetition_penalty=0.0)),
    ("logprobs", lambda: SamplingParams(logprobs=-1)),
    ("stop", lambda: SamplingParams(stop=[""])),
])
def test_bad_sampling_params_name_the_field(field, make):
    with pytest.raises(InvalidRequestError) as info:
        make()
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_prompts_rejected_while_other_requests_keep_going(engines):
    llm = engines("mixtral")
    engine = llm.engine
    vocab, context = engine.spec.vocab_size, engine.max_model_len
    expected = llm.generate("The quick brown fox", GREEDY)[0].outputs[0].token_ids

    stream = llm.stream("The quick brown fox", GREEDY)
    first = next(stream)  # a request is in flight
    bad_prompts = {
        "prompt": ["", {"prompt_token_ids": []}, {"prompt_token_ids": [5] * context}, 42],
        "prompt_token_ids": [{"prompt_token_ids": [1, vocab]}, {"prompt_token_ids": [-1, 3]}, {"prompt_token_ids": ["a"]}],
    }
    for field, prompts in bad_prompts.items():
        for prompt in prompts:
            with pytest.raises(InvalidRequestError) as info:
                llm.generate(prompt, GREEDY)
            assert info.value.field == field, prompt
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["ok prompt", ""], GREEDY)  # one bad prompt in a batch: nothing starts
    assert info.value.field == "prompt"
    assert len(engine.requests) == 1  # only the streaming request

    final = [first, *stream][-1]
    assert final.outputs[0].token_ids == expected
    assert llm.generate("The quick brown fox", GREEDY)[0].outputs[0].token_ids == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompt_longer_than_context_names_lengths(engines):
    llm = engines("qwen3_moe", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="prompt: is 64 tokens; the context holds 64"):
        llm.generate({"prompt_token_ids": [7] * 64}, GREEDY)
    out = llm.generate({"prompt_token_ids": [7] * 60}, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
