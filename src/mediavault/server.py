"""Server(settings): startup / serve / shutdown(grace) for the gRPC API and the blob HTTP listener."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket

import asyncpg
import grpc
from aiohttp import web
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mediavault import metrics, tracing
from mediavault.admission import Admission
from mediavault.auth import Authenticator
from mediavault.blobs import BlobStore, open_blob_store
from mediavault.blobs.fs import FsBlobStore
from mediavault.blobs.http import create_app
from mediavault.config import Settings, listen_address
from mediavault.db import close_pool
from mediavault.db import create_pool as create_db_pool
from mediavault.db.pool import DATABASE_ERRORS, connection_within, sample_pool_use
from mediavault.domain.rate_limit_config import RateLimitConfig
from mediavault.media.v1 import media_pb2
from mediavault.ratelimit import RateLimiter
from mediavault.rpc.drain import CallGate, current_gate
from mediavault.rpc.handler import add_to_server
from mediavault.rpc.media import MediaServicer
from mediavault.rpc.storage import StorageServicer
from mediavault.services import build_services
from mediavault.storage.v1 import storage_pb2
from mediavault.tus import TusEndpoints

log = logging.getLogger(__name__)

# After the gate's drain only calls it does not see can be left, such as a balancer's health
# Watch, which never ends by itself: it must not hold the process for the whole grace period.
_TRANSPORT_GRACE_SECONDS = 0.5

SERVICE_NAMES = (
    storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name,
    media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name,
)


class Server:
    """Owns every long-lived resource of one API process.

    ``async with Server(settings) as server`` starts it (tests use this);
    ``server.grpc_port`` / ``server.http_port`` give the bound ports when
    the configured ones are 0. With ``reuse_port`` (a child of ``serve --processes N``) both
    listeners share their port with the other processes bound to it (SO_REUSEPORT); ``slot`` is
    the child's place among the N, which labels the metrics of its own database pool.
    """

    def __init__(self, settings: Settings, *, reuse_port: bool = False, slot: int = 0) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.slot = slot
        self.pool: asyncpg.Pool | None = None
        self.blobs: BlobStore | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.calls = CallGate()
        self.grpc_port = 0
        self.http_port = 0
        self._http_runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._shutdown: asyncio.Future[None] | None = None
        self.metrics: metrics.MetricsEndpoint | None = None
        self.queue: ArqRedis | None = None
        self.limiter: RateLimiter | None = None
        self._background: list[asyncio.Task] = []
        self._traced = False

    async def startup(self) -> None:
        settings = self.settings
        # First: the pool and the blob store are made traced or not by it.
        self._traced = tracing.start("mediavault-server")
        authenticator = Authenticator(settings.jwt_secret.get_secret_value(), leeway_seconds=settings.jwt_leeway_seconds)
        self.pool = await create_db_pool(settings)
        # Both backends: the listener carries the tus endpoints, and on fs the signed blob URLs.
        http_socket = self._bind_http()
        if not settings.http_public_url:
            # Signed URLs must name the port really bound when MEDIAVAULT_HTTP_ADDR asks for port 0.
            host = http_socket.getsockname()[0]
            if http_socket.family == socket.AF_INET6:
                host = f"[{host}]"
            settings = settings.model_copy(update={"http_public_url": f"http://{host}:{self.http_port}"})
        self.blobs = await open_blob_store(settings)

        self.grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                ("grpc.max_connection_idle_ms", round(settings.grpc_idle_connection_seconds * 1000)),
                ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
            ]
        )
        if settings.redis_url:
            self.queue = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
        services = build_services(self.pool, tracing.traced_blobs(self.blobs, settings.blob_backend), self.queue, settings)
        self.limiter = RateLimiter(
            self.queue,
            RateLimitConfig(self.pool),
            services.accounts,
            redis_down_policy=settings.rate_limit_redis_down_policy,
            trusted_proxies=settings.trusted_proxies,
            auto_freeze_refusals=settings.rate_limit_auto_freeze_refusals,
            auto_freeze_window_seconds=settings.rate_limit_auto_freeze_window_seconds,
        )
        await self.limiter.reload()
        admission = Admission(authenticator, self.limiter, rate_limits=settings.rate_limits == "on")
        storage = StorageServicer(
            admission, uploads=services.uploads, accounts=services.accounts, purchases=services.purchases
        )
        media = MediaServicer(admission, library=services.library, events=services.events)
        add_to_server(storage, self.grpc_server)
        add_to_server(media, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        self.grpc_port = self.grpc_server.add_insecure_port(settings.grpc_addr)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {settings.grpc_addr}")
        gate_token = current_gate.set(self.calls)
        try:
            await self.grpc_server.start()
        finally:
            current_gate.reset(gate_token)

        tus = TusEndpoints(services.resumable, services.uploads, admission, settings)
        await self._start_http(http_socket, self.blobs if isinstance(self.blobs, FsBlobStore) else None, tus)
        if settings.metrics_addr:
            self.metrics = metrics.MetricsEndpoint(settings.metrics_addr)

        await self._set_health(True)
        metrics.HEALTH_DATABASE.set(1)  # start-up has just read the rate limits from PostgreSQL
        self._background = [
            asyncio.create_task(self.limiter.run_reloads(settings.rate_limit_reload_seconds)),
            asyncio.create_task(self._probe_database()),
            asyncio.create_task(
                sample_pool_use(
                    self.pool,
                    metrics.SERVER_DB_CONNECTIONS_IN_USE.labels(self.slot),
                    metrics.SERVER_DB_CONNECTIONS_MAX.labels(self.slot),
                )
            ),
        ]
        log.info(
            "server started",
            extra={"grpc_port": self.grpc_port, "http_port": self.http_port, "blob_backend": settings.blob_backend},
        )

    def _bind_http(self) -> socket.socket:
        address = listen_address(self.settings.http_addr)
        sock = socket.create_server(
            address.sockaddr, family=address.family, dualstack_ipv6=address.dual_stack, reuse_port=self.reuse_port
        )
        self.http_port = sock.getsockname()[1]
        return sock

    async def _start_http(self, sock: socket.socket, store: FsBlobStore | None, tus: TusEndpoints) -> None:
        app = create_app(store, idle_seconds=self.settings.tus_idle_timeout_seconds)
        tus.add_routes(app)
        # aiohttp's keep-alive timer also runs from a connection's opening, and closes it only while
        # no request's headers are complete: it is the read-header timeout, and the idle one.
        self._http_runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=5, keepalive_timeout=self.settings.http_read_header_timeout_seconds
        )
        await self._http_runner.setup()
        await web.SockSite(self._http_runner, sock).start()

    async def serve(self) -> None:
        """Runs until SIGTERM/SIGINT (or shutdown()), then leaves the balancers' rotation and drains."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self.startup()
        # What exists now (modules, descriptors, pools) lives as long as the process. Out of
        # the collector's sight, a full collection no longer walks it: under load that walk
        # stalled every call in flight for about 50 ms every few seconds.
        gc.collect()
        gc.freeze()
        try:
            await self._stopped.wait()
        finally:
            await self.shutdown(self.settings.shutdown_grace_seconds, prestop=self.settings.shutdown_prestop_seconds)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def shutdown(self, grace: float, prestop: float = 0.0) -> None:
        """Answers NOT_SERVING at once and serves on for prestop seconds; then refuses new calls
        (UNAVAILABLE), lets the received ones finish for up to grace seconds, and closes resources.

        Safe to call more than once and concurrently: every caller waits for the one drain.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain_and_close(grace, prestop))
        await asyncio.shield(self._shutdown)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _probe_database(self) -> None:
        """Health follows PostgreSQL: NOT_SERVING while it cannot be reached, so balancers route around."""
        pool = self.pool
        assert pool is not None  # probing starts after start-up made the pool
        serving = True
        while True:
            await asyncio.sleep(self.settings.health_probe_seconds)
            try:
                await self._select_one(pool)
                reachable = True
            except (*DATABASE_ERRORS, TimeoutError):
                reachable = False
            metrics.HEALTH_DATABASE.set(1 if reachable else 0)
            if reachable != serving and not self._stopped.is_set():
                serving = reachable
                await self._set_health(serving)
                log.warning("database reachable" if serving else "database unreachable: NOT_SERVING")

    async def _select_one(self, pool: asyncpg.Pool) -> None:
        """SELECT 1 within health_probe_seconds; TimeoutError past them."""
        async with connection_within(pool, self.settings.health_probe_seconds) as conn:
            await conn.fetchval("SELECT 1")

    async def _drain_and_close(self, grace: float, prestop: float) -> None:
        self._stopped.set()
        for task in self._background:
            task.cancel()
        # Balancers and Kubernetes move traffic away on NOT_SERVING. Check keeps answering it
        # through the pre-stop period and the drain, because the gRPC server stops only after.
        await self.health.enter_graceful_shutdown()
        if self.grpc_server is not None:
            await asyncio.sleep(prestop)
            await self.calls.drain(grace)
            await self.grpc_server.stop(min(grace, _TRANSPORT_GRACE_SECONDS))
            self.grpc_server = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.blobs is not None:
            await self.blobs.close()
            self.blobs = None
        if self.queue is not None:
            await self.queue.aclose()
            self.queue = None
        if self.pool is not None:
            await close_pool(self.pool)
            self.pool = None
        if self._traced:
            self._traced = False
            await tracing.stop()
        log.info("server stopped")

    async def __aenter__(self) -> Server:
        try:
            await self.startup()
        except BaseException:
            await self.shutdown(0)
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown(self.settings.shutdown_grace_seconds)
