"""The offline Python API, mirroring vLLM's `LLM` so users can switch."""

from collections.abc import Iterator

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.llm_engine import LLMEngine
from moefleet.cluster.engine.outputs import RequestOutput
from moefleet.cluster.experts.backend import uses_remote_shards
from moefleet.cluster.sampling_params import SamplingParams


class LLM:
    """LLM(model=PATH, dtype="float32", **engine options) — see EngineConfig for the options."""

    def __init__(self, model: str, dtype: str = "float32", **kwargs):
        config = EngineConfig(model=model, dtype=dtype, **kwargs)
        self.engine = LLMEngine(config, self._expert_source(config))

    @staticmethod
    def _expert_source(config: EngineConfig):
        """Shard actors this LLM starts and owns when the config asks for remote shards (Ray is
        imported only then); None keeps the engine's in-process shards."""
        if not uses_remote_shards(config):
            return None
        from moefleet.actors.shard_host import start_shard_actors
        from moefleet.cluster.experts.remote_backend import OwnedShardActors

        return OwnedShardActors(start_shard_actors)

    def shutdown(self) -> None:
        """Stop this engine's remote expert shards (a no-op for in-process shards)."""
        self.engine.close()

    def get_tokenizer(self):
        return self.engine.tokenizer.hf

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]}, or a list of them. Every prompt is
        validated before any is started, so a bad one raises without side effects."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.engine.admit(seq)
        try:
            while any(s.finish_reason is None for s in seqs):
                self.engine.step()
        finally:
            for seq in seqs:
                if seq.finish_reason is None:
                    self.engine.abort(seq.request_id)
        return [self.engine.output(s) for s in seqs]

    def stream(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output (cumulative) each time it gains tokens; closing the
        iterator early cancels the request and frees its KV blocks at once. Other requests in
        the engine advance with every step this iterator drives."""
        seq = self.engine.add_request(prompt, sampling_params or SamplingParams(), request_id)
        try:
            while seq.finish_reason is None:
                if seq in self.engine.step():
                    yield self.engine.output(seq)
        finally:
            if seq.finish_reason is None:
                self.engine.abort(seq.request_id)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One conversation through the checkpoint's chat template."""
        ids = self.engine.tokenizer.apply_chat_template(messages)
        return self.generate({"prompt_token_ids": list(ids)}, sampling_params)[0]
