"""This gateway's end of its output channel with one replica actor (the replica's end is
cluster/engine/output_channel.py). Requests go in one actor call each (`submit`); what they
produce comes back in one call per engine step for all of this gateway's requests on that
replica (`next_outputs`, called in a loop while any request waits), and is handed to each
request's queue here. Deltas of one request that arrive together leave as one (coalesced writes).

A replica that dies fails the pending call, and every request waiting on it gets that error, so
the pool resumes them elsewhere (replica_pool.py)."""

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

from moefleet.cluster.messages import GenerateRequest, OutputDelta, RequestFailed, join_deltas


class ReplicaChannel:
    def __init__(self, actor, wait_s: float = 1.0):
        self.actor, self.wait_s = actor, wait_s
        self.channel_id = uuid.uuid4().hex  # one per gateway process and replica
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its deltas (or failure)
        self._pump: asyncio.Task | None = None
        self._acked = 0  # the replica keeps each batch until a call acknowledges it

    async def stream(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """The request's deltas; leaving early aborts it on the replica (frees its KV blocks)."""
        if not request.request_id:  # ids key the channel's requests: make one unique across gateways
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        queue = self._queues[request.request_id] = asyncio.Queue()
        finished = False
        try:
            await self.actor.submit.remote(self.channel_id, request)
            if self._pump is None or self._pump.done():
                self._pump = asyncio.ensure_future(self._take_outputs())
            while not finished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                deltas = [item for item in batch if isinstance(item, OutputDelta)]
                failure = next((item for item in batch if isinstance(item, RequestFailed)), None)
                if deltas:
                    delta = join_deltas(deltas)
                    finished = delta.finish_reason is not None
                    yield delta
                if failure is not None:
                    finished = True
                    raise failure.error
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self._abort(request.request_id)

    async def _take_outputs(self) -> None:
        """Take the replica's outputs while any request waits (the loop ends without awaiting
        once none does, so a request that arrives later starts a new one)."""
        while self._queues:
            try:
                self._acked, items = await self.actor.next_outputs.remote(self.channel_id, self._acked, self.wait_s)
            except Exception as error:  # the replica is gone: so is every request it held
                for request_id, queue in self._queues.items():
                    queue.put_nowait(RequestFailed(request_id, error))
                return
            for item in items:
                queue = self._queues.get(item.request_id)
                if queue is not None:  # else its caller left and aborted it
                    queue.put_nowait(item)

    def _abort(self, request_id: str) -> None:
        try:
            self.actor.abort.remote(request_id)
        except Exception:  # the replica is gone already: nothing left to cancel
            pass
