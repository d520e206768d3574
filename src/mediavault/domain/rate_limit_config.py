"""The operator-editable rate limits (the rate_limit_config table) and the frozen accounts the limiter refuses."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from mediavault.db.pool import connection_within

_LIMITS = "SELECT method, scope, per_hour, burst_per_second FROM rate_limit_config"
_FROZEN = "SELECT user_id FROM accounts WHERE frozen"


@dataclass(frozen=True)
class ConfiguredLimit:
    method: str
    scope: str
    per_hour: int
    burst_per_second: int


@dataclass(frozen=True)
class Snapshot:
    limits: tuple[ConfiguredLimit, ...]
    frozen: frozenset[str]


class RateLimitConfig:
    """Reads the limits and the frozen accounts together, on one connection."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load(self, within_seconds: float) -> Snapshot:
        """TimeoutError when PostgreSQL has not answered within within_seconds, the wait for a connection included."""
        async with connection_within(self._pool, within_seconds) as conn:
            limits = await conn.fetch(_LIMITS)
            frozen = await conn.fetch(_FROZEN)
        return Snapshot(tuple(ConfiguredLimit(**row) for row in limits), frozenset(r["user_id"] for r in frozen))
