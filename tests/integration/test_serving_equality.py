"""Through the front door, byte for byte: for every architecture, what gRPC (unary and streamed)
and the OpenAI HTTP API (plain and SSE, from the `openai` client) return equals the in-process
engine's tokens and text, prompts and outputs with multi-byte characters included."""

import pytest

from moefleet import SamplingParams
from tests.conftest import ARCHS

PROMPTS = ["Once upon a time", "日本語のテキストと絵文字 🚀🌍 が混ざる", "Ünïcödé façade — naïve café"]
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=ARCHS)
def served(request, model_dir, engines):
    from moefleet.actors.replica import Replica
    from moefleet.cluster.config.engine_config import EngineConfig
    from moefleet.cluster.gateway.replica_pool import LocalReplicaHandle
    from tests.integration.conftest import start_gateway

    arch = request.param
    replica = Replica(f"eq-{arch}", EngineConfig(model=model_dir(arch), kv_cache_blocks=256, num_threads=1),
                      model_id="mixtral-tiny")
    gateway, grpc_port, http_port = start_gateway([LocalReplicaHandle(replica)])
    outputs = engines(arch).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    expected = [(o.outputs[0].token_ids, o.outputs[0].text) for o in outputs]
    yield grpc_port, http_port, expected
    gateway.stop(grace_s=2)
    replica.shutdown()


def test_grpc_unary_and_streamed_equal_the_engine(served):
    from moefleet.client import Client

    grpc_port, _, expected = served
    with Client(f"127.0.0.1:{grpc_port}", timeout=120) as client:
        for prompt, (tokens, text) in zip(PROMPTS, expected):
            options = dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            reply = client.generate(prompt, **options)
            assert (list(reply.token_ids), reply.text) == (tokens, text)
            messages = list(client.generate_stream(prompt, **options))
            assert [t for m in messages for t in m.token_ids] == tokens
            assert "".join(m.text_delta for m in messages).encode() == text.encode()


def test_openai_http_plain_and_streamed_equal_the_engine(served):
    import openai

    _, http_port, expected = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", timeout=120)
    for prompt, (_, text) in zip(PROMPTS, expected):
        options = dict(model="mixtral-tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                       extra_body={"ignore_eos": True})
        assert client.completions.create(**options).choices[0].text.encode() == text.encode()
        chunks = list(client.completions.create(stream=True, **options))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed.encode() == text.encode()
