"""A serving replica's warm-up (LLMEngine.warm_up): it runs the engine once, then leaves no trace a
user or the controller could see: every KV block free, no prefix-cache entry, no expert load or
routing sample, no step counted, and the same tokens afterwards as a fresh engine's, sampled ones
included (the sampler's seed starts again)."""

import numpy as np

from moefleet import SamplingParams
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.llm_engine import LLMEngine
from tests.conftest import random_prompts


def generate(engine: LLMEngine, prompts, params) -> list[list[int]]:
    seqs = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


def test_warm_up_leaves_no_trace(model_dir):
    config = EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=64, num_threads=1, routing_sample_rate=1.0)
    warmed, fresh = LLMEngine(config), LLMEngine(config)
    assert warmed.warm_up(sequences=3, prompt_tokens=40, output_tokens=3) > 0
    assert warmed.blocks.num_free_blocks == warmed.blocks.num_blocks == 64
    assert warmed.blocks.cached == {} and not warmed.requests and warmed.num_steps == 0
    assert not np.any(warmed.load.window()) and int(warmed.load.total.sum()) == 0
    assert warmed.routing.take() == []
    prompts = random_prompts(warmed.spec.vocab_size, [12, 30], seed=11)
    for params in (SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)):
        assert generate(warmed, prompts, params) == generate(fresh, prompts, params)
    assert warmed.num_steps == fresh.num_steps
