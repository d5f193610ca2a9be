"""The replica's end of the socket transport for outputs: each gateway opens one TCP connection
to the replica and names its channel; after every engine step, everything that step gave that
gateway's requests leaves as one length-prefixed frame (vLLM's engine-core -> API-server shape
over a socket).

Why a socket and not an actor call per step: in the replica process, Ray's call handling (its
core-worker thread and the actor's event loop) took about 40% of the time the GIL was held at 16
requests, and the engine thread waited for it every step (benchmarks/output_channel.py compares
the two). Here the engine thread only queues a step's items; a writer thread per connection pickles
what piled up and sends it, with the GIL released while the kernel copies.

Frames: cluster/output_wire.py. Nothing is lost on a live connection (TCP); a connection that breaks aborts that gateway's requests here (its process died:
nobody is left to read them), and the gateway treats it as a lost replica (it resumes them)."""

import logging
import queue
import socket
import threading
from collections.abc import Callable

from moefleet.cluster.messages import OutputDelta, RequestFailed
from moefleet.cluster.output_wire import HELLO_OK, MAX_CHANNEL_ID, encode_frame

log = logging.getLogger(__name__)


class SocketSink:
    """One gateway's connection. `deliver` (a DeltaSink, on the engine thread) never blocks; a
    writer thread sends what piled up since its last send as one frame."""

    def __init__(self, conn: socket.socket, on_closed: Callable[["SocketSink"], None]):
        self._conn, self._on_closed = conn, on_closed
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        threading.Thread(target=self._write, name="moefleet-output-writer", daemon=True).start()

    def deliver(self, items: list[OutputDelta | RequestFailed]) -> None:
        if not self.closed:
            self._pending.put(items)

    def close(self) -> None:
        self._pending.put(None)

    def _write(self) -> None:
        while True:
            items = self._pending.get()
            stop = items is None
            while not stop and not self._pending.empty():  # coalesce whatever else is ready
                more = self._pending.get()
                stop = more is None
                items = items if stop else items + more
            try:
                if items:
                    self._conn.sendall(encode_frame(items))
            except OSError as error:  # the gateway is gone
                log.info("output connection closed: %s", error)
                stop = True
            if stop:
                break
        self.closed = True
        try:
            self._conn.close()
        finally:
            self._on_closed(self)


class OutputListener:
    """Accepts gateways' connections on `host`, any free port. A gateway sends its channel id and
    a newline, and gets `ok` back once its sink is registered (so its first request finds it)."""

    def __init__(self, host: str, on_closed: Callable[[SocketSink], None]):
        self._on_closed = on_closed
        self._server = socket.create_server((host, 0))
        self.address = (host, self._server.getsockname()[1])
        self._sinks: dict[str, SocketSink] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="moefleet-output-listener", daemon=True).start()

    def sink(self, channel_id: str) -> SocketSink | None:
        with self._lock:
            return self._sinks.get(channel_id)

    def close(self) -> None:
        self._server.close()
        with self._lock:
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            sink.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._hello, args=(conn,), daemon=True).start()

    def _hello(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10.0)
            channel_id = conn.makefile("rb").readline(MAX_CHANNEL_ID + 1).rstrip(b"\n").decode("ascii")
            if not channel_id or len(channel_id) > MAX_CHANNEL_ID:
                raise ValueError(f"bad channel id {channel_id[:40]!r}")
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sink = SocketSink(conn, self._closed)
            with self._lock:
                old, self._sinks[channel_id] = self._sinks.get(channel_id), sink
            if old is not None:
                old.close()
            conn.sendall(HELLO_OK)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            log.warning("refused an output connection: %s", error)
            conn.close()

    def _closed(self, sink: SocketSink) -> None:
        with self._lock:
            for channel_id, known in list(self._sinks.items()):
                if known is sink:
                    del self._sinks[channel_id]
        self._on_closed(sink)
