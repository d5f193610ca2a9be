"""The OpenAI-compatible HTTP API, driven by the `openai` Python package."""

import json
import urllib.error
import urllib.request

import openai
import pytest


@pytest.fixture
def oai(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="unused", max_retries=0)


def test_completions_match_grpc(oai, client):
    expected = client.generate("Open the pod bay doors", temperature=0, max_tokens=12, ignore_eos=True)
    reply = oai.completions.create(model="mixtral-tiny", prompt="Open the pod bay doors", max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == len(expected.token_ids)
    chunks = list(oai.completions.create(model="mixtral-tiny", prompt="Open the pod bay doors", max_tokens=12,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_streamed_usage_on_request(oai):
    """stream_options.include_usage: every chunk says usage null, then one last chunk has the usage
    and no choices (OpenAI's shape, which benchmark clients read token counts from)."""
    options = dict(model="mixtral-tiny", prompt="Open the pod bay doors", max_tokens=12, temperature=0, stream=True)
    chunks = list(oai.completions.create(stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                         **options))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 12
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in oai.completions.create(**options))  # not asked: no usage chunk
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="mixtral-tiny", prompt="x", max_tokens=3, stream_options={"include_usage": True})
    assert "stream_options" in info.value.message


def test_chat_completions_stream_and_models(oai):
    messages = [{"role": "user", "content": "hi there"}]
    whole = oai.chat.completions.create(model="mixtral-tiny", messages=messages, max_tokens=10, temperature=0)
    streamed = list(oai.chat.completions.create(model="mixtral-tiny", messages=messages, max_tokens=10, temperature=0,
                                                stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert [m.id for m in oai.models.list().data] == ["mixtral-tiny"]


def test_errors_have_openai_shape_and_codes(oai, gateway):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="mixtral-tiny", prompt="x", max_tokens=10, temperature=-1)
    assert "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=3)
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.http_port}/v1/completions", b"{not json",
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request)
    body = json.loads(http_error.value.read())
    assert http_error.value.code == 400 and body["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(gateway):
    base = f"http://127.0.0.1:{gateway.http_port}"
    assert json.loads(urllib.request.urlopen(f"{base}/health").read())["status"] == "ok"
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert 'moefleet_expert_tokens_total{expert="0",layer="0",replica="replica-0"}' in metrics  # labels sorted


def test_bad_token_is_401(replica):
    from moefleet.cluster.gateway.auth import TokenAuth
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle
    from tests.integration.conftest import start_gateway

    gw, _, http_port = start_gateway([LocalReplicaHandle(replica)], auth=TokenAuth(("a",), ("user-token",)))
    try:
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="mixtral-tiny", prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="user-token", max_retries=0)
        assert good.completions.create(model="mixtral-tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        gw.stop(grace_s=1)


def test_overloaded_is_429_with_retry_after_and_draining_is_503(model_dir):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle
    from tests.integration.conftest import start_gateway

    r = Replica("replica-h", EngineConfig(model=model_dir("olmoe"), kv_cache_blocks=64, num_threads=1), max_waiting=1)
    gw, _, http_port = start_gateway([LocalReplicaHandle(r)])
    try:
        base = f"http://127.0.0.1:{http_port}/v1"
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        holder = client.completions.create(model="mixtral-tiny", prompt="hold", max_tokens=300, stream=True)
        next(iter(holder))  # one request in flight fills the replica (max_waiting=1)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="mixtral-tiny", prompt="x", max_tokens=2)
        assert info.value.response.headers["Retry-After"] == "1"
        holder.close()
        r.drain()
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="mixtral-tiny", prompt="x", max_tokens=2)
        assert info.value.status_code == 503 and "draining" in info.value.message
    finally:
        gw.stop(grace_s=1)
        r.shutdown()
