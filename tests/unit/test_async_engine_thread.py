"""AsyncEngine builds its engine on the thread that then steps it (one OpenMP pool per process: a
second one, the loading thread's, outnumbers a small machine's cores and libgomp then sleeps
between parallel regions), and a failed build raises in the caller."""

import asyncio
import threading

import pytest

from moefleet import SamplingParams
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.async_engine import AsyncEngine
from moefleet.cluster.engine.llm_engine import LLMEngine


def test_the_engine_is_built_and_stepped_on_one_thread(model_dir):
    built_on, stepped_on = [], []

    def build() -> LLMEngine:
        built_on.append(threading.get_ident())
        engine = LLMEngine(EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=64, num_threads=1))
        step = engine.step
        engine.step = lambda: (stepped_on.append(threading.get_ident()), step())[1]
        return engine

    engine = AsyncEngine(build, max_waiting=8)
    try:
        async def generate():
            return [d async for d in engine.stream({"prompt_token_ids": [11, 12, 13]},
                                                   SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))]

        deltas = asyncio.run(generate())
    finally:
        engine.stop()
    assert sum(len(d.token_ids) for d in deltas) == 3
    assert built_on != [threading.get_ident()] and set(stepped_on) == set(built_on)


def test_a_failed_build_raises_in_the_caller():
    def build() -> LLMEngine:
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncEngine(build, max_waiting=8)
