"""OutputChannel: one gateway's end on a replica. The engine thread hands it, once per step,
every delta of that gateway's requests (a DeltaSink, see async_engine.py); the gateway takes them
all in one call (`take`), so what crosses the process boundary is one message per step per
gateway, not one per token per request. While the gateway's call is away, batches pile up and
leave together.

Nothing is lost with a call: each batch is numbered and kept until the gateway's next call
acknowledges it, so a call whose answer never reached the gateway (cancelled, its event loop
closed) is answered again by the next one."""

import asyncio
from collections import deque

from moefleet.cluster.messages import OutputDelta, RequestFailed


class OutputChannel:
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self._batches: deque[tuple[int, list[OutputDelta | RequestFailed]]] = deque()  # (number, items), unacknowledged
        self._next = 1
        self._ready = asyncio.Event()
        self.last_take = self.loop.time()

    def abandoned(self, after_s: float) -> bool:
        """Whether the gateway has not come for its outputs for `after_s` while some wait (its
        process is gone: its requests only cost the replica)."""
        return bool(self._batches) and self.loop.time() - self.last_take > after_s

    def deliver(self, items: list[OutputDelta | RequestFailed]) -> None:
        """Engine thread: queue a step's items (never blocks the step)."""
        try:
            self.loop.call_soon_threadsafe(self._add, items)
        except RuntimeError:  # the replica's loop is gone: it is shutting down
            pass

    def _add(self, items: list[OutputDelta | RequestFailed]) -> None:
        self._batches.append((self._next, items))
        self._next += 1
        self._ready.set()

    async def take(self, acked: int, wait_s: float) -> tuple[int, list[OutputDelta | RequestFailed]]:
        """(number of the newest batch, every item after batch `acked`), forgetting the batches
        up to `acked`; waits up to `wait_s` for one (then (acked, []))."""
        self.last_take = self.loop.time()
        while self._batches and self._batches[0][0] <= acked:
            self._batches.popleft()
        if not self._batches:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), wait_s)
            except TimeoutError:
                return acked, []
        return self._batches[-1][0], [item for _, items in self._batches for item in items]
