from __future__ import annotations

import asyncio

import asyncpg
import pytest

from mediavault.db import migrate
from mediavault.db.migrate import available_migrations
from tests.conftest import create_database, drop_database


async def test_replicas_migrating_at_once_apply_each_migration_once(postgres_admin_url):
    dsn = await create_database(postgres_admin_url)
    try:
        results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
        names = [name for name, _ in available_migrations()]
        assert sorted(sum(results, [])) == sorted(names), "every migration applied by exactly one replica"
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
        finally:
            await conn.close()
    finally:
        await drop_database(postgres_admin_url, dsn)


async def test_ledger_is_append_only(pool):
    await pool.execute(
        "INSERT INTO accounts (user_id, quota_bytes) VALUES ('ledger-probe', 10) ON CONFLICT DO NOTHING"
    )
    await pool.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ('ledger-probe', 'grant', 10)")
    for statement in (
        "UPDATE ledger_entries SET quota_delta = 0 WHERE user_id = 'ledger-probe'",
        "DELETE FROM ledger_entries WHERE user_id = 'ledger-probe'",
        "TRUNCATE ledger_entries CASCADE",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pool.execute(statement)
    assert await pool.fetchval("SELECT sum(quota_delta) FROM ledger_entries WHERE user_id = 'ledger-probe'") == 10


@pytest.mark.parametrize(
    ("used", "reserved", "quota"),
    [(-1, 0, 10), (0, -1, 10), (6, 5, 10)],
)
async def test_quota_invariant_is_a_constraint(pool, used, reserved, quota):
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO accounts (user_id, quota_bytes, used_bytes, reserved_bytes) VALUES ('bad', $1, $2, $3)",
            quota, used, reserved,
        )
