"""Replica: a model's dense part, engine loop and KV cache, serving requests as plain dicts.
A plain class; `remote_replica_class()` applies the Ray shell (an async actor, so many requests
stream through it at once)."""

import asyncio
import os

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.async_engine import AsyncEngine, Delta
from moefleet.cluster.engine.llm_engine import LLMEngine
from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.placement.planner import plan_placement, scale_limits
from moefleet.cluster.sampling_params import SamplingParams

SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs", "include_stop_str_in_output", "skip_special_tokens"}


def sampling_params_from(options: dict) -> SamplingParams:
    unknown = set(options) - SAMPLING_FIELDS
    if unknown:
        raise InvalidRequestError(sorted(unknown)[0], "is not a sampling option")
    return SamplingParams(**options)


def prompt_from(request: dict):
    if "prompt_token_ids" in request:
        return {"prompt_token_ids": request["prompt_token_ids"]}
    if "prompt" in request:
        return request["prompt"]
    raise InvalidRequestError("prompt", "a request needs a prompt or prompt_token_ids")


class Replica:
    def __init__(self, replica_id: str, engine_options: dict, max_waiting: int = 256, model_id: str | None = None):
        self.replica_id = replica_id
        config = EngineConfig(**engine_options)
        self.engine = AsyncEngine(LLMEngine(config), max_waiting)
        self.model_id = model_id or os.path.basename(os.path.normpath(config.model))

    def ready(self) -> str:
        return self.replica_id

    def model_info(self) -> dict:
        spec = self.engine.engine.spec
        return {"id": self.model_id, "architecture": spec.arch, "max_model_len": self.engine.engine.max_model_len,
                "vocab_size": spec.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("text", "must be a non-empty string")
        return self.engine.engine.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages", "must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]", "needs a string 'role' and a string 'content'")
        return list(self.engine.engine.tokenizer.apply_chat_template(messages))

    async def generate_stream(self, request: dict):
        """Yields Delta objects until the request finishes."""
        params = sampling_params_from(request.get("sampling") or {})
        async for delta in self.engine.stream(prompt_from(request), params, request.get("request_id") or None,
                                              request.get("resume_token_ids")):
            yield delta

    async def generate(self, request: dict) -> Delta:
        """The whole completion as one Delta (token ids, text and logprobs of every token)."""
        total = None
        async for delta in self.generate_stream(request):
            if total is None:
                total = delta
            else:
                total.token_ids += delta.token_ids
                total.text_delta += delta.text_delta
                if delta.logprobs is not None:
                    total.logprobs += delta.logprobs
                for name in ("finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "cached_prompt_tokens"):
                    setattr(total, name, getattr(delta, name))
        return total

    def stats(self) -> dict:
        engine = self.engine.engine
        return {"replica_id": self.replica_id, "status": "draining" if self.engine.draining else "serving",
                "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "requests": self.engine.num_requests(), "outstanding_tokens": self.engine.outstanding_tokens(),
                "free_kv_blocks": engine.blocks.num_free_blocks, "kv_blocks": engine.blocks.num_blocks}

    def state(self) -> dict:
        """Replica, shard and per-expert load state for the Admin API."""
        engine = self.engine.engine
        backend = engine.experts
        shards = [{"shard": i, "node_id": info.get("node_id") or "", "weight_bytes": info.get("nbytes", 0),
                   "transport": backend.kind} for i, info in enumerate(backend.shard_info)]
        if not shards:
            shards = [{"shard": i, "node_id": "local", "weight_bytes": s.nbytes(), "transport": backend.kind}
                      for i, s in enumerate(backend.local_shards)]
        load = engine.load.window()
        return {**self.stats(), "placement_epoch": engine.placement.epoch, "shards": shards,
                "expert_load": [{"layer": layer, "tokens": load[row].tolist()}
                                for row, layer in enumerate(engine.spec.moe_layer_indices)]}

    def metrics_text(self) -> str:
        from moefleet.cluster.engine.metrics import render_prometheus

        return render_prometheus(self.engine.engine, {"replica": self.replica_id})

    async def change_placement(self, placement: Placement) -> int:
        """The epoch protocol on this replica, for shards it owns: prepare the new epoch while
        serving, commit at a step boundary, then retire the old one. Returns the new epoch."""
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, self.engine.engine.prepare_placement, placement)
        old = await self._commit_between_steps(placement, backend)
        if old is not None:
            await loop.run_in_executor(None, old.retire, backend, placement.epoch)
        return placement.epoch

    async def install_epoch(self, record: dict) -> int:
        """A controller's committed epoch over the shards it owns (already staged): switch at the
        next step boundary. Returns the epoch now serving — the controller's acknowledgement."""
        engine = self.engine.engine
        if record["placement"]["epoch"] > engine.placement.epoch:
            loop = asyncio.get_running_loop()
            placement, backend = await loop.run_in_executor(None, engine.attached_backend_for, record)
            old = await self._commit_between_steps(placement, backend)
            if old is not None:
                old.retire()
        return engine.placement.epoch

    async def _commit_between_steps(self, placement: Placement, backend):
        """Commit on the engine thread between two steps (a step always finishes on the epoch it
        started with); None if the engine had already moved past this epoch."""
        loop = asyncio.get_running_loop()
        committed = loop.create_future()

        def commit(engine):
            if placement.epoch <= engine.placement.epoch:
                result = None
            else:
                result = engine.commit_placement(placement, backend)
            loop.call_soon_threadsafe(committed.set_result, result)

        self.engine.call_between_steps(commit)
        return await committed

    def step_log(self) -> list[tuple[float, float, int]]:
        """(end time, seconds, tokens out) of recent engine steps; times are time.perf_counter(),
        CLOCK_MONOTONIC, comparable across processes on one machine (for benchmarks)."""
        return list(self.engine.step_log)

    def load_window(self) -> list[list[int]]:
        """Tokens per expert per MoE layer over the load window (for the controller)."""
        return self.engine.engine.load.window().tolist()

    async def scale_shards(self, num_shards: int) -> int:
        """Re-plan onto `num_shards` shards, keeping experts where they are as far as the even
        slot limits allow (only the experts that move are loaded)."""
        if not isinstance(num_shards, int) or num_shards < 1:
            raise InvalidRequestError("shards", f"must be an integer >= 1, got {num_shards!r}")
        return await self._replan(num_shards, spare_per_shard=0)

    async def rebalance(self) -> int:
        """Re-plan the current shards by the observed load (hot experts get a second copy in the
        spare slot each shard keeps)."""
        return await self._replan(self.engine.engine.placement.num_shards, spare_per_shard=1)

    async def _replan(self, num_shards: int, spare_per_shard: int) -> int:
        engine = self.engine.engine
        limits = scale_limits(engine.spec.moe.num_experts, num_shards, spare_per_shard)
        placement = plan_placement(engine.load.window(), engine.placement, engine.spec.moe_layer_indices, limits)
        return await self.change_placement(placement)

    def drain(self) -> None:
        """Take no new requests; those in flight finish."""
        self.engine.draining = True

    def shutdown(self) -> None:
        self.engine.stop()
        self.engine.engine.close()


def remote_replica_class():
    import ray

    return ray.remote(max_concurrency=4096)(Replica)
