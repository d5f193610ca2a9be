"""This gateway's channel with one replica actor. Requests go in by actor calls (`submit_many`), one
at a time: those that arrive while a call is out go together in the next one, so a burst of requests
costs the replica and this gateway a few calls, not one each, and a lone request waits for none. What
they produce comes back for all of this gateway's requests on that replica at once, one
message per engine step, and is handed to each request's queue here. Deltas of one request that
arrive together leave as one (coalesced writes).

Two transports bring the outputs back (benchmarks/output_channel.py measures them side by side):
- `SocketChannel` (the default): a TCP connection to the replica, one frame per step, read here
  as it arrives (the replica's end: cluster/engine/output_socket.py);
- `ActorCallChannel`: an actor call per step (`next_outputs`, in a loop while any request waits),
  for deployments where gateways may reach replicas only through Ray's own ports (the replica's
  end: cluster/engine/output_channel.py).

A replica that dies (or whose connection breaks) fails every request waiting on it, so the pool
resumes them elsewhere (replica_pool.py)."""

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

from moefleet.cluster.errors import ReplicaLostError
from moefleet.cluster.messages import GenerateRequest, OutputDelta, RequestFailed, join_deltas
from moefleet.cluster.output_wire import FRAME_HEADER, HELLO_OK, decode_frame


class ReplicaChannel:
    """Requests in, per-request queues out; subclasses bring the replica's outputs to `_hand_out`."""

    def __init__(self, actor):
        self.actor = actor
        self.channel_id = uuid.uuid4().hex  # one per gateway process and replica
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its deltas (or failure)
        self._unsent: list[tuple[GenerateRequest, asyncio.Future]] = []  # waiting for the call out to return
        self._sending: asyncio.Task | None = None

    async def _open(self) -> None:
        """Ready to take outputs for a request about to be submitted."""
        raise NotImplementedError

    def _submitted(self) -> None:
        """A request was admitted (its outputs may start arriving)."""

    async def stream(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        """The request's deltas; leaving early aborts it on the replica (frees its KV blocks)."""
        if not request.request_id:  # ids key the channel's requests: make one unique across gateways
            request = dataclasses.replace(request, request_id=uuid.uuid4().hex)
        queue = self._queues[request.request_id] = asyncio.Queue()
        finished = False
        try:
            await self._open()
            await self._submit(request)
            self._submitted()
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

    async def _submit(self, request: GenerateRequest) -> None:
        """Admitted on the replica once this returns; raises the request's own error (bad input,
        draining, full) or the call's (the replica is gone)."""
        loop = asyncio.get_running_loop()
        admitted = loop.create_future()
        self._unsent.append((request, admitted))
        if self._sending is None or self._sending.done() or self._sending.get_loop() is not loop:
            self._sending = loop.create_task(self._send_unsent())
        await admitted

    async def _send_unsent(self) -> None:
        while self._unsent:
            # A request whose caller left before it was sent is not sent: its abort went out already.
            batch, self._unsent = [(r, admitted) for r, admitted in self._unsent if not admitted.done()], []
            if not batch:
                continue
            try:
                errors = await self.actor.submit_many.remote(self.channel_id, [request for request, _ in batch])
            except Exception as error:  # the call failed: every request in it did
                errors = [error] * len(batch)
            for (_, admitted), error in zip(batch, errors):
                if admitted.done():  # its caller gave up (cancelled) meanwhile
                    continue
                if error is None:
                    admitted.set_result(None)
                else:
                    admitted.set_exception(error)

    def _hand_out(self, items: list[OutputDelta | RequestFailed]) -> None:
        for item in items:
            queue = self._queues.get(item.request_id)
            if queue is not None:  # else its caller left and aborted it
                queue.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(RequestFailed(request_id, error))

    def _abort(self, request_id: str) -> None:
        try:
            self.actor.abort.remote(request_id)
        except Exception:  # the replica is gone already: nothing left to cancel
            pass


class SocketChannel(ReplicaChannel):
    """Outputs over one TCP connection to the replica, opened on first use (and again after it
    broke), read by a task while it lives."""

    def __init__(self, actor):
        super().__init__(actor)
        self._reader: asyncio.Task | None = None  # reads the open connection's frames
        self._connecting: asyncio.Task | None = None  # shared by the requests that arrive meanwhile

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader.get_loop() is loop and not self._reader.done():
            return
        if self._connecting is None or self._connecting.get_loop() is not loop or self._connecting.done():
            self._connecting = loop.create_task(self._connect())
        await asyncio.shield(self._connecting)  # a request that gives up does not cancel the others' connect

    async def _connect(self) -> None:
        host, port = await self.actor.output_address.remote()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(self.channel_id.encode("ascii") + b"\n")
        if await reader.readline() != HELLO_OK:
            writer.close()
            raise ReplicaLostError(f"replica at {host}:{port} refused this gateway's output connection")
        self._reader = asyncio.ensure_future(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                self._hand_out(decode_frame(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, OSError) as error:
            self._fail_all(ReplicaLostError(f"the output connection to the replica broke: {error!r}"))
        finally:
            writer.close()


class ActorCallChannel(ReplicaChannel):
    """Outputs by an actor call per step, looped while any request waits; the replica keeps each
    batch until a call acknowledges it, so an answer lost with its call is sent again."""

    def __init__(self, actor, wait_s: float = 1.0):
        super().__init__(actor)
        self.wait_s = wait_s
        self._pump: asyncio.Task | None = None
        self._acked = 0

    async def _open(self) -> None:
        pass

    def _submitted(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._take_outputs())

    async def _take_outputs(self) -> None:
        """Take the replica's outputs while any request waits (the loop ends without awaiting
        once none does, so a request that arrives later starts a new one)."""
        while self._queues:
            try:
                self._acked, items = await self.actor.next_outputs.remote(self.channel_id, self._acked, self.wait_s)
            except Exception as error:  # the replica is gone: so is every request it held
                self._fail_all(error)
                return
            self._hand_out(items)


CHANNELS = {"socket": SocketChannel, "actor_call": ActorCallChannel}
