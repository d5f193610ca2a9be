"""Typed messages on the request path: a client's sampling options reach the replica as the same
SamplingParams (the proto's SamplingOptions and SamplingParams name their fields alike, and
nothing lists them by hand), the HTTP API maps OpenAI's names onto them, a request carries
exactly one prompt, and the deltas of a request join into its whole completion."""

import pytest

from moefleet.client import build_request
from moefleet.cluster.errors import InvalidRequestError, ModelNotFoundError
from moefleet.cluster.gateway.grpc_server import generate_request
from moefleet.cluster.gateway.http_server import _sampling_params
from moefleet.cluster.messages import GenerateRequest, OutputDelta, join_deltas
from moefleet.cluster.sampling_params import SamplingParams
from moefleet.v1 import inference_pb2

# Every SamplingOptions field set away from its default (values exact in float32).
EVERY_OPTION = dict(temperature=0.5, top_p=0.75, top_k=7, min_p=0.125, repetition_penalty=1.25, seed=11, max_tokens=9,
                    stop=["END", "STOP"], stop_token_ids=[3, 4], ignore_eos=True, logprobs=2)


def test_every_client_option_reaches_the_replica_as_the_same_sampling_params():
    assert set(EVERY_OPTION) == set(inference_pb2.SamplingOptions.DESCRIPTOR.fields_by_name)
    request = generate_request(build_request("hi", request_id="r1", **EVERY_OPTION), "tiny")
    assert request == GenerateRequest(prompt="hi", sampling_params=SamplingParams(**EVERY_OPTION), request_id="r1")


def test_options_left_unset_take_the_defaults_and_zero_is_kept():
    assert generate_request(build_request([5, 6]), "tiny") == GenerateRequest(prompt_token_ids=[5, 6])
    greedy = generate_request(build_request("hi", temperature=0, top_k=0, max_tokens=None), "tiny").sampling_params
    assert greedy == SamplingParams(temperature=0) and greedy.greedy


def test_one_stop_string_stays_whole():
    assert list(build_request("hi", stop="END").sampling.stop) == ["END"]


def test_client_rejects_an_unknown_option_by_name():
    with pytest.raises(TypeError, match="temprature"):
        build_request("hi", temprature=0.5)


@pytest.mark.parametrize("message,error,field", [
    (build_request("hi", temperature=-1), InvalidRequestError, "temperature"),
    (build_request("hi", top_p=0), InvalidRequestError, "top_p"),
    (inference_pb2.GenerateRequest(), InvalidRequestError, "prompt"),
    (build_request("hi", model="other"), ModelNotFoundError, None),
])
def test_bad_grpc_requests_fail_in_the_gateway_naming_the_field(message, error, field):
    with pytest.raises(error) as info:
        generate_request(message, "tiny")
    if field is not None:
        assert info.value.field == field and field in str(info.value)


def test_http_bodies_map_openai_names_onto_sampling_params():
    completion = {"temperature": 0, "top_k": 4, "stop": "\n", "n": 1, "seed": None, "logprobs": 3,
                  "skip_special_tokens": False}
    assert _sampling_params(completion, chat=False) == SamplingParams(temperature=0, top_k=4, stop="\n", logprobs=3,
                                                                      skip_special_tokens=False)
    chat = {"max_tokens": 5, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    assert _sampling_params(chat, chat=True) == SamplingParams(max_tokens=7, logprobs=2, ignore_eos=True)
    assert _sampling_params({"logprobs": False}, chat=True).logprobs is None
    with pytest.raises(InvalidRequestError) as info:
        _sampling_params({"n": 2}, chat=False)
    assert info.value.field == "n"


def test_a_request_carries_exactly_one_prompt():
    with pytest.raises(InvalidRequestError, match="prompt or prompt_token_ids"):
        GenerateRequest()
    with pytest.raises(InvalidRequestError, match="not both"):
        GenerateRequest(prompt="hi", prompt_token_ids=[1])


def test_deltas_join_into_the_whole_completion():
    deltas = [OutputDelta("r", [1, 2], "ab", [{1: -0.5}, {2: -0.25}], prompt_tokens=4, completion_tokens=2),
              OutputDelta("r", [], "", [], prompt_tokens=4, completion_tokens=2),
              OutputDelta("r", [3], "c", [{3: -1.0}], finish_reason="stop", stop_reason=3, prompt_tokens=4,
                          completion_tokens=3, cached_prompt_tokens=2)]
    assert join_deltas(deltas) == OutputDelta("r", [1, 2, 3], "abc", [{1: -0.5}, {2: -0.25}, {3: -1.0}], "stop", 3,
                                              prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=2)
    assert join_deltas([OutputDelta("r", [7], "x", finish_reason="length")]).logprobs is None
