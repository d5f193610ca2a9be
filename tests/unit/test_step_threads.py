"""Steps that prefill run on wide_step_threads, decode-only steps on num_threads (a serving
replica lends its gateway's core back for prompts), and the tokens are the same either way."""

import torch

from moefleet import SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_prefill_steps_run_wide_and_decode_steps_narrow(engines):
    before = torch.get_num_threads()
    llm = engines("mixtral", num_threads=1, wide_step_threads=2, wide_step_prefill_tokens=16)
    seen, run = [], llm.engine.runner.run

    def recording_run(chunks):
        seen.append((sum(c.num_tokens for c in chunks), torch.get_num_threads()))
        return run(chunks)

    llm.engine.runner.run = recording_run
    try:
        long, short = random_prompts(llm.engine.spec.vocab_size, [20, 10], seed=5)
        wide = llm.generate([{"prompt_token_ids": long}], GREEDY)[0].outputs[0].token_ids
        seen_long, seen[:] = list(seen), []
        llm.generate([{"prompt_token_ids": short}], GREEDY)
    finally:
        llm.engine.runner.run = run
        torch.set_num_threads(before)
    assert seen_long == [(20, 2), (1, 1), (1, 1), (1, 1)]  # the prompt's step on 2 threads, then decodes on 1
    assert seen == [(10, 1), (1, 1), (1, 1), (1, 1)]  # under wide_step_prefill_tokens: narrow throughout
    narrow = engines("mixtral").generate([{"prompt_token_ids": long}], GREEDY)[0].outputs[0].token_ids
    assert wide == narrow


def test_with_spare_only_a_prefill_widens_onto_the_cores_others_leave(engines):
    before = torch.get_num_threads()
    llm = engines("mixtral", num_threads=1, wide_step_threads=2, wide_step_prefill_tokens=16,
                  wide_step_spare_only=True)
    seen, run = [], llm.engine.runner.run

    def recording_run(chunks):
        seen.append((sum(c.num_tokens for c in chunks), torch.get_num_threads()))
        return run(chunks)

    llm.engine.runner.run = recording_run
    prompts = random_prompts(llm.engine.spec.vocab_size, [20, 20, 20], seed=6)  # distinct: no prefix cache hit
    try:
        for prompt, (spare, threads) in zip(prompts, ((2, 2), (1, 1), (0, 1))):  # another replica on a core: narrow
            llm.engine.spare_cores = lambda spare=spare: spare
            seen[:] = []
            llm.generate([{"prompt_token_ids": prompt}], GREEDY)
            assert seen[0] == (20, threads)
    finally:
        llm.engine.runner.run = run
        torch.set_num_threads(before)
