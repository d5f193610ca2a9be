"""Gateway: one stateless front-door process serving gRPC (Inference, Admin, health, reflection)
and the OpenAI-compatible HTTP API on its own event loop, routing to replicas. Several gateways
bind the same ports (SO_REUSEPORT) and the kernel spreads connections among them. A plain class
(`Gateway.start()` runs it in a background thread); actors/gateway_host.py is its Ray shell."""

import asyncio
import threading
import time
import uuid

from moefleet.cluster.errors import DrainingError
from moefleet.cluster.gateway.admin import GatewayAdmin
from moefleet.cluster.gateway.auth import TokenAuth
from moefleet.cluster.gateway.deployment_metrics import deployment_families
from moefleet.cluster.gateway.grpc_server import NOT_SERVING, SERVING, build_grpc_server
from moefleet.cluster.gateway.http_server import HttpApi
from moefleet.cluster.gateway.replica_metrics import merge_replica_metrics
from moefleet.cluster.gateway.replica_pool import RayReplicaHandle, ReplicaPool, is_replica_loss
from moefleet.cluster.gateway.request_locality import RequestLocality

LOCALITY_REFRESH_S = 10.0  # the controller's table changes with its model and placement: slowly
# With a controller, a request that finds no serving replica waits this long for one (the
# autoscaler starts one from zero; the controller replaces lost ones) instead of failing at once.
WAIT_FOR_REPLICA_S = 120.0


class Gateway:
    def __init__(self, handles: list, model_id: str, auth: TokenAuth, grpc_address: str = "127.0.0.1:0",
                 http_host: str = "127.0.0.1", http_port: int | None = 0, tls: tuple[bytes, bytes] | None = None,
                 controller=None, num_gateways: int = 1, max_outstanding_tokens: int = 1 << 20,
                 transport: str = "socket"):
        self.request_locality = RequestLocality()
        self.pool = ReplicaPool(handles, max_outstanding_tokens, locality=self.request_locality)
        if controller is not None:
            self.pool.wait_for_replica_s = WAIT_FOR_REPLICA_S
        self.gateway_id = uuid.uuid4().hex[:8]
        self._told_waiting = 0
        self.model_id, self.auth, self.controller, self.num_gateways = model_id, auth, controller, num_gateways
        self.transport = transport  # of the replicas' outputs to this gateway (replica_channel.py)
        self.grpc_address, self.http_host, self.http_port, self.tls = grpc_address, http_host, http_port, tls
        self.admin = GatewayAdmin(self)
        self.draining = False
        self.health = None
        self._model_info = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ----- used by the servers -----
    def check_accepting(self) -> None:
        if self.draining:
            raise DrainingError("gateway is draining: no new requests")

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.pool.any().call("model_info")
        return self._model_info

    async def refresh_replicas(self) -> None:
        if self.controller is None:
            return
        replicas = await self.controller.replicas.remote()
        self.pool.set_handles([RayReplicaHandle(actor, rid, self.transport) for rid, actor, _ in replicas])
        for rid, _, draining in replicas:
            if draining:
                self.pool.draining.add(rid)

    async def tell_waiting(self) -> None:
        """Tell the controller how many requests wait here for a replica (when any do, or did)."""
        waiting = self.pool.waiting_for_replica
        if waiting or self._told_waiting:
            await self.controller.note_waiting.remote(self.gateway_id, waiting)
            self._told_waiting = waiting

    async def refresh_locality(self) -> None:
        """The controller's request-shuffling table (None where it predicts nothing useful)."""
        if self.controller is not None:
            self.request_locality.update(await self.controller.gateway_locality.remote())

    async def control_health(self) -> dict | None:
        """The controller's health (store reachable? epoch?), or why it cannot be had; None
        without a controller."""
        if self.controller is None:
            return None
        try:
            return await asyncio.wait_for(self.controller.health.remote(), timeout=2.0)
        except Exception as e:
            return {"ok": False, "store": "unknown", "error": f"controller unreachable: {type(e).__name__}"}

    async def metrics_text(self) -> str:
        """Every replica's metrics in one exposition, each sample labelled with its replica; a
        replica lost since the last refresh is left out (its series go stale, as Prometheus expects)."""
        handles = list(self.pool.handles.values())
        texts = await asyncio.gather(*(h.call("metrics_text") for h in handles), return_exceptions=True)
        for text in texts:
            if isinstance(text, BaseException) and not is_replica_loss(text):
                raise text
        return merge_replica_metrics({h.replica_id: text for h, text in zip(handles, texts) if isinstance(text, str)},
                                     deployment_families(await self._deployment_gauges()))

    async def _deployment_gauges(self) -> dict:
        if self.controller is None:
            return {}
        try:
            return await asyncio.wait_for(self.controller.deployment_gauges.remote(), timeout=2.0)
        except Exception:  # the controller is restarting: the replicas' metrics still answer
            return {}

    # ----- lifecycle -----
    async def serve(self) -> tuple[int, int | None]:
        """Start both servers on the running loop; returns (grpc port, http port)."""
        from aiohttp import web

        self.loop = asyncio.get_running_loop()
        self.grpc_server, grpc_port = build_grpc_server(self, self.grpc_address, self.tls)
        await self.grpc_server.start()
        await self.health.set("", SERVING)
        http_port = None
        if self.http_port is not None:
            self.http_runner = web.AppRunner(HttpApi(self).app(), access_log=None)
            await self.http_runner.setup()
            ssl_context = None
            if self.tls:
                import ssl
                import tempfile

                ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                with tempfile.NamedTemporaryFile("wb") as cert, tempfile.NamedTemporaryFile("wb") as key:
                    cert.write(self.tls[0]), key.write(self.tls[1])
                    cert.flush(), key.flush()
                    ssl_context.load_cert_chain(cert.name, key.name)
            site = web.TCPSite(self.http_runner, self.http_host, self.http_port, reuse_port=True, ssl_context=ssl_context)
            await site.start()
            http_port = site._server.sockets[0].getsockname()[1]
        if self.controller is not None:
            self._refresher = asyncio.ensure_future(self._refresh_forever())
        return grpc_port, http_port

    async def _refresh_forever(self, every_s: float = 1.0) -> None:
        locality_at = 0.0
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh_replicas()
                await self.tell_waiting()
                if time.monotonic() - locality_at >= LOCALITY_REFRESH_S:
                    locality_at = time.monotonic()
                    await self.refresh_locality()
            except Exception:  # the controller is restarting; keep the last known replicas and table
                pass

    async def drain(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish (up to grace_s), then stop."""
        self.draining = True
        await self.health.set("", NOT_SERVING)
        deadline = time.monotonic() + grace_s
        while any(self.pool.outstanding.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc_server.stop(grace=max(0.0, deadline - time.monotonic()))
        if self.http_port is not None:
            await self.http_runner.cleanup()

    def start(self) -> tuple[int, int | None]:
        """Run the gateway on its own event loop in a daemon thread; returns the bound ports."""
        ready = threading.Event()
        result: dict = {}

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                result["ports"] = loop.run_until_complete(self.serve())
            except BaseException as e:  # report a bind failure to the caller
                result["error"] = e
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="moefleet-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        if "error" in result:
            raise result["error"]
        return result["ports"]

    def stop(self, grace_s: float = 30.0) -> None:
        """Drain and stop a gateway started with start()."""
        asyncio.run_coroutine_threadsafe(self.drain(grace_s), self.loop).result(timeout=grace_s + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
