"""LLMEngine: the engine loop of one replica. A step reads as three calls across three seams:
schedule (which tokens run), run the model (one forward for the whole batch), sample and
finish (which tokens come out)."""

import logging
import os
import time
import uuid
from collections.abc import Callable

import torch

from moefleet.cluster.config.engine_config import EngineConfig
from moefleet.cluster.engine.block_manager import BlockManager
from moefleet.cluster.engine.detokenizer import Detokenizer
from moefleet.cluster.engine.load_counters import ExpertLoadCounters
from moefleet.cluster.engine.malloc_tuning import keep_freed_memory
from moefleet.cluster.engine.model_runner import ModelRunner
from moefleet.cluster.engine.outputs import CompletionOutput, RequestOutput
from moefleet.cluster.engine.routing_recorder import RoutingRecorder
from moefleet.cluster.engine.sampler import sample
from moefleet.cluster.engine.scheduler import ScheduledChunk, Scheduler
from moefleet.cluster.engine.sequence import Sequence
from moefleet.cluster.engine.spare_cores import SpareCores
from moefleet.cluster.engine.tokenizer import Tokenizer
from moefleet.cluster.errors import InvalidRequestError
from moefleet.cluster.experts.backend import ExpertBackend, ExpertSource, InProcessExperts, uses_remote_shards
from moefleet.cluster.experts.dispatcher import Dispatcher
from moefleet.cluster.experts.wire import TORCH_DTYPES
from moefleet.cluster.placement.epoch_record import EpochRecord
from moefleet.cluster.placement.placement import Placement
from moefleet.cluster.sampling_params import SamplingParams
from moefleet.kernels.cpu_extension import cpu_ops
from moefleet.models.checkpoint import CheckpointReader
from moefleet.models.decoder import MoEDecoder
from moefleet.models.spec import load_spec

log = logging.getLogger(__name__)


class LLMEngine:
    """`experts`: where the routed experts live (default: shards in this process; moefleet.LLM and
    the Replica actor hand in sources over shard actors). `on_shard_lost(shard or None, epoch)`:
    who replaces a failed shard and answers the epoch to switch to (the controller, for shards it
    owns); without it the engine's own source replaces the shard."""

    def __init__(self, config: EngineConfig, experts: ExpertSource | None = None,
                 on_shard_lost: Callable[[int | None, int], EpochRecord] | None = None):
        self.config = config
        keep_freed_memory(config.malloc_keep_mib)
        self.spec = spec = load_spec(config.model)
        reader = CheckpointReader(config.model, spec, TORCH_DTYPES[config.dtype])
        self.reader = reader
        if experts is None and uses_remote_shards(config):
            raise ValueError(f"engine_shards={config.engine_shards} with transport={config.transport!r} needs shard "
                             "actors: build the engine through moefleet.LLM, which starts them")
        self.source = experts or InProcessExperts()
        self.on_shard_lost = on_shard_lost
        self.experts = self.source.first(config, reader)
        self.placement = self.experts.placement
        # Default: the cores that shard actors on this node leave free. Oversubscribed torch
        # threads wait on each other: a 15 ms forward became 70-1,100 ms beside a busy process.
        cores = len(os.sched_getaffinity(0))
        self.step_threads = config.num_threads or max(1, cores - self.experts.threads_used_on_this_node())
        self.wide_step_threads = config.wide_step_threads or self.step_threads
        self.spare_cores = SpareCores(cores) if config.wide_step_spare_only else None
        torch.set_num_threads(self.step_threads)
        self.dispatcher = Dispatcher(self.placement, self.experts.transport)
        self.model = MoEDecoder(reader, spec, self.dispatcher)
        self.tokenizer = Tokenizer(config.model)
        cpu_ops()  # build or load the CPU kernels now, not inside the first request
        self.eos_token_ids = set(spec.eos_token_ids) | self.tokenizer.eos_token_ids
        self.max_model_len = config.max_model_len or min(spec.max_position_embeddings, 4096)
        kv_block_bytes = ModelRunner.kv_bytes_per_block(spec, config.block_size, reader.dtype)
        self.num_kv_blocks = config.kv_cache_blocks or max(1, int(config.kv_cache_gib * 2**30) // kv_block_bytes)
        self.runner = ModelRunner(self.model, self.num_kv_blocks, config.block_size, self._overlap_for(self.experts))
        self._start_afresh()

    def _start_afresh(self) -> None:
        """What serving accumulates, empty: KV blocks and prefix cache, queues, the expert load
        window, the routing sample, the sampler's seed and the step count."""
        config, spec = self.config, self.spec
        self.blocks = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.load = ExpertLoadCounters(spec.moe_layer_indices, spec.moe.num_experts, config.load_window_steps)
        self.record_routing(config.routing_sample_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0

    def warm_up(self, sequences: int = 4, prompt_tokens: int = 64, output_tokens: int = 4) -> float:
        """Generate once for `sequences` made-up prompts of `prompt_tokens` tokens (a prefill step,
        then decode steps), then forget it all (`_start_afresh`): a serving replica does this before
        it reports ready, so that its first requests do not pay for the engine's first use. Returns
        the seconds it took; raises what a step raised (a lost shard), forgetting it all the same."""
        started = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
        length = max(1, min(prompt_tokens, self.max_model_len - output_tokens - 1))
        try:
            for i in range(sequences):  # distinct prompts: a prefix-cache hit would skip the prefill being warmed
                ids = [(i * 7919 + j * 104729) % self.spec.vocab_size for j in range(length)]
                self.add_request({"prompt_token_ids": ids}, params, request_id=f"warm-up-{i}")
            while self.has_unfinished():
                self.step()
        finally:
            self._start_afresh()
        return time.perf_counter() - started

    # ----- requests -----
    def record_routing(self, sample_rate: float, capacity_tokens: int = 65536) -> None:
        """Record the router's choices of `sample_rate` of the tokens from the next step on, into a
        new recorder (`self.routing`) that keeps at most `capacity_tokens` untaken."""
        self.routing = RoutingRecorder(self.spec.moe_layer_indices, self.spec.moe.top_k, sample_rate, capacity_tokens)
        self.dispatcher.observers = (self.load, self.routing)

    def make_sequence(self, prompt, params: SamplingParams, request_id: str | None = None,
                      resume_token_ids: list[int] | None = None) -> Sequence:
        """Validate and tokenize a prompt (a string or {"prompt_token_ids": [...]}). With
        `resume_token_ids` the request goes on after outputs it produced on a lost replica."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, (list, tuple)) or not all(isinstance(t, int) for t in token_ids):
                raise InvalidRequestError("prompt_token_ids", "must be a list of integers")
            bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise InvalidRequestError("prompt_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        else:
            raise InvalidRequestError("prompt", "must be a string or a dict with 'prompt_token_ids'")
        if not token_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        resumed = self._check_resumed(resume_token_ids or [], params)
        if len(token_ids) + len(resumed) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"is {len(token_ids)} tokens; the context holds {self.max_model_len} "
                                                f"(prompt and at least one generated token)")
        needed = self.blocks.blocks_needed(len(token_ids) + len(resumed) + 1)
        if needed > self.blocks.num_blocks:
            raise InvalidRequestError("prompt", f"needs {needed} KV blocks; the cache has {self.blocks.num_blocks}")
        return Sequence(request_id or uuid.uuid4().hex, text, token_ids, params, resumed,
                        Detokenizer(self.tokenizer.backend, params, resumed))

    def _check_resumed(self, token_ids, params: SamplingParams) -> list[int]:
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(t, int) for t in token_ids):
            raise InvalidRequestError("resume_token_ids", "must be a list of integers")
        bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError("resume_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        if params.max_tokens is not None and len(token_ids) >= params.max_tokens:
            raise InvalidRequestError("resume_token_ids", f"{len(token_ids)} tokens already reach max_tokens "
                                                          f"({params.max_tokens}): nothing is left to generate")
        return list(token_ids)

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        return self.admit(self.make_sequence(prompt, params, request_id))

    def admit(self, seq: Sequence) -> Sequence:
        """Queue a validated sequence (from make_sequence) for scheduling."""
        if seq.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are freed at once. Returns False if unknown/finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    # ----- placement epochs (prepare while serving, commit between steps, then retire) -----
    def prepare_epoch(self, record: EpochRecord, lost: frozenset[int] = frozenset()) -> ExpertBackend:
        """The backend of `record`'s epoch, made by the expert source while the current epoch
        keeps serving (call from any thread, one change at a time). Off the engine thread, torch
        keeps to one thread there: a second thread's OpenMP pool beside the engine thread's
        outnumbers the cores of a small machine, and libgomp then stops spinning between parallel
        regions in both (see AsyncEngine); on the engine thread the next step sets its own."""
        torch.set_num_threads(1)
        return self.source.for_epoch(self.config, self.reader, record, self.experts, lost)

    def commit_epoch(self, backend: ExpertBackend) -> ExpertBackend:
        """Switch to a prepared epoch. Call only between steps (on the engine thread): a step
        always finishes on the epoch it started with. Returns the old backend, to retire with
        `old.retire(backend, backend.placement.epoch)`."""
        old = self.experts
        if backend.transport is None:  # a compiled graph over the same actors: the old one goes first
            old.release_transport()
            backend.activate()
        self.dispatcher.set_placement(backend.placement)
        self.dispatcher.transport = backend.transport
        self.placement, self.experts = backend.placement, backend
        self.runner.overlap = self._overlap_for(backend)
        return old

    def switch_to(self, record: EpochRecord, lost: frozenset[int] = frozenset()) -> bool:
        """Prepare, commit and retire `record`'s epoch now (engine thread, between steps);
        False when the engine already serves that epoch or a later one."""
        if record.epoch <= self.placement.epoch:
            return False
        backend = self.prepare_epoch(record, lost)
        self.commit_epoch(backend).retire(backend, record.epoch)
        return True

    def _overlap_for(self, backend) -> bool:
        """Micro-batch overlap as configured, where the transport allows two sends in flight."""
        if not self.config.overlap_microbatches:
            return False
        if backend.transport.max_in_flight < 2:
            log.warning("overlap_microbatches needs two transport sends in flight; %s allows one: running without",
                        backend.kind)
            return False
        return True

    def replace_shards(self, lost: int | None) -> None:
        """After shard `lost` (None: unknown, so all) failed: a fresh shard takes its index in the
        next epoch, taking its experts from peers that hold copies, else from the checkpoint.
        The failed step changed no sequence state, so it can simply run again."""
        lost_set = frozenset(range(self.placement.num_shards)) if lost is None else frozenset({lost})
        if self.on_shard_lost is not None:
            record = self.on_shard_lost(lost, self.placement.epoch)
        else:
            record = EpochRecord(Placement(self.placement.epoch + 1, self.placement.num_experts,
                                           self.placement.shard_experts))
        self.switch_to(record, lost_set)

    def close(self) -> None:
        """Stop remote shards (if any) and free the transport."""
        self.experts.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Next-token logits at every position of each prompt ([len, V] float32), computed in
        one batched forward through the paged cache (for scoring and for checking the model)."""
        from moefleet.cluster.engine.scheduler import ScheduledChunk

        seqs = [self.make_sequence({"prompt_token_ids": p}, SamplingParams()) for p in prompts]
        if self.scheduler.running or self.scheduler.waiting:
            raise RuntimeError("prompt_logits needs an idle engine")
        try:
            for seq in seqs:
                if not self.blocks.allocate(seq, use_prefix_cache=False):  # every position is computed
                    raise RuntimeError(f"prompt_logits: {len(prompts)} prompts need more KV blocks than are free")
            chunks = [ScheduledChunk(seq, seq.num_tokens) for seq in seqs]
            logits = self.runner.run(chunks, all_rows=True)
        finally:
            for seq in seqs:
                self.blocks.free_sequence(seq)
        return list(logits.split([s.num_tokens for s in seqs]))

    # ----- the step -----
    def step(self) -> list[Sequence]:
        """Run one engine step. Returns the sequences that produced a token."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        self.num_steps += 1
        self._set_threads(chunks)
        self.load.begin_step()
        self.routing.begin_step(chunks, sampled=not self.runner.overlaps(chunks))
        try:
            logits = self.runner.run(chunks)
        except BaseException:
            self.routing.discard_step()
            raise
        self.routing.end_step()
        sampling = [c.seq for c in chunks if c.samples]
        for c in chunks:
            c.seq.num_computed_tokens += c.num_tokens
            self.blocks.register_full_blocks(c.seq)
        tokens = sample(logits, sampling, self.generator)
        for seq, token in zip(sampling, tokens):
            seq.append(token)
            seq.detokenizer.add(token)
            self._check_finished(seq, token)
        return sampling

    def _set_threads(self, chunks: list[ScheduledChunk]) -> None:
        """Steps that prefill run on wide_step_threads, decode-only steps on num_threads. Beside a
        busy gateway on a small machine, decode steps (many short ops) stall on two threads
        whenever the gateway takes a core, so one thread decodes faster; but prompts, long ones
        above all, then queued behind one thread (the Azure conversation trace's first-token
        times more than doubled). With wide_step_spare_only, only onto cores the machine's other
        processes leave spare (another replica stepping beside this one keeps one)."""
        prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)  # decodes run one token each
        threads = self.wide_step_threads if prefill >= self.config.wide_step_prefill_tokens else self.step_threads
        if threads > self.step_threads and self.spare_cores is not None:
            threads = max(self.step_threads, min(threads, self.spare_cores()))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if p.stop_token_ids and token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop", None)
        elif p.stop_strings and (stop := seq.detokenizer.find_stop()) is not None:
            self._finish(seq, "stop", stop)
        elif (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if not (reason == "stop" and isinstance(stop_reason, str)):  # a stop string already ended the text
            seq.detokenizer.flush()
        self.scheduler.finish(seq)
        self.requests.pop(seq.request_id, None)

    def output(self, seq: Sequence) -> RequestOutput:
        detokenizer = seq.detokenizer
        text = detokenizer.text[: detokenizer.num_released(seq.finish_reason is not None)]
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), [completion],
                             finished=seq.finish_reason is not None, num_cached_tokens=seq.num_cached_prompt_tokens)
