"""Settings refuse, as they are read, the values a process would otherwise fail on only later."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from mediavault.config import Settings


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
