"""Plain SQL migrations, applied in file-name order, each while holding the migration lock.

Two replicas starting at once both call ``migrate``: they take the lock in turn, and the second
finds each migration applied and does nothing. The lock is transaction-level
(pg_try_advisory_xact_lock) and nothing else of a run outlives its transactions, so the DSN may
go through PgBouncer in transaction mode as well as straight to PostgreSQL; a session lock
there would be taken on one server connection and released (or leaked) on another.

A replica asks for the lock every LOCK_POLL_SECONDS, each time in a short transaction of its
own, rather than waiting in pg_advisory_xact_lock: a statement waiting there holds a snapshot,
CREATE INDEX CONCURRENTLY (run by the replica holding the lock) waits for every older snapshot
to go, and neither would ever end, unseen by PostgreSQL's deadlock detector.

A migration runs in one transaction under lock_timeout (LOCK_TIMEOUT_SECONDS). Without it, an
ALTER TABLE queued behind a long transaction (a slow report, a session left idle in a
transaction) would hold up every later query of its table for as long as that transaction
lasts. A migration that times out is rolled back and tried again after each of
RETRY_DELAYS_SECONDS, then ``migrate`` raises MigrationBlocked, which names it.

A migration whose first line is ``-- mediavault: no-transaction`` runs outside any transaction,
for statements that cannot run in one (CREATE INDEX CONCURRENTLY). Its statements run one at a
time, each in autocommit, on a second connection, while the first holds the lock in an open
transaction and records the migration in it once every statement has succeeded. The file is
split into statements by lines: a statement ends with the line whose last character (trailing
blanks aside) is a semicolon, and whole-line ``--`` comments belong to no statement; so a
statement with a line ending in a semicolon inside it (a function body) belongs in an ordinary
migration. A crash midway leaves the migration unrecorded and it runs again from its first
statement, so each statement must be safe to repeat: an index build cut short leaves an INVALID
index of its name behind, which ``DROP INDEX CONCURRENTLY IF EXISTS`` before the ``CREATE INDEX
CONCURRENTLY`` takes away. No lock_timeout applies there: such statements take no lock that
readers or writers queue behind, and they wait for older transactions as long as those last.

Both connections have the app's session settings (db/pool.py: TimeZone UTC, DateStyle ISO),
not the database's defaults, under which a timestamp put through text can come back in another
zone: 0011's partition bounds did (see 0018).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar

import asyncpg

from mediavault.db.pool import SESSION_SETTINGS

log = logging.getLogger(__name__)

# Any constant shared by all mediavault processes; "mvmigrat" in ASCII.
MIGRATION_LOCK_ID = 0x6D766D6967726174
LOCK_POLL_SECONDS = 0.1
# Every query of the table a migration waits to lock queues behind it meanwhile.
LOCK_TIMEOUT_SECONDS = 3.0
# Six attempts in all, giving up after about 50 s.
RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
NO_TRANSACTION = "-- mediavault: no-transaction"

_CREATE_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)
_IS_APPLIED = "SELECT EXISTS (SELECT FROM schema_migrations WHERE name = $1)"
_RECORD = "INSERT INTO schema_migrations (name) VALUES ($1)"

T = TypeVar("T")


class MigrationBlocked(RuntimeError):
    """A migration never got the lock on a table it changes within its attempts."""


def available_migrations() -> list[tuple[str, str]]:
    folder = resources.files("mediavault.db") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


def statements(sql: str) -> list[str]:
    """The statements of a no-transaction migration, split as the module's docstring says."""
    found: list[str] = []
    lines: list[str] = []
    for line in sql.splitlines():
        if line.lstrip().startswith("--"):
            continue
        lines.append(line)
        if line.rstrip().endswith(";"):
            found.append("\n".join(lines).strip())
            lines = []
    if "".join(lines).strip():
        raise ValueError(f"no semicolon ends the last statement: {' '.join(lines).strip()[:80]!r}")
    return found


async def _connect(dsn: str) -> asyncpg.Connection:
    # Uncached statements work behind a transaction pooler too; a run's few gain nothing from a cache.
    return await asyncpg.connect(dsn, statement_cache_size=0, server_settings=dict(SESSION_SETTINGS))


async def migrate(dsn: str) -> list[str]:
    """Applies pending migrations and returns the names of those it applied."""
    conn = await _connect(dsn)
    applied_now: list[str] = []
    try:
        done = await _holding_lock(conn, lambda: _ledger(conn))
        for name, sql in available_migrations():
            if name not in done and await _apply(conn, dsn, name, sql):
                log.info("migration applied", extra={"migration": name})
                applied_now.append(name)
    finally:
        await conn.close()
    return applied_now


async def _holding_lock(conn: asyncpg.Connection, work: Callable[[], Awaitable[T]]) -> T:
    """What work returns, run in a transaction that holds the migration lock."""
    while True:
        # Read committed whatever the database's default: the transaction holding the lock then
        # keeps no snapshot from its first statement to its end (see _apply_outside_transaction).
        async with conn.transaction(isolation="read_committed"):
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MIGRATION_LOCK_ID):
                return await work()
        await asyncio.sleep(LOCK_POLL_SECONDS)


async def _ledger(conn: asyncpg.Connection) -> set[str]:
    await conn.execute(_CREATE_LEDGER)
    return {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}


async def _apply(conn: asyncpg.Connection, dsn: str, name: str, sql: str) -> bool:
    """Whether this call applied the migration; False when another replica had meanwhile."""
    if sql.partition("\n")[0].rstrip() == NO_TRANSACTION:
        split = statements(sql)
        return await _holding_lock(conn, lambda: _apply_outside_transaction(conn, dsn, name, split))
    delays = iter(RETRY_DELAYS_SECONDS)
    while True:
        try:
            return await _holding_lock(conn, lambda: _apply_in_transaction(conn, name, sql))
        except asyncpg.LockNotAvailableError as err:
            delay = next(delays, None)
            if delay is None:
                raise MigrationBlocked(
                    f"migration {name} not applied: a long transaction holds a table it changes (it waited"
                    f" {LOCK_TIMEOUT_SECONDS:g} s for the table's lock {len(RETRY_DELAYS_SECONDS) + 1} times); end"
                    " that transaction (pg_stat_activity: the oldest xact_start, sessions idle in transaction)"
                    " or start again once it is over"
                ) from err
        log.warning("migration waited too long for a table lock, retrying", extra={"migration": name, "delay_seconds": delay})
        await asyncio.sleep(delay)


async def _apply_in_transaction(conn: asyncpg.Connection, name: str, sql: str) -> bool:
    if await conn.fetchval(_IS_APPLIED, name):
        return False
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{round(LOCK_TIMEOUT_SECONDS * 1000)}ms")
    await conn.execute(sql)
    await conn.execute(_RECORD, name)
    return True


async def _apply_outside_transaction(conn: asyncpg.Connection, dsn: str, name: str, split: list[str]) -> bool:
    if await conn.fetchval(_IS_APPLIED, name):
        return False
    # While the statements run, the lock's transaction sits idle for as long as an index build
    # takes: a server-wide idle_in_transaction_session_timeout would end it, and the lock with it.
    # Sent as a simple query (no arguments), which also closes the portal the statement before left
    # open with its snapshot: an index build waits for every snapshot older than its own to go.
    await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
    autocommit = await _connect(dsn)
    try:
        for statement in split:
            await autocommit.execute(statement)
    finally:
        await autocommit.close()
    await conn.execute(_RECORD, name)
    return True
