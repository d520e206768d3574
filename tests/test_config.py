"""Settings refuse, as they are read, the values a process would otherwise fail on only later."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from mediavault.config import OTHER_PROGRAMS_VARIABLES, Settings, unknown_variable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MEDIAVAULT_HTTP_ADDR", "nonsense", "http_addr"),
        ("MEDIAVAULT_GRPC_ADDR", "127.0.0.1:port", "grpc_addr"),
        ("MEDIAVAULT_METRICS_ADDR", "127.0.0.1:70000", "metrics_addr"),
        ("MEDIAVAULT_LOG_LEVEL", "verbose", "log_level"),
        ("MEDIAVAULT_TRUSTED_PROXIES", '["10.0.0.0/8", "10.0.0.300/32"]', "trusted_proxies"),
        ("MEDIAVAULT_DB_POOL_MIN_SIZE", "20", "db_pool_min_size (20) is larger than db_pool_max_size (10)"),
    ],
)
def test_a_bad_value_fails_as_the_settings_are_read_naming_the_setting(monkeypatch, variable, value, named):
    """Before: a server failed binding ("invalid literal for int()"), configuring its logs
    ("Unknown level: 'VERBOSE'"), creating its pool (asyncpg's "min_size is greater than
    max_size") or building its rate limiter after migrations had run (a worker never)."""
    monkeypatch.setenv("MEDIAVAULT_DB_POOL_MAX_SIZE", "10")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=re.escape(named)):
        Settings()


@pytest.mark.parametrize(
    ("variable", "value", "taken"),
    [
        ("MEDIAVAULT_HTTP_ADDR", ":8081", ":8081"),
        ("MEDIAVAULT_GRPC_ADDR", "[::1]:0", "[::1]:0"),
        ("MEDIAVAULT_METRICS_ADDR", "", ""),
        ("MEDIAVAULT_METRICS_ADDR", "0.0.0.0:9100", "0.0.0.0:9100"),
        ("MEDIAVAULT_LOG_LEVEL", "debug", "debug"),
        ("MEDIAVAULT_TRUSTED_PROXIES", '["10.0.0.0/8", "fd00::/8", "192.168.1.7"]', ("10.0.0.0/8", "fd00::/8", "192.168.1.7")),
        ("MEDIAVAULT_DB_POOL_MIN_SIZE", "10", 10),
    ],
)
def test_good_values_are_taken_as_they_are(monkeypatch, variable, value, taken):
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), variable.removeprefix("MEDIAVAULT_").lower()) == taken


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("MEDIAVAULT_DATABSE_URL", "MEDIAVAULT_DATABASE_URL"),
        ("MEDIAVAULT_GRPC_ADRR", "MEDIAVAULT_GRPC_ADDR"),
        # A name this release no longer reads.
        ("MEDIAVAULT_EPHEMERAL_TTL", "MEDIAVAULT_EPHEMERAL_TTL_SECONDS"),
        ("mediavault_jwt_secrte", "MEDIAVAULT_JWT_SECRET"),
    ],
)
def test_a_variable_that_names_no_setting_fails_as_the_settings_are_read_naming_the_closest(monkeypatch, variable, closest):
    """Before: ignored, and the process ran on the default of the setting it meant."""
    monkeypatch.setenv(variable, "the-value-3f9a")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert f"{variable.upper()}\n  names no setting; the closest is {closest} " in str(refused.value)
    assert "the-value-3f9a" not in str(refused.value)


def test_a_variable_far_from_every_setting_is_refused_too(monkeypatch):
    monkeypatch.setenv("MEDIAVAULT_COLOUR", "blue")
    with pytest.raises(ValidationError, match="MEDIAVAULT_COLOUR\n  names no setting"):
        Settings()


def test_the_variables_of_the_project_s_other_programs_are_no_settings_and_allowed(monkeypatch):
    for variable in [*OTHER_PROGRAMS_VARIABLES, "MEDIAVAULT_TEST_CORPUS", "MEDIAVAULT_BENCH_LOG_LEVEL", "MEDIAVAULT_GATEWAY_ADDR"]:
        monkeypatch.setenv(variable, "x")
    monkeypatch.setenv("MEDIAVAULT_JOBS__PURGE_DELETED_MEDIA__AGE_SECONDS", "60")
    assert Settings().jobs.purge_deleted_media.age_seconds == 60


def test_every_mediavault_variable_the_project_reads_is_a_setting_or_allowed():
    # Docs and the changelog name retired variables, tests misspell some on purpose, and config.py
    # holds the allowed prefixes.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    read = {
        (path, name)
        for path in files
        if not (path.endswith(".md") or Path(path).name.startswith("test_") or path == "src/mediavault/config.py")
        and (ROOT / path).is_file()
        for name in re.findall(r"MEDIAVAULT_[A-Z0-9_]*[A-Z0-9]", (ROOT / path).read_text(errors="replace"))
    }
    assert len({name for _, name in read}) > 50
    assert {(path, name, unknown_variable(name)) for path, name in read if unknown_variable(name) is not None} == set()
