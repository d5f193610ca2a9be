"""The replica -> gateway output channel over real Ray actors, for both transports (a socket per
gateway, an actor call per step): outputs equal the in-process engine's, a client that leaves or
runs out of time frees the replica, a lost replica's requests resume elsewhere with no gap or
repeat, a call whose answer is lost loses no token, and a gateway whose connection closes leaves
no request running on the replica."""

import asyncio
import os
import time

import grpc
import pytest
import ray

from moefleet import SamplingParams
from moefleet.cluster.messages import GenerateRequest
from tests.conftest import random_prompts

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def replica_actors(ray_cluster, model_dir):
    from moefleet.actors.replica import remote_replica_class
    from moefleet.cluster.config.engine_config import EngineConfig

    config = EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=512, num_threads=1)
    actors = [remote_replica_class().options(num_cpus=0, resources={"head": 1}).remote(f"channel-{i}", config, 256, "mixtral-tiny")
              for i in range(2)]
    ray.get([a.ready.remote() for a in actors])
    yield actors
    for actor in actors:
        ray.kill(actor)


def test_replicas_run_at_the_default_niceness_not_ray_s_15(replica_actors):
    # Ray starts workers at niceness 15; a serving replica there loses its cores to any process at 0.
    assert ray.get([a.__ray_call__.remote(lambda self: os.nice(0)) for a in replica_actors]) == [0, 0]


def expected_tokens(engines, prompts, max_tokens):
    static = engines("mixtral")
    return [o.outputs[0].token_ids for o in static.generate([{"prompt_token_ids": p} for p in prompts],
                                                            SamplingParams(**GREEDY, max_tokens=max_tokens))]


def wait_idle(actor, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(actor.stats.remote()).requests == 0:
            return True
        time.sleep(0.05)
    return False


async def collect(stream) -> list[int]:
    return [t async for delta in stream for t in delta.token_ids]


TRANSPORTS = ["socket", "actor_call"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_requests_equal_the_in_process_engine(replica_actors, engines, transport):
    from moefleet.cluster.gateway.replica_channel import CHANNELS

    prompts = random_prompts(engines("mixtral").engine.spec.vocab_size, [5 + 3 * i for i in range(16)], seed=5)
    expected = expected_tokens(engines, prompts, 40)
    channel = CHANNELS[transport](replica_actors[0])

    async def run():
        requests = [GenerateRequest(prompt_token_ids=p, sampling_params=SamplingParams(**GREEDY, max_tokens=40))
                    for p in prompts]
        return await asyncio.gather(*(collect(channel.stream(r)) for r in requests))

    assert asyncio.run(run()) == expected
    # A second event loop (the first one's long-poll, or connection reader, was cancelled mid-call):
    # nothing is lost.
    assert asyncio.run(run()) == expected


def test_a_burst_goes_in_few_calls_and_a_bad_request_in_it_fails_alone(replica_actors, engines):
    from moefleet.cluster.errors import InvalidRequestError
    from moefleet.cluster.gateway.replica_channel import CHANNELS

    vocab = engines("mixtral").engine.spec.vocab_size
    prompts = random_prompts(vocab, [6] * 12, seed=9)
    expected = expected_tokens(engines, prompts, 8)
    channel = CHANNELS["socket"](replica_actors[1])
    calls, submit_many = [], channel.actor.submit_many

    class CountedActor:  # the replica's handle, counting submit calls
        def __getattr__(self, name):
            return getattr(replica_actors[1], name)

        @property
        def submit_many(self):
            calls.append(1)
            return submit_many

    channel.actor = CountedActor()

    async def run():
        requests = [GenerateRequest(prompt_token_ids=p, sampling_params=SamplingParams(**GREEDY, max_tokens=8))
                    for p in prompts]
        requests.insert(5, GenerateRequest(prompt_token_ids=[vocab + 1], sampling_params=SamplingParams(**GREEDY)))
        return await asyncio.gather(*(collect(channel.stream(r)) for r in requests), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results.pop(5), InvalidRequestError)
    assert results == expected
    assert 1 <= len(calls) < len(prompts)  # those that came while a call was out went in the next one


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_that_leaves_frees_the_replica(replica_actors, engines, transport):
    from moefleet.cluster.gateway.replica_channel import CHANNELS

    channel = CHANNELS[transport](replica_actors[0])

    async def leave_early():
        request = GenerateRequest(prompt_token_ids=[5, 6, 7], sampling_params=SamplingParams(**GREEDY, max_tokens=3000))
        stream = channel.stream(request)
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        return got

    assert len(asyncio.run(leave_early())) == 3
    assert wait_idle(replica_actors[0])


def test_a_gateway_whose_connection_closes_leaves_nothing_running(replica_actors):
    """A gateway process that dies closes its output socket: the replica aborts that gateway's
    requests at its next step instead of computing tokens nobody will read."""
    from moefleet.cluster.gateway.replica_channel import SocketChannel

    channel = SocketChannel(replica_actors[0])

    async def start_then_vanish():
        requests = [GenerateRequest(prompt_token_ids=[5, 6, 7 + i], sampling_params=SamplingParams(**GREEDY, max_tokens=3000))
                    for i in range(4)]
        streams = [channel.stream(r) for r in requests]
        for stream in streams:
            await anext(stream)
        assert ray.get(replica_actors[0].stats.remote()).requests == 4
        channel._reader.cancel()  # the connection closes, as with a dead process: no abort call is sent
        await asyncio.sleep(0)

    asyncio.run(start_then_vanish())
    assert wait_idle(replica_actors[0])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_grpc_deadline_ends_the_request_on_the_replica(replica_actors, transport):
    from moefleet.client import Client
    from moefleet.cluster.gateway.replica_pool import RayReplicaHandle
    from tests.integration.conftest import start_gateway

    gateway, port, _ = start_gateway([RayReplicaHandle(replica_actors[1], "channel-1", transport)], http_port=None)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate([5, 6, 7], max_tokens=3000, temperature=0, ignore_eos=True, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_idle(replica_actors[1])
    finally:
        gateway.stop(grace_s=2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_replica_s_requests_resume_on_another_without_gap_or_repeat(ray_cluster, model_dir, engines, transport):
    from moefleet.actors.replica import remote_replica_class
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.gateway.replica_pool import RayReplicaHandle, ReplicaPool

    config = EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=512, num_threads=1)
    doomed, survivor = [remote_replica_class().options(num_cpus=0, resources={"head": 1}).remote(f"resume-{i}", config, 256)
                        for i in range(2)]
    ray.get([doomed.ready.remote(), survivor.ready.remote()])
    prompts = random_prompts(engines("mixtral").engine.spec.vocab_size, [6, 11, 17, 23], seed=9)
    expected = expected_tokens(engines, prompts, 300)
    pool = ReplicaPool([RayReplicaHandle(doomed, "resume-0", transport)])

    async def run():
        produced = [0]

        async def one(p):
            request = GenerateRequest(prompt_token_ids=p, sampling_params=SamplingParams(**GREEDY, max_tokens=300))
            tokens = []
            async for delta in pool.stream(request, len(p) + 300):
                tokens += delta.token_ids
                produced[0] += len(delta.token_ids)
            return tokens

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        while produced[0] < 100:
            await asyncio.sleep(0.01)
        pool.set_handles([RayReplicaHandle(doomed, "resume-0", transport), RayReplicaHandle(survivor, "resume-1", transport)])
        ray.kill(doomed)
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(run()) == expected
        assert "resume-0" in pool.lost
    finally:
        ray.kill(survivor)
