"""Plain SQL migrations, applied in file-name order, each in a transaction holding the migration lock.

Two replicas starting at once both call ``migrate``: the second waits on the lock, then
finds each migration applied and does nothing. The lock is transaction-level
(pg_advisory_xact_lock) and nothing else of a run outlives its transaction, so the DSN may
go through PgBouncer in transaction mode as well as straight to PostgreSQL; a session lock
there would be taken on one server connection and released (or leaked) on another.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant shared by all mediavault processes; "mvmigrat" in ASCII.
MIGRATION_LOCK_ID = 0x6D766D6967726174

_CREATE_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


def available_migrations() -> list[tuple[str, str]]:
    folder = resources.files("mediavault.db") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(dsn: str) -> list[str]:
    """Applies pending migrations and returns the names of those it applied."""
    # Uncached statements work behind a transaction pooler too; a run's few gain nothing from a cache.
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    applied_now: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            await conn.execute(_CREATE_LEDGER)
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in available_migrations():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                if await conn.fetchval("SELECT EXISTS (SELECT FROM schema_migrations WHERE name = $1)", name):
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("migration applied", extra={"migration": name})
            applied_now.append(name)
    finally:
        await conn.close()
    return applied_now
