"""Expert shards as Ray actors: the same tokens and logprobs as the single-process engine, with
every transport, 1/2/4 shards and replicated experts; faults fail fast and retryably."""

import time

import pytest
import ray

from moefleet import SamplingParams
from moefleet.cluster.errors import ShardUnavailableError
from tests.conftest import collect_tokens, random_prompts
from tests.ray.conftest import head_pinned

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)


def _assert_same(reference, outputs):
    for ref, out in zip(reference, outputs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-4


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_remote_shards_equal_single_process(arch, engines, remote_llm):
    local = engines(arch)
    spec = local.engine.spec
    prompts = [{"prompt_token_ids": p} for p in random_prompts(spec.vocab_size, (5, 30, 17), seed=21)]
    reference = local.generate(prompts, GREEDY)
    for transport in ("actor", "compiled_graph"):
        for shards in (1, 2, 4):
            llm = remote_llm(arch, engine_shards=shards, transport=transport)
            assert llm.engine.experts.kind == transport and len(llm.engine.experts.actors) == shards
            _assert_same(reference, llm.generate(prompts, GREEDY))
            llm.shutdown()
    hot = {layer: [0, 1, 2, 3] for layer in spec.moe_layer_indices}
    llm = remote_llm(arch, engine_shards=4, transport="auto", replicate_experts=hot, overlap_microbatches=True)
    assert llm.engine.placement.holders(spec.moe_layer_indices[0], 1) == [1, 2]
    _assert_same(reference, llm.generate(prompts, GREEDY))


def test_shards_load_only_their_experts_and_sit_on_their_nodes(remote_llm, engines):
    llm = remote_llm("mixtral", engine_shards=2, transport="actor",
                     shard_resources=[{"node_a": 1}, {"node_b": 1}])
    info = llm.engine.experts.shard_info
    total = sum(s.nbytes() for s in engines("mixtral").engine.experts.local_shards)
    assert [i["nbytes"] for i in info] == [total // 2, total // 2]
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert "node_a" in nodes[info[0]["node_id"]] and "node_b" in nodes[info[1]["node_id"]]
    spread = remote_llm("mixtral", engine_shards=2, transport="auto", shard_resources=[{"node_a": 1}, {"node_b": 1}])
    assert spread.engine.experts.kind == "actor"  # auto avoids compiled graphs across nodes
    llm.generate("count my traffic", GREEDY)
    traffic = llm.engine.experts.transport.traffic
    assert traffic.local == [False, False]  # the driver runs on the head node
    assert all(n > 0 for n in traffic.bytes_out) and all(n > 0 for n in traffic.bytes_in)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["actor", "compiled_graph"])
def test_killed_shard_fails_fast_with_retryable_error(transport, remote_llm):
    llm = remote_llm("mixtral", engine_shards=2, transport=transport, shard_timeout_s=10)
    stream = llm.stream("a request in flight", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    next(stream)
    ray.kill(llm.engine.experts.actors[1])
    start = time.monotonic()
    with pytest.raises(ShardUnavailableError) as info:
        for _ in stream:
            pass
    assert time.monotonic() - start < 15
    assert info.value.shard == 1 and info.value.retryable and "expert shard 1 unavailable" in str(info.value)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks  # the failed request freed its blocks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["actor", "compiled_graph"])
def test_shard_that_raises_names_itself(transport, remote_llm):
    llm = remote_llm("qwen3_moe", engine_shards=2, transport=transport)
    ray.get(llm.engine.experts.actors[0].inject_failure.remote("disk on fire"))
    with pytest.raises(ShardUnavailableError, match="expert shard 0 unavailable: raised RuntimeError\\('disk on fire'\\)"):
        llm.generate("hello", GREEDY)
    # the shard itself is alive: the next request succeeds
    assert len(llm.generate("hello", GREEDY)[0].outputs[0].token_ids) == 16


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["actor", "compiled_graph"])
def test_remote_shards_rescale_while_serving(transport, ray_cluster, model_dir, engines):
    import asyncio

    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.placement.epoch_record import EpochRecord
    from moefleet.cluster.placement.planner import plan_placement, scale_limits

    # long enough to outlast the new shards starting
    sampling = SamplingParams(temperature=0, max_tokens=800, ignore_eos=True)
    static = engines("mixtral")
    prompts = random_prompts(static.engine.spec.vocab_size, (9, 31), seed=41)
    expected = [o.outputs[0].token_ids for o in static.generate([{"prompt_token_ids": p} for p in prompts],
                                                                 sampling)]
    replica = Replica("remote-live", EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=128, num_threads=1,
                                      engine_shards=2, transport=transport, shard_timeout_s=30,
                                      **head_pinned({"transport": transport})))
    old_actors = list(replica.engine.engine.experts.actors)

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replica, p, sampling)) for p in prompts]
        await asyncio.sleep(0.1)
        engine = replica.engine.engine  # this replica owns its shards: the test plays the controller's part
        placement = plan_placement(engine.load.window(), engine.placement, engine.spec.moe_layer_indices,
                                   scale_limits(engine.spec.moe.num_experts, 3))
        epoch = await replica.install_epoch(EpochRecord(placement))
        assert not all(t.done() for t in tasks)
        return await asyncio.gather(*tasks), epoch

    try:
        outputs, epoch = asyncio.run(run())
        assert outputs == expected and epoch == 1
        actors = replica.engine.engine.experts.actors
        assert len(actors) == 3 and actors[:2] == old_actors  # in place: the two shards stay, one joins
        infos = ray.get([a.info.remote() for a in actors], timeout=30)
        assert [i["epochs"] for i in infos] == [[1]] * 3  # epoch 0 retired everywhere
        held = replica.engine.engine.placement
        assert [i["nbytes"] > 0 for i in infos] == [True] * 3 and held.num_shards == 3
        # Staging ran on each shard's control thread in the idle scheduling class, serving in the normal one.
        assert [i["scheduling"] for i in infos] == [{"staging": "idle", "compute": "normal"}] * 3
    finally:
        replica.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["actor", "compiled_graph"])
def test_lost_shard_is_replaced_and_requests_finish_unchanged(transport, ray_cluster, model_dir, engines):
    import asyncio

    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig

    sampling = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    static = engines("qwen3_moe")
    prompts = random_prompts(static.engine.spec.vocab_size, (6, 25), seed=51)
    expected = [o.outputs[0].token_ids for o in static.generate([{"prompt_token_ids": p} for p in prompts],
                                                                 sampling)]
    replica = Replica("recovering", EngineConfig(model=model_dir("qwen3_moe"), kv_cache_blocks=128, num_threads=1,
                                     engine_shards=2, transport=transport, shard_timeout_s=10,
                                     **head_pinned({"transport": transport})))

    async def run():
        tasks = [asyncio.create_task(collect_tokens(replica, p, sampling)) for p in prompts]
        await asyncio.sleep(0.3)
        ray.kill(replica.engine.engine.experts.actors[1])  # a shard is lost mid-generation
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(run()) == expected
        assert replica.engine.engine.placement.epoch == 1  # served on replacement shards
    finally:
        replica.shutdown()
