"""The gRPC front door against a real server on port 0."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moefleet import SamplingParams
from moefleet.client import AsyncClient, Client
from moefleet.v1 import admin_pb2, admin_pb2_grpc
from tests.integration.conftest import ADMIN_TOKEN, start_gateway, wait_until


def test_unary_and_streaming_equal_the_engine(client, engines):
    llm = engines("mixtral")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    expected = llm.generate("The gateway says", params)[0].outputs[0]
    reply = client.generate("The gateway says", temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    assert list(reply.token_ids) == expected.token_ids and reply.text == expected.text
    assert reply.finish_reason == "length" and reply.usage.completion_tokens == 20
    for lp, ref in zip(reply.logprobs, expected.logprobs):
        assert lp.logprob == pytest.approx(ref[lp.token_id], abs=1e-4)
        assert {t.token_id for t in lp.top} == set(ref)
    messages = list(client.generate_stream("The gateway says", temperature=0, max_tokens=20, ignore_eos=True))
    assert [t for m in messages for t in m.token_ids] == expected.token_ids
    assert "".join(m.text_delta for m in messages) == expected.text
    assert messages[-1].finish_reason == "length" and messages[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    ids = client.tokenize("The gateway says")
    by_ids = client.generate(ids, temperature=0, max_tokens=20, ignore_eos=True)
    assert list(by_ids.token_ids) == expected.token_ids
    assert client.list_models()[0].id == "mixtral-tiny"


def test_64_concurrent_streams_all_complete(gateway):
    async def one(c, i):
        tokens = 0
        async for message in c.generate_stream(f"client {i} says", temperature=0.7, seed=i, max_tokens=12, ignore_eos=True):
            tokens += len(message.token_ids)
            last = message
        return tokens, last.finish_reason

    async def main():
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [(12, "length")] * 64


def test_cancellation_frees_kv_blocks(client, replica):
    blocks = replica.engine.engine.blocks
    stream = client.generate_stream(list(range(5, 300)), temperature=0, max_tokens=500, ignore_eos=True)
    next(stream)
    assert blocks.num_free_blocks < blocks.num_blocks
    stream.cancel()
    assert wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks)
    assert replica.engine.num_requests() == 0


def test_expired_deadline_is_deadline_exceeded_and_frees_blocks(client, replica):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("slow", temperature=0, max_tokens=1500, ignore_eos=True, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    blocks = replica.engine.engine.blocks
    assert wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks and replica.engine.num_requests() == 0)


def test_backpressure_is_resource_exhausted_with_retry_hint(replica):
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    gw, port, _ = start_gateway([LocalReplicaHandle(replica)], http_port=None, max_outstanding_tokens=100)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            first = c.generate_stream("hold the queue", temperature=0, max_tokens=200, ignore_eos=True)
            next(first)
            with pytest.raises(grpc.RpcError) as info:
                c.generate("one more", max_tokens=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(info.value.trailing_metadata())["retry-after-ms"] == "1000"
            first.cancel()
    finally:
        gw.stop(grace_s=1)


def test_health_reflection_and_admin(gateway, client, replica):
    channel = client.channel
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"moefleet.v1.Inference", "moefleet.v1.Admin", "grpc.health.v1.Health"} <= names

    admin = admin_pb2_grpc.AdminStub(channel)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", ADMIN_TOKEN),)):
        with pytest.raises(grpc.RpcError) as info:
            admin.GetClusterState(admin_pb2.GetClusterStateRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    client.generate("load the experts", max_tokens=2)
    state = admin.GetClusterState(admin_pb2.GetClusterStateRequest(), metadata=good)
    assert state.model == "mixtral-tiny" and state.replicas[0].replica_id == "replica-0"
    assert len(state.replicas[0].expert_load) == 4 and sum(state.replicas[0].expert_load[0].tokens) > 0
    for call, request in ((admin.GetAutoscalingPolicy, admin_pb2.GetAutoscalingPolicyRequest()),
                          (admin.SetAutoscalingPolicy, admin_pb2.AutoscalingPolicy(yaml="x: 1")),
                          (admin.GetAutoscalerStatus, admin_pb2.GetAutoscalerStatusRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=good)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "no controller" in info.value.details()
    # Placement changes go through the controller only (tests/unit/test_controller.py, test_serve.py).
    for call, request in ((admin.ScaleShards, admin_pb2.ScaleShardsRequest(shards=2)),
                          (admin.Rebalance, admin_pb2.RebalanceRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=good)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "no controller" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.ScaleShards(admin_pb2.ScaleShardsRequest(shards=0), metadata=good)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shards" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.Drain(admin_pb2.DrainRequest(replica_id="nope"), metadata=good)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replica_id" in info.value.details()


def test_draining_replica_answers_unavailable(model_dir):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    r = Replica("replica-d", EngineConfig(model=model_dir("olmoe"), kv_cache_blocks=64, num_threads=1))
    gw, port, _ = start_gateway([LocalReplicaHandle(r)], http_port=None)
    try:
        with Client(f"127.0.0.1:{port}", token=ADMIN_TOKEN, timeout=60) as c:
            assert c.generate("before", max_tokens=2).finish_reason == "length"
            assert c.drain("replica-d").accepted
            with pytest.raises(grpc.RpcError) as info:
                c.generate("after", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gw.stop(grace_s=1)
        r.shutdown()


def test_inference_token_when_configured(replica):
    from moefleet.cluster.gateway.auth import TokenAuth
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    auth = TokenAuth((ADMIN_TOKEN,), ("user-token",))
    gw, port, _ = start_gateway([LocalReplicaHandle(replica)], http_port=None, auth=auth)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.generate("hi", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"127.0.0.1:{port}", token="user-token", timeout=60) as user:
            assert len(user.generate("hi", max_tokens=2).token_ids) == 2
    finally:
        gw.stop(grace_s=1)


def test_tls(replica, tmp_path):
    import subprocess

    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    tls = (cert.read_bytes(), key.read_bytes())
    gw, port, http_port = start_gateway([LocalReplicaHandle(replica)], tls=tls, grpc_address="localhost:0",
                                        http_host="localhost")
    try:
        with Client(f"localhost:{port}", tls_ca=tls[0], timeout=60) as c:
            assert len(c.generate("secure", max_tokens=3).token_ids) == 3
        import json
        import ssl
        import urllib.request

        context = ssl.create_default_context(cadata=tls[0].decode())
        health = urllib.request.urlopen(f"https://localhost:{http_port}/health", context=context).read()
        assert json.loads(health)["status"] == "ok"
    finally:
        gw.stop(grace_s=1)


def test_duplicate_request_id_is_invalid_argument(client):
    first = client.generate_stream("first", request_id="same-id", temperature=0, max_tokens=200, ignore_eos=True)
    next(first)
    with pytest.raises(grpc.RpcError) as info:
        client.generate("second", request_id="same-id", max_tokens=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()
    first.cancel()
