"""Placement epochs on a replica while it serves: shards scale and rebalance between steps and
every in-flight request finishes with the tokens of a static run."""

import asyncio

from moefleet import SamplingParams
from tests.conftest import collect_tokens, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


def test_scale_and_rebalance_while_serving_keep_tokens_identical(model_dir, engines):
    """A replica keeping its experts in process: the controller plans and commits each change and
    the replica stages it on its own shards while serving."""
    from moefleet.actors.local_groups import local_controller
    from moefleet.cluster.config.controller_config import ControllerConfig
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.control.state_store import InMemoryStore

    static = engines("qwen2_moe")
    prompts = random_prompts(static.engine.spec.vocab_size, (7, 33, 12, 50), seed=31)
    expected = [o.outputs[0].token_ids for o in
                static.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    engine_config = EngineConfig(model=model_dir("qwen2_moe"), kv_cache_blocks=256, num_threads=1, engine_shards=1,
                                 transport="local")
    controller = local_controller(ControllerConfig(engine=engine_config, model_id="qwen2-moe-tiny"), InMemoryStore())
    controller.start(1)
    replica = controller.replica_group.handle("replica-0")

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replica, p, GREEDY)) for p in prompts]
        epochs = []
        for change in (lambda: controller.scale_shards(2), lambda: controller.scale_shards(4), controller.rebalance,
                       lambda: controller.scale_shards(3)):
            await asyncio.sleep(0.05)
            epochs.append((await asyncio.to_thread(change))["acks"]["replica-0"])
            assert not all(t.done() for t in tasks)  # the epoch changed under requests in flight
        return await asyncio.gather(*tasks), epochs

    try:
        outputs, epochs = asyncio.run(run())
        assert epochs == [1, 2, 3, 4]
        assert outputs == expected
        engine = replica.engine.engine
        assert engine.placement.num_shards == 3 and len(engine.experts.local_shards) == 3
        assert replica.state().placement_epoch == 4
    finally:
        controller.shutdown()


def test_epochs_keep_unchanged_experts_in_place_and_load_only_moves(model_dir):
    """Scaling 2 -> 3 shards keeps shards 0 and 1 (same objects, same weight objects for experts
    that stay); only moved experts are taken, from their peer, never re-read."""
    import torch

    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.engine.llm_engine import LLMEngine
    from moefleet.cluster.placement.epoch_record import EpochRecord
    from moefleet.cluster.placement.planner import plan_placement, scale_limits

    engine = LLMEngine(EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=32, num_threads=1, engine_shards=2,
                                    transport="local"))
    layers, experts = engine.spec.moe_layer_indices, engine.spec.moe.num_experts
    before = [dict(shard.weights) for shard in engine.experts.local_shards]
    new = plan_placement(engine.load.window(), engine.placement, layers, scale_limits(experts, 3))
    reads = []
    original = engine.reader.expert
    engine.reader.expert = lambda layer, e: reads.append((layer, e)) or original(layer, e)
    backend = engine.prepare_epoch(EpochRecord(new))
    old_shards = engine.experts.local_shards
    assert backend.local_shards[:2] == old_shards and len(backend.local_shards) == 3
    assert reads == []  # every expert of the new epoch already lived on some shard: copied from peers
    for s in range(2):
        for key in set(before[s]) & set(backend.local_shards[s].weights):
            assert backend.local_shards[s].weights[key] is before[s][key]  # untouched, not reloaded
    # both epochs answer until the old one retires; then the experts only it used are freed
    shard0 = backend.local_shards[0]
    x, idx = torch.randn(1, engine.spec.hidden_size), torch.tensor([0])
    gone = [e for e in engine.placement.shard_experts[layers[0]][0] if e not in new.shard_experts[layers[0]][0]]
    if gone:
        shard0.compute(layers[0], x, idx, torch.tensor([gone[0]]), torch.tensor([1.0]), epoch=0)
    old = engine.commit_epoch(backend)
    old.retire(backend, new.epoch)
    assert sorted(shard0.epochs) == [new.epoch]
    assert set(shard0.weights) == {(layer, e) for layer in layers for e in new.shard_experts[layer][0]}
