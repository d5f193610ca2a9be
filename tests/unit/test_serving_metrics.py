"""Serving metrics through prometheus-client: vLLM's names, labels and buckets on a real replica
serving real requests, and one exposition for two replicas behind a real gateway (each sample
labelled with its replica, every family once)."""

import asyncio
import json
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moefleet.cluster.engine.serving_stats import (
    INTER_TOKEN_LATENCY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
)
from moefleet.cluster.messages import GenerateRequest
from moefleet.cluster.sampling_params import SamplingParams

MODEL = "mixtral-tiny"


@pytest.fixture(scope="module")
def replicas(model_dir):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig

    made = [Replica(f"r{i}", EngineConfig(model=model_dir("mixtral"), kv_cache_blocks=256, num_threads=1),
                    model_id=MODEL) for i in range(2)]
    yield made
    for r in made:
        r.shutdown()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, from an exposition that must parse."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def grew(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def generate(replica, token_ids: list[int], max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return asyncio.run(replica.generate(GenerateRequest(prompt_token_ids=token_ids, sampling_params=params)))


def test_replica_counts_tokens_latencies_and_prefix_hits_under_vllm_names(replicas):
    replica = replicas[0]
    block = replica.engine.engine.config.block_size
    before = samples(replica.metrics_text())
    shared_prompt = list(range(3, 3 + 2 * block + 5))  # two full blocks the second request finds cached
    outputs = [generate(replica, shared_prompt, 6), generate(replica, shared_prompt, 6),
               generate(replica, list(range(50, 61)), 9)]
    after = samples(replica.metrics_text())
    m = {"model_name": MODEL}

    assert grew(before, after, "vllm:prompt_tokens_total", **m) == sum(o.prompt_tokens for o in outputs)
    assert grew(before, after, "vllm:generation_tokens_total", **m) == sum(o.completion_tokens for o in outputs) == 21
    assert grew(before, after, "vllm:request_success_total", finished_reason="length", **m) == 3
    assert grew(before, after, "vllm:prefix_cache_queries_total", **m) == sum(o.prompt_tokens for o in outputs)
    assert outputs[1].cached_prompt_tokens == 2 * block
    assert grew(before, after, "vllm:prefix_cache_hits_total", **m) == sum(o.cached_prompt_tokens for o in outputs)
    assert grew(before, after, "vllm:time_to_first_token_seconds_count", **m) == 3
    assert grew(before, after, "vllm:e2e_request_latency_seconds_count", **m) == 3
    assert grew(before, after, "vllm:inter_token_latency_seconds_count", **m) == 21 - 3  # every token after a first
    itl_s = grew(before, after, "vllm:inter_token_latency_seconds_sum", **m)
    ttft_s = grew(before, after, "vllm:time_to_first_token_seconds_sum", **m)
    e2e_s = grew(before, after, "vllm:e2e_request_latency_seconds_sum", **m)
    assert itl_s > 0 and ttft_s > 0 and ttft_s + itl_s == pytest.approx(e2e_s)  # arrival to last token, per request
    assert value(after, "vllm:num_requests_running", **m) == value(after, "vllm:num_requests_waiting", **m) == 0
    for name, bounds in (("vllm:time_to_first_token_seconds", TIME_TO_FIRST_TOKEN_BUCKETS),
                         ("vllm:inter_token_latency_seconds", INTER_TOKEN_LATENCY_BUCKETS),
                         ("vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS)):
        buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in after.items() if n == f"{name}_bucket")
        assert [le for le, _ in buckets] == [*bounds, float("inf")]  # vLLM's boundaries
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1][1] == value(after, f"{name}_count", **m)


def test_running_request_and_kv_usage_then_abort_counted(replicas):
    replica = replicas[1]
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    m = {"model_name": MODEL}

    async def scrape_while_running():
        deltas = replica.engine.stream({"prompt_token_ids": list(range(3, 40))}, params)
        await anext(deltas)  # the request is running: it has its first token
        during = samples(replica.metrics_text())
        await deltas.aclose()  # the client goes away: the request is aborted
        return during

    before = samples(replica.metrics_text())
    during = asyncio.run(scrape_while_running())
    assert value(during, "vllm:num_requests_running", **m) == 1
    assert 0 < value(during, "vllm:kv_cache_usage_perc", **m) < 1
    for _ in range(200):  # the abort lands at the engine thread's next step boundary
        after = samples(replica.metrics_text())
        if grew(before, after, "vllm:request_success_total", finished_reason="abort", **m):
            break
        asyncio.run(asyncio.sleep(0.01))
    assert grew(before, after, "vllm:request_success_total", finished_reason="abort", **m) == 1
    assert value(after, "vllm:num_requests_running", **m) == 0
    assert value(after, "vllm:kv_cache_usage_perc", **m) == 0  # freed blocks that keep a prefix count as free


def test_gateway_merges_replicas_into_one_exposition(replicas):
    from moefleet.cluster.gateway.auth import TokenAuth
    from moefleet.cluster.gateway.gateway import Gateway
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    gateway = Gateway([LocalReplicaHandle(r) for r in replicas], MODEL, TokenAuth((), ()))
    _, http_port = gateway.start()
    base = f"http://127.0.0.1:{http_port}"
    try:
        before = samples(urllib.request.urlopen(f"{base}/metrics").read().decode())
        usages = []
        for i in range(6):  # different prompts, so routing spreads them over both replicas
            body = json.dumps({"model": MODEL, "prompt": f"request number {i} " * (i + 1), "max_tokens": 4 + i,
                               "temperature": 0, "ignore_eos": True}).encode()
            reply = urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", body,
                                                                  {"Content-Type": "application/json"}))
            usages.append(json.loads(reply.read())["usage"])
        response = urllib.request.urlopen(f"{base}/metrics")
        text = response.read().decode()
    finally:
        gateway.stop(grace_s=2)

    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    declared = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
    assert declared and max(declared.values()) == 1  # every family once, however many replicas
    families = list(text_string_to_metric_families(text))
    assert {s.labels.get("replica") for f in families for s in f.samples} == {"r0", "r1"}
    after = samples(text)

    def grew_everywhere(name: str, **labels) -> float:
        return sum(grew(before, after, name, replica=r.replica_id, **labels) for r in replicas)

    m = {"model_name": MODEL}
    assert grew_everywhere("vllm:prompt_tokens_total", **m) == sum(u["prompt_tokens"] for u in usages)
    assert grew_everywhere("vllm:generation_tokens_total", **m) == sum(u["completion_tokens"] for u in usages)
    assert grew_everywhere("vllm:time_to_first_token_seconds_count", **m) == len(usages)
    assert grew_everywhere("vllm:e2e_request_latency_seconds_count", **m) == len(usages)
    # Read back replica by replica (what the profile and the autoscaling run scrape): the same counts and sums.
    from moefleet.cluster.gateway.replica_metrics import replica_histograms

    read = replica_histograms(text, "vllm:time_to_first_token_seconds")
    assert set(read) == {"r0", "r1"}
    for r in replicas:
        buckets, total, count = read[r.replica_id]
        labels = {**m, "replica": r.replica_id}
        assert count == after[("vllm:time_to_first_token_seconds_count", frozenset(labels.items()))]
        assert total == after[("vllm:time_to_first_token_seconds_sum", frozenset(labels.items()))]
        assert sorted(buckets) == [*TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")] and buckets[float("inf")] == count
    assert all(("moefleet_expert_tokens_total", frozenset({"layer": "0", "expert": "0", "replica": r.replica_id}.items()))
               in after for r in replicas)
