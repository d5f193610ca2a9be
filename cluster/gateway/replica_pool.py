"""The gateway's view of the replicas: handles that stream from a replica (in this process, or a
Ray actor), outstanding-token accounting for routing, refresh from the controller, and resuming
a request whose replica was lost on another one (re-prefilling prompt + tokens delivered)."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from moefleet.cluster.errors import DrainingError, OverloadedError, ReplicaLostError
from moefleet.cluster.gateway.error_codes import unwrap
from moefleet.cluster.gateway.replica_channel import CHANNELS
from moefleet.cluster.gateway.router import ReplicaLoad, choose_replica, prefix_key
from moefleet.cluster.messages import GenerateRequest, OutputDelta

log = logging.getLogger(__name__)


def is_replica_loss(error: BaseException) -> bool:
    """The replica process is gone (not: the request was bad or the replica refused it)."""
    if isinstance(error, ReplicaLostError):
        return True
    try:
        import ray
    except ImportError:
        return False
    return isinstance(error, ray.exceptions.RayActorError)


class LocalReplicaHandle:
    """A Replica object living in the gateway's own process."""

    def __init__(self, replica):
        self.replica, self.replica_id = replica, replica.replica_id

    async def stream(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        async for delta in self.replica.generate_stream(request):
            yield delta

    async def call(self, method: str, *args):
        result = getattr(self.replica, method)(*args)
        return await result if asyncio.iscoroutine(result) else result


class RayReplicaHandle:
    """A Replica actor: requests and their deltas go through this gateway's channel with it, over
    `transport` (replica_channel.py: "socket" or "actor_call")."""

    def __init__(self, actor, replica_id: str, transport: str = "socket"):
        self.actor, self.replica_id = actor, replica_id
        self.channel = CHANNELS[transport](actor)

    def stream(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        return self.channel.stream(request)

    async def call(self, method: str, *args):
        return await getattr(self.actor, method).remote(*args)


class ReplicaPool:
    def __init__(self, handles: list, max_outstanding_tokens: int = 1 << 20, locality=None):
        self.handles = {h.replica_id: h for h in handles}
        self.outstanding: dict[str, int] = {h.replica_id: 0 for h in handles}
        self.draining: set[str] = set()
        self.lost: set[str] = set()  # replicas whose process died under a request; never routed to again
        self.failover_wait_s = 10.0  # how long a request that lost its replica waits for another to serve
        # How long a new request waits when no replica serves (a deployment scaled to zero, or all
        # replicas being replaced): 0 fails it at once. waiting_for_replica counts those waiting.
        self.wait_for_replica_s = 0.0
        self.waiting_for_replica = 0
        self.max_outstanding_tokens = max_outstanding_tokens
        # Optional request -> {replica_id: share of its predicted expert activations on that replica's
        # node} (request shuffling, speculative scheduling), or None where nothing is predicted.
        self.locality = locality

    def set_handles(self, handles: list) -> None:
        """The replicas now serving; a replica already known keeps its handle (and its channel)."""
        self.handles = {h.replica_id: self.handles.get(h.replica_id, h) for h in handles}
        self.outstanding = {rid: self.outstanding.get(rid, 0) for rid in self.handles}
        self.draining &= set(self.handles)
        for rid in self.lost & set(self.handles):  # the controller has not noticed yet
            self.handles.pop(rid)
            self.outstanding.pop(rid, None)

    def any(self):
        if not self.handles:
            raise DrainingError("no replica is serving")
        return next(iter(self.handles.values()))

    def pick(self, request: GenerateRequest):
        ids = list(self.handles)
        loads = [ReplicaLoad(rid, self.outstanding[rid], rid in self.draining) for rid in ids]
        locality = self.locality(request) if self.locality is not None else None
        chosen = choose_replica(loads, prefix_key(request), locality=locality)
        if chosen < 0:
            raise DrainingError("every replica is draining")
        if loads[chosen].outstanding_tokens >= self.max_outstanding_tokens:
            raise OverloadedError(f"replica {ids[chosen]} has {loads[chosen].outstanding_tokens} tokens queued",
                                  retry_after_s=1.0)
        return self.handles[ids[chosen]]

    async def _first_pick(self, request: GenerateRequest):
        try:
            return self.pick(request)
        except DrainingError:
            if not self.wait_for_replica_s:
                raise
        self.waiting_for_replica += 1  # the controller hears of it: the autoscaler scales from zero
        try:
            return await self._pick_for_retry(request, self.wait_for_replica_s)
        finally:
            self.waiting_for_replica -= 1

    async def _pick_for_retry(self, request: GenerateRequest, wait_s: float):
        """A replica for a request that lost its own: membership may lag a loss or a drain by a
        refresh, so wait up to `wait_s` for one to serve before giving up."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.pick(request)
            except DrainingError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def stream(self, request: GenerateRequest, cost: int,
                     max_replica_losses: int = 2) -> AsyncIterator[OutputDelta]:
        """Route and stream one request; `cost` (prompt + max tokens) is held against the replica.
        If the replica dies mid-request, the request resumes on another replica from the tokens
        already delivered (`resume_token_ids`): the caller sees no duplicate and no gap."""
        delivered: list[int] = []
        finished = False  # the request's last delta (with its finish reason) was delivered
        losses = refusals = 0
        while True:
            attempt = dataclasses.replace(request, resume_token_ids=tuple(delivered)) if delivered else request
            retrying = losses or refusals
            handle = await (self._pick_for_retry(attempt, self.failover_wait_s) if retrying
                            else self._first_pick(attempt))
            self.outstanding[handle.replica_id] = self.outstanding.get(handle.replica_id, 0) + cost
            try:
                async for delta in handle.stream(attempt):
                    delivered += delta.token_ids
                    finished = delta.finish_reason is not None
                    yield delta
                return
            except Exception as error:
                if finished:
                    # The replica failed after the request's last delta reached the caller (a kill
                    # between that delta and the stream's end): the request is whole, and resuming
                    # it would ask another replica for tokens past its end.
                    if is_replica_loss(error):
                        self.mark_lost(handle.replica_id)
                    else:
                        log.warning("replica %s failed after finishing a request: %r", handle.replica_id, error)
                    return
                if isinstance(unwrap(error), DrainingError) and refusals < len(self.handles):
                    # a replica started draining before this gateway heard of it: another takes the request
                    refusals += 1
                    self.draining.add(handle.replica_id)
                    continue
                if not is_replica_loss(error):
                    raise
                losses += 1
                self.mark_lost(handle.replica_id)
                if losses > max_replica_losses:
                    raise ReplicaLostError(f"request lost {losses} replicas in a row (last: {handle.replica_id}); "
                                           f"retry it") from None
            finally:
                if handle.replica_id in self.outstanding:
                    self.outstanding[handle.replica_id] -= cost

    def mark_lost(self, replica_id: str) -> None:
        self.lost.add(replica_id)
        self.handles.pop(replica_id, None)
        self.outstanding.pop(replica_id, None)

    def mark_draining(self, replica_id: str) -> None:
        self.draining.add(replica_id)
