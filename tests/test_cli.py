"""The mediavault CLI as operators run it: a real subprocess against the test database."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt

from tests.conftest import JWT_SECRET


def mediavault(*args: str, database_url: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    environment.update({"MEDIAVAULT_JWT_SECRET": JWT_SECRET, "MEDIAVAULT_DATABASE_URL": database_url, **env})
    return subprocess.run(
        [sys.executable, "-m", "mediavault.cli", *args], capture_output=True, text=True, env=environment, timeout=60
    )


def test_token_prints_a_usable_jwt():
    result = mediavault("token", "--sub", "alice", "--role", "admin", "--role", "billing")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["admin", "billing"]


def test_migrate_is_idempotent(database_url):
    result = mediavault("migrate", database_url=database_url)
    assert result.returncode == 0, result.stderr
    assert "applied 0 migration(s)" in result.stdout


async def test_audit_ledger_exits_non_zero_on_a_mismatch(database_url, pool, storage, auth, user_id):
    from mediavault.storage.v1 import storage_pb2 as pb

    await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
    clean = mediavault("audit-ledger", database_url=database_url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ledger audit ok" in clean.stdout

    await pool.execute("UPDATE accounts SET used_bytes = used_bytes + 7 WHERE user_id = $1", user_id)
    try:
        broken = mediavault("audit-ledger", database_url=database_url)
    finally:
        await pool.execute("UPDATE accounts SET used_bytes = used_bytes - 7 WHERE user_id = $1", user_id)
    assert broken.returncode == 1
    assert f'"user_id": "{user_id}", "figure": "used_bytes"' in broken.stdout
    assert "FAILED" in broken.stderr


def test_serve_refuses_to_start_without_a_database():
    result = mediavault("serve")
    assert result.returncode != 0
    assert "MEDIAVAULT_DATABASE_URL is not set" in result.stderr
