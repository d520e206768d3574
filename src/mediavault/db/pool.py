from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy
from prometheus_client import Gauge

from mediavault import metrics, tracing
from mediavault.config import Settings

log = logging.getLogger(__name__)

# Every session's, the migrations' included (db/migrate.py), rather than the database's
# defaults: SQL that puts a timestamp through text (a partition bound of usage_events) reads
# it back in the zone it was written in only under ISO, and days are UTC days.
SESSION_SETTINGS = {"timezone": "UTC", "datestyle": "ISO, YMD"}

# How a statement fails, whatever the cause: PostgreSQL refusing it, or the connection to it
# refused, cut or timing out; for the callers that answer every such failure alike.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

# Past it, close_pool cuts the connections (asyncpg terminates a pool whose close is cancelled).
CLOSE_SECONDS = 2.0
# Every second, not at each scrape (under `serve --processes N` the supervisor answers scrapes
# from what its children wrote): a scrape sees a pool as it was up to a second before.
POOL_SAMPLE_SECONDS = 1.0


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset (RESET ALL, UNLISTEN, advisory unlock) costs a round trip
    # per checkout; mediavault sets no session state on pooled connections, so only an
    # unfinished transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def connect_options(settings: Settings) -> dict[str, Any]:
    """asyncpg.connect / create_pool keyword arguments for settings.database_pooler."""
    server_settings = {"application_name": "mediavault", **SESSION_SETTINGS}
    if settings.database_pooler == "none":
        return {"server_settings": server_settings}
    return {
        # Behind a transaction pooler a connection's next transaction may run in another
        # server session, where asyncpg's cached named statements do not exist. Uncached,
        # asyncpg sends each statement's (unnamed) Parse again with its Bind and Execute, so
        # the whole statement runs in the one session PgBouncer gives it.
        "statement_cache_size": 0,
        # asyncpg announces client_encoding 'utf-8'; PgBouncer compares that with the
        # server's UTF8 and would otherwise SET it again before every transaction.
        "server_settings": {**server_settings, "client_encoding": "UTF8"},
    }


class _WaitTimedPool(asyncpg.Pool):
    """A pool that observes how long each use of it waited for a connection (DB_CONNECTION_WAIT).

    Every way of using a pool (async with or await acquire(), fetch, execute...) takes its
    connection through acquire(). A wait that ends without a connection (the caller's deadline or
    timeout, a connection refused) counts too: with a full pool the longest waits are those.
    """

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return _WaitTimedAcquire(self, timeout)


class _WaitTimedAcquire(PoolAcquireContext):
    """asyncpg's acquire(), used either way (async with, await), with its wait observed."""

    __slots__ = ()

    async def __aenter__(self) -> PoolConnectionProxy:
        with _observed_wait():
            return await super().__aenter__()

    def __await__(self) -> Generator[Any, None, PoolConnectionProxy]:
        with _observed_wait():
            return (yield from super().__await__())


@contextlib.contextmanager
def _observed_wait() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.DB_CONNECTION_WAIT.observe(time.perf_counter() - started)


async def create_pool(settings: Settings, dsn: str | None = None) -> asyncpg.Pool:
    dsn = dsn or settings.database_url
    if not dsn:
        raise ValueError("MEDIAVAULT_DATABASE_URL is not set")
    # asyncpg.create_pool's call, with our class: it makes asyncpg's Pool only, and the Pool
    # constructor has no defaults, so the arguments no setting gives are create_pool's defaults.
    pool = _WaitTimedPool(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        reset=_reset,
        loop=None,
        # Statements are spans only while tracing is on; otherwise asyncpg's own class runs them.
        connection_class=tracing.TracedConnection if tracing.tracer is not None else asyncpg.Connection,
        record_class=asyncpg.Record,
        **connect_options(settings),
    )
    return await pool


async def sample_pool_use(pool: asyncpg.Pool, in_use: Gauge, most: Gauge) -> None:
    """Sets most to the most connections pool opens, then in_use to those its users hold, every
    POOL_SAMPLE_SECONDS until cancelled."""
    most.set(pool.get_max_size())
    while True:
        in_use.set(pool.get_size() - pool.get_idle_size())
        await asyncio.sleep(POOL_SAMPLE_SECONDS)


async def close_pool(pool: asyncpg.Pool) -> None:
    """Closes the pool once its users have ended or been cancelled, cutting its connections when
    PostgreSQL does not answer within CLOSE_SECONDS.

    asyncpg's close waits for every connection still held, and one whose statement was cancelled is
    given back only once the statement ends; then for each connection's goodbye. From a PostgreSQL
    that stopped answering (or behind PgBouncer, one it cannot reach) neither ever comes.
    """
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await pool.close()
    except TimeoutError:
        log.warning("database connections cut: PostgreSQL did not answer their close")


@contextlib.asynccontextmanager
async def connection_within(pool: asyncpg.Pool, seconds: float) -> AsyncIterator[PoolConnectionProxy]:
    """A connection of pool for a block that must end within seconds, the wait for the connection
    included; TimeoutError past them.

    A connection whose statement is cut is terminated, not given back: asyncpg gives it back only
    once PostgreSQL has acknowledged the statement's cancel, which a PostgreSQL that stopped
    answering never does, nor PgBouncer 1.18 while the statement waits for a server connection
    (it ignores the cancel), and the block would wait for it past its bound.
    """
    async with asyncio.timeout(seconds), pool.acquire() as conn:
        try:
            yield conn
        except asyncio.CancelledError:
            conn.terminate()
            raise
