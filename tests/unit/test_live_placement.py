"""Placement epochs on a replica while it serves: shards scale and rebalance between steps and
every in-flight request finishes with the tokens of a static run."""

import asyncio

from moefleet import SamplingParams
from tests.conftest import collect_tokens, random_prompts

GREEDY = {"temperature": 0, "max_tokens": 300, "ignore_eos": True}


def test_scale_and_rebalance_while_serving_keep_tokens_identical(model_dir, engines):
    from moefleet.actors.replica import Replica

    static = engines("qwen2_moe")
    prompts = random_prompts(static.engine.spec.vocab_size, (7, 33, 12, 50), seed=31)
    expected = [o.outputs[0].token_ids for o in
                static.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**GREEDY))]
    replica = Replica("live", {"model": model_dir("qwen2_moe"), "kv_cache_blocks": 256, "num_threads": 1,
                               "expert_shards": 1, "transport": "local"})

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replica, p, GREEDY)) for p in prompts]
        epochs = []
        for change in (lambda: replica.scale_shards(2), lambda: replica.scale_shards(4), replica.rebalance,
                       lambda: replica.scale_shards(3)):
            await asyncio.sleep(0.05)
            epochs.append(await change())
            assert not all(t.done() for t in tasks)  # the epoch changed under requests in flight
        return await asyncio.gather(*tasks), epochs

    try:
        outputs, epochs = asyncio.run(run())
        assert epochs == [1, 2, 3, 4]
        assert outputs == expected
        engine = replica.engine.engine
        assert engine.placement.num_shards == 3 and len(engine.experts.local_shards) == 3
        assert replica.state()["placement_epoch"] == 4
    finally:
        replica.shutdown()
