"""A replica lost mid-request: the request resumes on another replica by re-prefilling prompt +
tokens already delivered. The caller's stream equals an uninterrupted run — greedy and seeded
sampling, tokens, text and logprobs — with no duplicate and no gap."""

import asyncio

import pytest

from moefleet.cluster.errors import InvalidRequestError, ReplicaLostError
from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle, ReplicaPool
from moefleet.cluster.messages import GenerateRequest
from moefleet.cluster.sampling_params import SamplingParams


class DiesAfter(LocalReplicaHandle):
    """A replica whose process dies after it delivered `deltas` deltas of a request (None: after
    the request's last delta, before its stream ends)."""

    def __init__(self, replica, deltas: int | None):
        super().__init__(replica)
        self.deltas = deltas

    async def stream(self, request: GenerateRequest):
        sent = 0
        async for delta in super().stream(request):
            if sent == self.deltas:
                raise ReplicaLostError(f"{self.replica_id} died")
            sent += 1
            yield delta
        if self.deltas is None:
            raise ReplicaLostError(f"{self.replica_id} died")


@pytest.fixture(scope="module")
def replicas(model_dir):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig

    made = [Replica(f"r{i}", EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=256, num_threads=1)) for i in range(2)]
    yield made
    for r in made:
        r.shutdown()


def collect(pool: ReplicaPool, request: GenerateRequest):
    async def run():
        deltas = []
        async for delta in pool.stream(request, 64):
            deltas.append(delta)
        return deltas

    deltas = asyncio.run(run())
    tokens = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
    return tokens, "".join(d.text_delta for d in deltas), logprobs, deltas[-1], len(deltas)


SAMPLINGS = {
    "greedy": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2),
    "seeded": SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=40, ignore_eos=True, logprobs=2),
    "stop string": SamplingParams(temperature=0.8, seed=5, max_tokens=60, stop=["e"], logprobs=1),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
@pytest.mark.parametrize("dies_after", [0, 1, 7])
def test_resumed_stream_equals_uninterrupted(replicas, name, dies_after):
    request = GenerateRequest(prompt="Once upon a time there was", sampling_params=SAMPLINGS[name])
    reference = collect(ReplicaPool([LocalReplicaHandle(replicas[1])]), request)
    pool = ReplicaPool([DiesAfter(replicas[0], dies_after), LocalReplicaHandle(replicas[1])])
    pool.outstanding["r1"] = 1_000  # route the first attempt to the replica that dies
    resumed = collect(pool, request)
    assert resumed[0] == reference[0]  # tokens: no duplicate, no gap
    assert resumed[1] == reference[1]  # text
    # logprobs of every token, once; values equal up to float rounding (the resumed tokens' keys
    # and values are recomputed by a prefill rather than by single-token decodes)
    assert [sorted(lp) for lp in resumed[2]] == [sorted(lp) for lp in reference[2]]
    assert all(abs(a[t] - b[t]) < 1e-4 for a, b in zip(resumed[2], reference[2]) for t in a)
    assert resumed[3].finish_reason == reference[3].finish_reason
    assert resumed[3].completion_tokens == reference[3].completion_tokens
    if reference[4] > dies_after:  # the replica died before the request finished
        assert pool.lost == {"r0"} and list(pool.handles) == ["r1"]


def test_a_replica_lost_after_the_last_delta_leaves_the_request_whole(replicas):
    """All tokens and the finish reason were delivered when the replica died: the caller gets
    the complete stream, with no resume (which would ask for tokens past max_tokens)."""
    request = GenerateRequest(prompt="Once upon a time there was", sampling_params=SAMPLINGS["greedy"])
    reference = collect(ReplicaPool([LocalReplicaHandle(replicas[1])]), request)
    pool = ReplicaPool([DiesAfter(replicas[0], None), LocalReplicaHandle(replicas[1])])
    pool.outstanding["r1"] = 1_000  # route the request to the replica that dies
    whole = collect(pool, request)
    assert whole[0] == reference[0] and whole[1] == reference[1]
    assert whole[3].finish_reason == "length" and whole[4] == reference[4]
    assert pool.lost == {"r0"}


def test_every_replica_lost_is_a_clear_retryable_error(replicas):
    pool = ReplicaPool([DiesAfter(replicas[0], 1), DiesAfter(replicas[1], 1)])
    with pytest.raises(Exception, match="every replica|no replica") as info:
        collect(pool, GenerateRequest(prompt="hello", sampling_params=SamplingParams(max_tokens=20, ignore_eos=True)))
    assert getattr(info.value, "retryable", False) or "replica" in str(info.value)


def test_resume_token_ids_are_validated(replicas):
    engine = replicas[0].engine.engine
    with pytest.raises(InvalidRequestError, match="resume_token_ids: ids \\[99999\\]"):
        engine.make_sequence("hi", SamplingParams(max_tokens=8), "x", [1, 99999])
    with pytest.raises(InvalidRequestError, match="resume_token_ids: 8 tokens already reach max_tokens"):
        engine.make_sequence("hi", SamplingParams(max_tokens=8), "x", list(range(3, 11)))
    with pytest.raises(InvalidRequestError, match="resume_token_ids: must be a list of integers"):
        engine.make_sequence("hi", SamplingParams(max_tokens=8), "x", ["a"])
