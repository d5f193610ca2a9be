"""Replica: a model's dense part, engine loop and KV cache, serving GenerateRequests (see
cluster/messages.py). A plain class; `remote_replica_class()` applies the Ray shell (an async actor, so many requests
stream through it at once)."""

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

from moefleet.actors.ray_runtime import serving_runtime_env
from moefleet.actors.shard_host import start_shard_actors
from moefleet.cluster.config.controller_config import DEFAULT_MAX_WAITING
from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.async_engine import AsyncEngine
from moefleet.cluster.engine.llm_engine import LLMEngine
from moefleet.cluster.engine.metrics import replica_registry
from moefleet.cluster.engine.output_channel import OutputChannel
from moefleet.cluster.engine.output_socket import OutputListener
from moefleet.cluster.engine.routing_recorder import RecordedTokens
from moefleet.cluster.errors import InvalidRequestError, ShardUnavailableError
from moefleet.cluster.experts.backend import ExpertBackend, ExpertSource, uses_remote_shards
from moefleet.cluster.experts.remote_backend import OwnedShardActors
from moefleet.cluster.messages import (
    ExpertLoad,
    GenerateRequest,
    OutputDelta,
    ReplicaSnapshot,
    ReplicaState,
    RequestFailed,
    ShardState,
    join_deltas,
)
from moefleet.cluster.placement.epoch_record import EpochRecord

log = logging.getLogger(__name__)


def _prompt(request: GenerateRequest):
    return request.prompt if request.prompt is not None else {"prompt_token_ids": request.prompt_token_ids}


class Replica:
    """`experts` and `on_shard_lost` go to the engine (see LLMEngine): the controller's replica
    group hands in `ControllerShards` and `ControllerShardReport`; a replica without them keeps its
    experts in its own process, or starts its own shard actors when the config asks for them."""

    def __init__(self, replica_id: str, engine: EngineConfig, max_waiting: int = DEFAULT_MAX_WAITING,
                 model_id: str | None = None, experts: ExpertSource | None = None,
                 on_shard_lost: Callable[[int | None, int], EpochRecord] | None = None):
        self.replica_id = replica_id
        if experts is None and uses_remote_shards(engine):
            experts = OwnedShardActors(start_shard_actors)
        self.engine = AsyncEngine(functools.partial(_build_engine, engine, experts, on_shard_lost), max_waiting)
        self.model_id = model_id or os.path.basename(os.path.normpath(engine.model))
        self.channels: dict[str, OutputChannel] = {}  # gateway channel id -> its output channel (actor calls)
        self._listener: OutputListener | None = None  # gateways' output sockets, opened on first ask
        self.node_id = _node_id()

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

    async def generate_stream(self, request: GenerateRequest):
        """Yields OutputDeltas until the request finishes (for callers in this process; gateways
        use `submit` and an output channel)."""
        async for delta in self.engine.stream(_prompt(request), request.sampling_params, request.request_id or None,
                                              list(request.resume_token_ids)):
            yield delta

    def output_address(self) -> tuple[str, int]:
        """Where gateways connect for their outputs (the socket transport, output_socket.py): this
        node's address, any free port."""
        if self._listener is None:
            self._listener = OutputListener(_node_address(), lambda sink: self.engine.abort_sink(sink))
        return self._listener.address

    async def submit_many(self, channel_id: str, requests: list[GenerateRequest]) -> list[Exception | None]:
        """Admit requests whose deltas go to the gateway's channel `channel_id`: its output socket
        if it connected one, else an output channel (made on first use) that it takes from with
        `next_outputs`. Returns, for each request in order, None or why it was refused (bad input,
        draining, full): one refusal never refuses the others."""
        sink = self._listener.sink(channel_id) if self._listener is not None else None
        if sink is None:
            self._drop_abandoned_channels()
            sink = self.channels.get(channel_id)
            if sink is None:
                sink = self.channels[channel_id] = OutputChannel()
        refusals = []
        for request in requests:
            try:
                self.engine.submit(_prompt(request), request.sampling_params, sink, request.request_id or None,
                                   list(request.resume_token_ids))
                refusals.append(None)
            except Exception as error:  # this request's answer; the next ones still go in
                refusals.append(error)
        return refusals

    async def next_outputs(self, channel_id: str, acked: int,
                           wait_s: float = 1.0) -> tuple[int, list[OutputDelta | RequestFailed]]:
        """Every delta (or failure) of the channel's requests after the batches up to `acked`
        (those the gateway has), with the number to acknowledge next; waits up to `wait_s`."""
        channel = self.channels.get(channel_id)
        return await channel.take(acked, wait_s) if channel is not None else (acked, [])

    def abort(self, request_id: str) -> None:
        """Cancel a request (its client went away); its KV blocks are freed at the next step."""
        self.engine.abort(request_id)

    def _drop_abandoned_channels(self, after_s: float = 60.0) -> None:
        """Abort the requests of gateways that stopped taking their outputs (checked as requests
        arrive: a gateway process that died leaves no one to cancel them)."""
        for channel_id, channel in list(self.channels.items()):
            if channel.abandoned(after_s):
                del self.channels[channel_id]
                self.engine.abort_sink(channel)

    async def generate(self, request: GenerateRequest) -> OutputDelta:
        """The whole completion as one OutputDelta (token ids, text and logprobs of every token)."""
        return join_deltas([delta async for delta in self.generate_stream(request)])

    def stats(self) -> ReplicaState:
        engine, serving = self.engine.engine, self.engine.stats
        return ReplicaState(replica_id=self.replica_id, status="draining" if self.engine.draining else "serving",
                            running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
                            requests=self.engine.num_requests(), outstanding_tokens=self.engine.outstanding_tokens(),
                            node_id=self.node_id,
                            kv_cache_usage=1 - engine.blocks.num_free_blocks / engine.blocks.num_blocks,
                            ttft_counts=tuple(serving.time_to_first_token.counts),
                            itl_counts=tuple(serving.inter_token_latency.counts),
                            shard_compute_s=tuple(engine.experts.transport.traffic.compute_s))

    def state(self) -> ReplicaSnapshot:
        """Replica, shard and per-expert load state for the Admin API."""
        engine = self.engine.engine
        backend = engine.experts
        shards = [ShardState(shard=i, node_id=info.get("node_id") or "", weight_bytes=info.get("nbytes", 0),
                             transport=backend.kind) for i, info in enumerate(backend.shard_info)]
        if not shards:
            shards = [ShardState(shard=i, node_id="local", weight_bytes=s.nbytes(), transport=backend.kind)
                      for i, s in enumerate(backend.local_shards)]
        load = engine.load.window()
        return ReplicaSnapshot(state=self.stats(), placement_epoch=engine.placement.epoch, shards=tuple(shards),
                               expert_load=tuple(ExpertLoad(layer=layer, tokens=tuple(load[row].tolist()))
                                                 for row, layer in enumerate(engine.spec.moe_layer_indices)))

    @functools.cached_property
    def metrics_registry(self) -> CollectorRegistry:
        """This replica's Prometheus registry: vLLM's serving metrics and the data plane's."""
        return replica_registry(self.engine.engine, self.model_id, self.engine.stats)

    def metrics_text(self) -> str:
        """The registry in Prometheus' text format (a gateway labels each sample with the replica)."""
        return generate_latest(self.metrics_registry).decode()

    async def install_epoch(self, record: EpochRecord) -> int:
        """The controller's committed epoch: stage it (for shards the controller owns, only attach
        to them; for this replica's own shards, load what moves) while the current epoch serves,
        switch at the next step boundary, then retire the old one. Returns the epoch now serving:
        the controller's acknowledgement."""
        engine = self.engine.engine
        if record.epoch > engine.placement.epoch:
            loop = asyncio.get_running_loop()
            backend = await loop.run_in_executor(None, engine.prepare_epoch, record)
            old = await self._commit_between_steps(backend)
            if old is not None:
                await loop.run_in_executor(None, old.retire, backend, record.epoch)
        return engine.placement.epoch

    async def _commit_between_steps(self, backend: ExpertBackend) -> ExpertBackend | None:
        """Commit on the engine thread between two steps (a step always finishes on the epoch it
        started with); None if the engine had already moved past this epoch."""
        loop = asyncio.get_running_loop()
        committed = loop.create_future()

        def commit(engine):
            result = engine.commit_epoch(backend) if backend.placement.epoch > engine.placement.epoch else None
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

    def arrived_prompts(self) -> tuple:
        """(prompt token ids, requests) admitted since the last call (proactive rebalancing)."""
        return self.engine.arrivals.take()

    def record_routing(self, sample_rate: float) -> None:
        """Sample `sample_rate` of the tokens from the next step on (a recording through the Admin API)."""
        self.engine.engine.record_routing(sample_rate)

    def routing_sample(self) -> list[RecordedTokens]:
        """The routing recorded since the last call (for the controller's affinity model), its
        steps joined into one batch: one object to send, and one array for the model to learn."""
        taken = self.engine.engine.routing.take()
        return [RecordedTokens.concatenate(taken)] if taken else []

    def drain(self) -> None:
        """Take no new requests; those in flight finish."""
        self.engine.draining = True

    def shutdown(self) -> None:
        self.engine.stop()
        if self._listener is not None:
            self._listener.close()
        self.engine.engine.close()


def _build_engine(config: EngineConfig, experts: ExpertSource | None,
                  on_shard_lost: Callable[[int | None, int], EpochRecord] | None) -> LLMEngine:
    engine = LLMEngine(config, experts, on_shard_lost)
    if config.warm_up:
        try:
            log.info("engine warmed up in %.2f s", engine.warm_up())
        except ShardUnavailableError as error:  # the first request's step will replace the shard; start cold
            log.warning("warm-up skipped: %s", error)
    return engine


def _node_id() -> str:
    """The Ray node this replica runs on ("local" outside Ray, as for shards in the replica's process)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _node_address() -> str:
    """This node's address as Ray knows it (reachable from the other nodes); loopback outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@dataclass(frozen=True)
class ControllerShardReport:
    """The engine's `on_shard_lost` for shards the controller owns: tell the controller (found
    by name, in this replica's process) and wait for the epoch that replaced the shard."""

    controller_name: str
    timeout_s: float

    def __call__(self, lost: int | None, epoch: int) -> EpochRecord:
        import ray

        controller = ray.get_actor(self.controller_name)
        return ray.get(controller.shard_lost.remote(lost, epoch), timeout=self.timeout_s)


def remote_replica_class():
    import ray

    return ray.remote(max_concurrency=4096, runtime_env=serving_runtime_env())(Replica)
