"""Plain SQL migrations, applied in file-name order under an advisory lock.

Two replicas starting at once both call ``migrate``: the second waits on the lock,
then finds everything applied and does nothing.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant shared by all mediavault processes; "mvmigrat" in ASCII.
MIGRATION_LOCK_ID = 0x6D766D6967726174


def available_migrations() -> list[tuple[str, str]]:
    folder = resources.files("mediavault.db") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(dsn: str) -> list[str]:
    """Applies pending migrations and returns the names of those it applied."""
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in available_migrations():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                log.info("migration applied", extra={"migration": name})
                applied_now.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied_now
