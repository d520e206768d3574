"""The mediavault CLI as operators run it: a real subprocess against the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from mediavault.config import Settings
from mediavault.dev import jwt_secret
from tests.conftest import JWT_SECRET


def mediavault(*args: str, database_url: str = "", cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    environment.update({"MEDIAVAULT_JWT_SECRET": JWT_SECRET, "MEDIAVAULT_DATABASE_URL": database_url, **env})
    return subprocess.run(
        [sys.executable, "-m", "mediavault.cli", *args], capture_output=True, text=True, env=environment, timeout=60, cwd=cwd
    )


def test_token_prints_a_usable_jwt():
    result = mediavault("token", "--sub", "alice", "--role", "admin", "--role", "billing")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["admin", "billing"]


def test_token_without_a_secret_signs_with_the_dev_secret_of_its_data_dir(tmp_path):
    data_dir = tmp_path / "dev-data"
    secret = jwt_secret(Settings(jwt_secret=""), data_dir)  # what `mediavault dev --data-dir` makes
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = mediavault("token", "--sub", "alice", "--data-dir", str(data_dir), cwd=elsewhere, MEDIAVAULT_JWT_SECRET="")
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "alice"
    assert not (elsewhere / ".mediavault").exists()


def test_token_without_any_secret_makes_none_and_fails(tmp_path):
    # A secret of its own would sign a token that no server accepts.
    result = mediavault("token", "--sub", "alice", cwd=tmp_path, MEDIAVAULT_JWT_SECRET="")
    assert result.returncode == 1
    assert not result.stdout
    assert "MEDIAVAULT_JWT_SECRET is not set and there is no .mediavault/dev-jwt-secret" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--sub", ""], "argument --sub: must be 1-128 characters"),
        (["--sub", "a" * 129], "argument --sub: must be 1-128 characters"),
        (["--sub", "alice", "--ttl", "0"], "argument --ttl: must be a positive whole number of seconds"),
        (["--sub", "alice", "--ttl", "-60"], "argument --ttl: must be a positive whole number of seconds"),
    ],
)
def test_token_refuses_what_no_server_would_accept(args, error):
    result = mediavault("token", *args)
    assert result.returncode != 0
    assert not result.stdout
    assert error in result.stderr


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


async def test_jobs_run_audit_accounts_exits_non_zero_on_a_mismatch(database_url, redis_url, pool, storage, auth, user_id, tmp_path):
    from mediavault.storage.v1 import storage_pb2 as pb

    await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
    env = {"database_url": database_url, "MEDIAVAULT_REDIS_URL": redis_url, "MEDIAVAULT_BLOB_DIR": str(tmp_path)}
    clean = mediavault("jobs", "run", "audit_accounts", **env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["findings"] == 0

    await pool.execute("UPDATE accounts SET used_bytes = used_bytes + 7 WHERE user_id = $1", user_id)
    try:
        broken = mediavault("jobs", "run", "audit_accounts", **env)
    finally:
        await pool.execute("UPDATE accounts SET used_bytes = used_bytes - 7 WHERE user_id = $1", user_id)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    report = json.loads(broken.stdout)
    assert report["errors"] == 0
    assert report["findings"] == report["details"]["ledger_mismatches"] > 0


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["audit-ledger"], ["jobs", "run", "audit_accounts"]])
def test_a_command_that_fails_logs_one_json_line_with_its_traceback(command, tmp_path):
    # Nothing listens on port 1: the first connection fails.
    result = mediavault(
        *command, database_url="postgresql://mediavault:db-password@127.0.0.1:1/mediavault",
        MEDIAVAULT_REDIS_URL="redis://:redis-password@127.0.0.1:1/0", MEDIAVAULT_WORKER_REDIS_OUTAGE_SECONDS="0.1",
        MEDIAVAULT_LOG_FORMAT="json", MEDIAVAULT_BLOB_DIR=str(tmp_path),
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    failed = lines[-1]
    assert (failed["level"], failed["msg"], failed["command"]) == ("critical", "command failed", command[0])
    assert failed["exc"].startswith("Traceback (most recent call last):")
    assert "Connect" in failed["exc"].rstrip().splitlines()[-1]
    assert "password" not in result.stderr


def test_serve_refuses_to_start_without_a_database():
    result = mediavault("serve")
    assert result.returncode != 0
    assert "MEDIAVAULT_DATABASE_URL is not set" in result.stderr


def test_jobs_list_names_each_job_with_its_whole_description():
    # Before: the first line of each job's docstring, cut mid-sentence for sweep_orphan_blobs
    # ("quarantined ones still") and prune_telemetry.
    result = mediavault("jobs", "list")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"reclaim_stale_uploads", "expire_ephemeral_media", "purge_deleted_media", "fail_stuck_processing",
                          "sweep_orphan_blobs", "prune_telemetry", "audit_accounts"}
    assert lines["sweep_orphan_blobs"].endswith("live media whose original is missing is marked FAILED.")
    assert lines["prune_telemetry"].endswith("Counters (media_counters) are lifetime totals and stay.")
    assert all(line.endswith(".") for line in lines.values())


def test_a_misspelt_setting_stops_a_command_before_it_runs():
    # Before: ignored, and the command ran on the default listen address.
    result = mediavault("jobs", "list", MEDIAVAULT_GRPC_ADRR="0.0.0.0:50051", MEDIAVAULT_LOG_FORMAT="json")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = [json.loads(line) for line in result.stderr.splitlines()]
    assert (line["level"], line["msg"]) == ("critical", "invalid settings")
    assert line["settings"] == [{"setting": "MEDIAVAULT_GRPC_ADRR", "problem": "names no setting; the closest is MEDIAVAULT_GRPC_ADDR"}]


@pytest.mark.parametrize("log_format", ["json", "not-a-format"])
def test_invalid_settings_are_one_log_line_naming_each_without_its_value(log_format):
    # Before: a Python traceback, bare lines a JSON log collector took for events of their own,
    # holding pydantic's input_value: the secret itself when a secret was the bad value.
    result = mediavault(
        "worker", MEDIAVAULT_DB_POOL_MIN_SIZE="db-password", MEDIAVAULT_LOG_FORMAT=log_format,
        MEDIAVAULT_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert result.returncode == 1
    [line] = [json.loads(line) for line in result.stderr.splitlines()]  # stderr is no terminal: JSON for "auto"
    assert (line["level"], line["msg"]) == ("critical", "invalid settings")
    problems = {problem["setting"] for problem in line["settings"]}
    assert "MEDIAVAULT_DB_POOL_MIN_SIZE" in problems
    assert ("MEDIAVAULT_LOG_FORMAT" in problems) == (log_format == "not-a-format")
    assert "db-password" not in result.stderr
