"""AsyncEngine: an LLMEngine driven by a background thread, for servers. Callers submit requests
with a sink that receives their deltas: after every step the engine thread hands each sink one
batch with everything its requests gained (one output channel per gateway, not one message per
token per request: vLLM's engine-core -> API-server shape), or `stream()` one request as an async
iterator. Aborting a request frees its KV blocks at the next step boundary. Validation and
tokenization happen in the caller, so bad input fails at once with InvalidRequestError."""

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from moefleet.cluster.engine.arrived_prompts import ArrivedPrompts
from moefleet.cluster.engine.llm_engine import LLMEngine
from moefleet.cluster.engine.sequence import Sequence
from moefleet.cluster.engine.serving_stats import ServingStats
from moefleet.cluster.errors import (
    DrainingError,
    InvalidRequestError,
    OverloadedError,
    RequestAbortedError,
    ShardUnavailableError,
)
from moefleet.cluster.messages import OutputDelta, RequestFailed
from moefleet.cluster.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class DeltaSink(Protocol):
    def deliver(self, items: list[OutputDelta | RequestFailed]) -> None:
        """Called on the engine thread, at most once per step, with every item of this sink's
        requests from that step, in order. Must not block."""
        ...


class _QueueSink:
    """One request's deltas into an asyncio queue on the caller's loop (for `stream()`)."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def deliver(self, items: list[OutputDelta | RequestFailed]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, items)
        except RuntimeError:  # the caller's loop is gone; nobody is listening
            pass

    def _put(self, items: list[OutputDelta | RequestFailed]) -> None:
        for item in items:
            self.queue.put_nowait(item)


@dataclass
class _Stream:
    seq: Sequence
    sink: DeltaSink
    sent_tokens: int = 0
    sent_chars: int = 0  # of the sequence's text


class AsyncEngine:
    _ids = itertools.count()

    def __init__(self, build_engine: Callable[[], LLMEngine], max_waiting: int):
        """`build_engine` runs on the engine thread, which then runs every step, so that the model is
        loaded and stepped by one thread. torch's OpenMP keeps a pool of worker threads for each
        thread that starts parallel work; with a second pool (the loading thread's) the workers
        outnumber a small machine's cores, and libgomp then stops spinning between parallel regions
        and puts its workers to sleep at each one: the tiny Mixtral loaded on one thread and stepped
        on another decoded 64 sequences at 0.7-0.8x the speed, with 26K voluntary context switches
        per 32K tokens against 11. Raises what `build_engine` raised."""
        self.max_waiting = max_waiting
        self._lock = threading.Condition()
        self._adds: list[_Stream] = []
        self._aborts: list[str] = []
        self._calls: list = []  # functions to run on the engine thread between steps
        self._streams: dict[str, _Stream] = {}
        self.draining = False
        self.step_log: deque[tuple[float, float, int]] = deque(maxlen=100_000)  # (end time, seconds, tokens out)
        self.arrivals = ArrivedPrompts()  # prompts since the controller last asked (proactive rebalancing)
        self.stats = ServingStats()  # serving metrics: hooks at submit, after each step, at abort and failure
        self._stopped = False
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built), name="moefleet-engine",
                                        daemon=True)
        self._thread.start()
        built.result()  # self.engine is set

    # ----- caller side (any thread with an event loop) -----
    def outstanding_tokens(self) -> int:
        """Tokens still to produce or prefill across admitted requests (for routing)."""
        with self._lock:
            streams = list(self._streams.values()) + list(self._adds)
        return sum(max(0, (s.seq.params.max_tokens or 0) - len(s.seq.output_token_ids)) + s.seq.num_pending
                   for s in streams)

    def num_requests(self) -> int:
        with self._lock:
            return len(self._streams) + len(self._adds)

    def submit(self, prompt, params: SamplingParams, sink: DeltaSink, request_id: str | None = None,
               resume_token_ids: list[int] | None = None) -> str:
        """Admit a request whose deltas go to `sink`; returns its id. With `resume_token_ids`
        (outputs a lost replica already delivered) only what comes after them is sent: no token
        or text twice, none missing. Raises at once for bad input, when draining or when full."""
        if self.draining:
            raise DrainingError("replica is draining: no new requests")
        if self.num_requests() >= self.max_waiting:
            raise OverloadedError(f"replica has {self.max_waiting} requests in flight", retry_after_s=1.0)
        seq = self.engine.make_sequence(prompt, params, request_id or f"req-{next(self._ids)}", resume_token_ids)
        stream = _Stream(seq, sink, sent_tokens=seq.num_resumed, sent_chars=self._delivered_chars(seq))
        with self._lock:
            if seq.request_id in self._streams or any(a.seq.request_id == seq.request_id for a in self._adds):
                raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
            self._adds.append(stream)
            self.stats.arrived(seq.request_id)
            self._lock.notify()
        self.arrivals.add(seq.prompt_token_ids)
        return seq.request_id

    async def stream(self, prompt, params: SamplingParams, request_id: str | None = None,
                     resume_token_ids: list[int] | None = None) -> AsyncIterator[OutputDelta]:
        """Deltas of one request (see submit); closing the iterator early aborts it."""
        sink = _QueueSink()
        request_id = self.submit(prompt, params, sink, request_id, resume_token_ids)
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, RequestFailed):
                    finished = True
                    raise item.error
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._lock.notify()

    def abort_sink(self, sink: DeltaSink) -> int:
        """Abort every request whose deltas go to `sink`; returns how many."""
        with self._lock:
            ids = [s.seq.request_id for s in [*self._streams.values(), *self._adds] if s.sink is sink]
            self._aborts.extend(ids)
            self._lock.notify()
        return len(ids)

    def call_between_steps(self, fn) -> None:
        """Run fn(engine) on the engine thread at the next step boundary."""
        with self._lock:
            self._calls.append(fn)
            self._lock.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ----- engine thread -----
    def _run(self, build_engine: Callable[[], LLMEngine], built: Future) -> None:
        try:
            self.engine = build_engine()
        except BaseException as error:  # handed to the constructor, which raises it
            built.set_exception(error)
            return
        built.set_result(None)
        self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._stopped or self._adds or self._aborts or self._calls or self.engine.has_unfinished()):
                    self._lock.wait()
                if self._stopped:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
                for stream in adds:
                    self._streams[stream.seq.request_id] = stream
            for stream in adds:
                self.engine.admit(stream.seq)
            aborted = [self._streams.pop(request_id) for request_id in aborts if self.engine.abort(request_id)]
            self.stats.ended((stream.seq.request_id for stream in aborted), "abort")
            self._deliver(aborted, lambda stream: RequestFailed(stream.seq.request_id, RequestAbortedError()))
            for fn in calls:
                fn(self.engine)
            if not self.engine.has_unfinished():
                continue
            started = time.perf_counter()
            try:
                updated = self._step_with_recovery()
            except Exception as error:  # the step failed for good: fail its requests, keep serving
                self._fail_all(error)
                continue
            ended = time.perf_counter()
            self.step_log.append((ended, ended - started, len(updated)))
            self.stats.stepped(updated, ended)
            streams = [self._streams[seq.request_id] for seq in updated if seq.request_id in self._streams]
            with self._lock:
                for seq in updated:
                    if seq.finish_reason is not None:
                        self._streams.pop(seq.request_id, None)
            self._deliver(streams, self._delta)
        self._fail_all(DrainingError("engine stopped"))

    def _step_with_recovery(self):
        """A step whose shard was lost is retried on fresh shards (requests see no difference)."""
        attempts = self.engine.config.shard_recovery_attempts
        while True:
            try:
                return self.engine.step()
            except ShardUnavailableError as error:
                if attempts <= 0:
                    raise
                attempts -= 1
                log.warning("%s: replacing the shards and retrying the step", error)
                self.engine.replace_shards(error.shard)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            self.engine.abort(stream.seq.request_id)
        self.stats.ended((stream.seq.request_id for stream in streams), "error")
        self._deliver(streams, lambda stream: RequestFailed(stream.seq.request_id, error))

    @staticmethod
    def _deliver(streams: list[_Stream], item_of) -> None:
        """One batch per sink: item_of(stream) for each of its streams, in order."""
        batches: dict[int, tuple[DeltaSink, list]] = {}
        for stream in streams:
            batches.setdefault(id(stream.sink), (stream.sink, []))[1].append(item_of(stream))
        for sink, items in batches.values():
            sink.deliver(items)

    @staticmethod
    def _delivered_chars(seq: Sequence) -> int:
        """How much text a client already got for the resumed tokens: what the lost replica's
        detokenizer, fed the same tokens, had released (this one has just been fed them too)."""
        return seq.detokenizer.num_released(finished=False)

    def _delta(self, stream: _Stream) -> OutputDelta:
        seq = stream.seq
        finished = seq.finish_reason is not None
        released = seq.detokenizer.num_released(finished)
        new_tokens = seq.output_token_ids[stream.sent_tokens:]
        delta = OutputDelta(
            request_id=seq.request_id, token_ids=new_tokens,
            text_delta=seq.detokenizer.text_between(stream.sent_chars, released),
            logprobs=seq.logprobs[stream.sent_tokens:] if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
            cached_prompt_tokens=seq.num_cached_prompt_tokens)
        stream.sent_tokens, stream.sent_chars = len(seq.output_token_ids), released
        return delta
