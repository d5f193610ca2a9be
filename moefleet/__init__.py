"""moefleet: an elastic serving cluster for Mixture-of-Experts LLMs on Ray."""

from moefleet.cluster.engine.outputs import CompletionOutput, RequestOutput
from moefleet.cluster.sampling_params import SamplingParams
from moefleet.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
