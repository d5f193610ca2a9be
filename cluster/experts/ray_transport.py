"""Transports to expert shards in other processes: Ray actor calls, and Ray Compiled Graph
channels (shared memory on one node; NCCL would carry GPU tensors). Activations travel as
contiguous numpy buffers. Every wait has a timeout; a failed or silent shard surfaces as a
retryable ShardUnavailableError naming it."""

import time

import ray
import torch

from moefleet.cluster.errors import ShardUnavailableError
from moefleet.cluster.experts.transport import ShardTraffic, ShardWork
from moefleet.cluster.experts.wire import ShardRequest, control, from_numpy, to_numpy


def _request(work: ShardWork) -> ShardRequest:
    return ShardRequest(work.layer, to_numpy(work.rows), work.row_index.numpy(), work.experts.numpy(),
                        work.weights.float().numpy(), str(work.rows.dtype).removeprefix("torch."), work.epoch)


def _replies_to_tensors(work, requests, replies, traffic: ShardTraffic) -> list[torch.Tensor]:
    out = []
    for w, request, reply in zip(work, requests, replies):
        if reply.error is not None:
            raise ShardUnavailableError(w.shard, f"raised {reply.error}")
        traffic.record(w.shard, sum(a.nbytes for a in (request.rows, request.row_index, request.experts, request.weights)),
                       reply.partial.nbytes, reply.compute_s)
        out.append(from_numpy(reply.partial, request.dtype))
    return out


class ActorTransport:
    """One actor call per shard with work; the replies are awaited together."""

    max_in_flight = 1_000_000  # actor calls queue at the actor; any number may be pending

    def __init__(self, actors: list, timeout_s: float, local: list[bool]):
        self.actors, self.timeout_s = actors, timeout_s
        self.traffic = ShardTraffic(len(actors), local)

    def send(self, work: list[ShardWork]):
        requests = [_request(w) for w in work]
        return work, requests, [self.actors[w.shard].compute.remote(r) for w, r in zip(work, requests)]

    def receive(self, handle) -> list[torch.Tensor]:
        work, requests, refs = handle
        deadline = time.monotonic() + self.timeout_s
        replies = []
        for w, ref in zip(work, refs):
            try:
                replies.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                raise ShardUnavailableError(w.shard, f"no reply within {self.timeout_s:.0f}s") from None
            except ray.exceptions.RayActorError as e:
                raise ShardUnavailableError(w.shard, f"actor died ({type(e).__name__})") from None
            except ray.exceptions.RayError as e:
                raise ShardUnavailableError(w.shard, f"{type(e).__name__}: {e}"[:300]) from None
        return _replies_to_tensors(work, requests, replies, self.traffic)

    def close(self) -> None:
        pass


class CompiledGraphTransport:
    """A Ray Compiled Graph over all shards: one execution per MoE layer per micro-batch sends
    every shard its request (None when idle) over pre-allocated channels, without the per-call
    scheduling of actor tasks."""

    def __init__(self, actors: list, timeout_s: float, local: list[bool]):
        from ray.dag import InputNode, MultiOutputNode

        self.actors, self.timeout_s = actors, timeout_s
        self.traffic = ShardTraffic(len(actors), local)
        # Two executions in flight let micro-batches overlap. Across nodes, Ray 2.60 crashes its
        # raylet (mutable object WriteAcquire check) with more than one in flight, so graphs
        # reaching another node keep one; the engine then runs without overlap.
        self.max_in_flight = 2 if all(local) else 1
        with InputNode() as inp:
            dag = MultiOutputNode([actor.compute.bind(inp[i]) for i, actor in enumerate(actors)])
        self.compiled = dag.experimental_compile(_max_inflight_executions=self.max_in_flight,
                                                 _submit_timeout=timeout_s)

    def send(self, work: list[ShardWork]):
        requests = [_request(w) for w in work]
        payload = [None] * len(self.actors)
        for w, r in zip(work, requests):
            payload[w.shard] = r
        try:
            return work, requests, self.compiled.execute(*payload)
        except Exception as e:
            raise self._failure(e) from None

    def receive(self, handle) -> list[torch.Tensor]:
        work, requests, ref = handle
        try:
            replies = ray.get(ref, timeout=self.timeout_s)
        except Exception as e:
            raise self._failure(e) from None
        return _replies_to_tensors(work, requests, [replies[w.shard] for w in work], self.traffic)

    def _failure(self, error: Exception) -> ShardUnavailableError:
        """Channel errors do not say which actor failed: ask each one."""
        return ShardUnavailableError(self._find_failed_shard(), f"{type(error).__name__}: {error}"[:300])

    def _find_failed_shard(self) -> int | None:
        for shard, actor in enumerate(self.actors):
            try:
                ray.get(control(actor, "info").remote(), timeout=2)
            except Exception:
                return shard
        return None

    def close(self) -> None:
        try:
            self.compiled.teardown()
        except Exception:  # a graph with a dead actor may fail its teardown; nothing more to free
            pass
