"""moefleet: an elastic serving cluster for Mixture-of-Experts LLMs on Ray."""

from moefleet.cluster.llm import LLM
from moefleet.cluster.outputs import CompletionOutput, RequestOutput
from moefleet.cluster.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
