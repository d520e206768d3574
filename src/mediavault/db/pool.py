from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mediavault import tracing
from mediavault.config import Settings

log = logging.getLogger(__name__)

# Every session's, the migrations' included (db/migrate.py), rather than the database's
# defaults: SQL that puts a timestamp through text (a partition bound of usage_events) reads
# it back in the zone it was written in only under ISO, and days are UTC days.
# How a statement fails, whatever the cause: PostgreSQL refusing it, or the connection to it
# refused, cut or timing out; for the callers that answer every such failure alike.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
SESSION_SETTINGS = {"timezone": "UTC", "datestyle": "ISO, YMD"}

# Past it, close_pool cuts the connections (asyncpg terminates a pool whose close is cancelled).
CLOSE_SECONDS = 2.0


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


async def create_pool(settings: Settings, dsn: str | None = None) -> asyncpg.Pool:
    dsn = dsn or settings.database_url
    if not dsn:
        raise ValueError("MEDIAVAULT_DATABASE_URL is not set")
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        reset=_reset,
        # Statements are spans only while tracing is on; otherwise asyncpg's own class runs them.
        connection_class=tracing.TracedConnection if tracing.tracer is not None else asyncpg.Connection,
        **connect_options(settings),
    )


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
