from __future__ import annotations

import asyncpg

from mediavault.config import Settings


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset (RESET ALL, UNLISTEN, advisory unlock) costs a round trip
    # per checkout; mediavault sets no session state on pooled connections, so only an
    # unfinished transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(settings: Settings, dsn: str | None = None) -> asyncpg.Pool:
    dsn = dsn or settings.database_url
    if not dsn:
        raise ValueError("MEDIAVAULT_DATABASE_URL is not set")
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        server_settings={"application_name": "mediavault", "timezone": "UTC"},
        reset=_reset,
    )
