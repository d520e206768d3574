"""Accounts: creation on first use, quota figures, freeze. SQL of the accounts aggregate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mediavault.db.pool import connection_within
from mediavault.domain.media import PRESENT
from mediavault.errors import InvalidArgument, NotFound

MAX_FREEZE_REASON = 500

# The free tier is granted through the ledger like every other change, so that
# an account's quota always equals the sum of its ledger entries.
_ENSURE_ACCOUNT = """
WITH created AS (
    INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, $2)
    ON CONFLICT (user_id) DO NOTHING
    RETURNING user_id, quota_bytes
)
INSERT INTO ledger_entries (user_id, kind, quota_delta)
SELECT user_id, 'grant', quota_bytes FROM created
"""

_SUMMARY = f"""
SELECT a.user_id, a.quota_bytes, a.used_bytes, a.reserved_bytes, a.frozen, a.derived_bytes,
       (SELECT count(*) FROM media m WHERE m.owner_id = a.user_id AND {PRESENT}) AS media_count,
       (SELECT count(*) FROM uploads u WHERE u.user_id = a.user_id AND u.state = 'pending') AS pending_uploads
FROM accounts a WHERE a.user_id = $1
"""

# An operator's freeze ($3 true) replaces the reason of an earlier one; an automatic freeze
# acts only on an account not frozen yet, so that it never hides why an operator froze it.
_FREEZE = """
UPDATE accounts SET frozen = true, frozen_reason = $2, frozen_at = coalesce(frozen_at, now()), updated_at = now()
WHERE user_id = $1 AND ($3 OR NOT frozen)
RETURNING user_id, frozen, frozen_reason, frozen_at
"""

_UNFREEZE = """
UPDATE accounts SET frozen = false, frozen_reason = NULL, frozen_at = NULL, updated_at = now()
WHERE user_id = $1
RETURNING user_id, frozen, frozen_reason, frozen_at
"""

_STANDING = "SELECT frozen, quota_bytes, used_bytes, reserved_bytes, derived_bytes FROM accounts WHERE user_id = $1"


@dataclass(frozen=True)
class StorageSummary:
    user_id: str
    quota_bytes: int
    used_bytes: int
    reserved_bytes: int
    media_count: int
    pending_uploads: int
    frozen: bool
    # Variants and renditions of the media not deleted; not part of used_bytes.
    derived_bytes: int
    # Whether derived_bytes count against the quota (settings.quota_counts_derived_bytes).
    derived_counted: bool

    @property
    def available_bytes(self) -> int:
        return available_bytes(self.quota_bytes, self.used_bytes, self.reserved_bytes, self.derived_bytes, self.derived_counted)


@dataclass(frozen=True)
class Account:
    user_id: str
    frozen: bool
    frozen_reason: str | None
    frozen_at: datetime | None


@dataclass(frozen=True)
class Standing:
    frozen: bool
    quota_bytes: int
    used_bytes: int
    reserved_bytes: int
    derived_bytes: int

    def available_bytes(self, *, counts_derived: bool) -> int:
        return available_bytes(self.quota_bytes, self.used_bytes, self.reserved_bytes, self.derived_bytes, counts_derived)


def available_bytes(quota: int, used: int, reserved: int, derived: int, counts_derived: bool) -> int:
    """What a new reservation may still take, as uploads.statements.RESERVATION_GUARD counts it.

    Derived bytes arrive after their upload was committed and may push an account past its
    quota; it then has nothing available until media are deleted or quota is bought.
    """
    return max(quota - used - reserved - (derived if counts_derived else 0), 0)


async def ensure(conn: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy, user_id: str, free_quota_bytes: int) -> None:
    await conn.execute(_ENSURE_ACCOUNT, user_id, free_quota_bytes)


async def standing(conn: asyncpg.Pool | asyncpg.Connection, user_id: str) -> Standing | None:
    row = await conn.fetchrow(_STANDING, user_id)
    return Standing(**row) if row else None


# sum() of bigints is numeric, and stays so: each account's figures fit in a bigint, all
# accounts' together need not (one quota near 2**63, which purchases allow, and any other).
_TOTALS = """
SELECT coalesce(sum(quota_bytes), 0) AS quota, coalesce(sum(used_bytes), 0) AS used,
       coalesce(sum(reserved_bytes), 0) AS reserved
FROM accounts
"""

_COUNT = "SELECT count(*) FROM accounts"


@dataclass(frozen=True)
class Totals:
    """The bytes of every account added up."""

    quota: int
    used: int
    reserved: int


class Accounts:
    """Quota figures and freezes; an account is created with the free tier on first use."""

    def __init__(self, pool: asyncpg.Pool, free_quota_bytes: int, counts_derived_bytes: bool = False) -> None:
        self._pool = pool
        self.free_quota_bytes = free_quota_bytes
        self._counts_derived_bytes = counts_derived_bytes

    async def ensure(self, user_id: str) -> None:
        await ensure(self._pool, user_id, self.free_quota_bytes)

    async def summary(self, user_id: str, *, create: bool = True) -> StorageSummary:
        """The account's figures. One not made yet is made (its first use), unless create is false:
        then it is answered with the figures it would start with and nothing is written, so that
        reading other users' figures never makes accounts (nor ledger entries) for them."""
        row = await self._pool.fetchrow(_SUMMARY, user_id)
        if row is None and not create:
            return StorageSummary(
                user_id, self.free_quota_bytes, used_bytes=0, reserved_bytes=0, media_count=0, pending_uploads=0,
                frozen=False, derived_bytes=0, derived_counted=self._counts_derived_bytes,
            )
        if row is None:
            await self.ensure(user_id)
            row = await self._pool.fetchrow(_SUMMARY, user_id)
        if row is None:
            raise NotFound("account not found")
        return StorageSummary(**row, derived_counted=self._counts_derived_bytes)

    async def freeze(self, user_id: str, reason: str) -> Account:
        row = await self._freeze(self._pool, user_id, reason, replace=True)
        if row is None:
            raise NotFound("account not found")
        return Account(**row)

    async def freeze_automatically(self, user_id: str, reason: str, within_seconds: float) -> bool:
        """Freezes an account that is not frozen yet; whether it did. A frozen one keeps its freeze as it is.

        TimeoutError when PostgreSQL has not done it within within_seconds, the wait for a
        connection included: the caller is answering a call, which a PostgreSQL that hangs
        would otherwise hold for as long as it hangs.
        """
        async with connection_within(self._pool, within_seconds) as conn:
            return await self._freeze(conn, user_id, reason, replace=False) is not None

    async def _freeze(
        self, conn: asyncpg.Pool | PoolConnectionProxy, user_id: str, reason: str, *, replace: bool
    ) -> asyncpg.Record | None:
        # The user id and the reason's length are declared at the boundary (rpc.fields).
        reason = reason.strip()
        if not reason:
            raise InvalidArgument.single("reason", f"must be 1-{MAX_FREEZE_REASON} characters")
        await ensure(conn, user_id, self.free_quota_bytes)
        return await conn.fetchrow(_FREEZE, user_id, reason, replace)

    async def unfreeze(self, user_id: str) -> Account:
        row = await self._pool.fetchrow(_UNFREEZE, user_id)
        if row is None:
            raise NotFound("account not found")
        return Account(**row)

    async def totals(self) -> Totals:
        row = await self._pool.fetchrow(_TOTALS)
        assert row is not None  # an aggregate without GROUP BY returns one row
        return Totals(**{kind: int(total) for kind, total in row.items()})

    async def count(self) -> int:
        return int(await self._pool.fetchval(_COUNT))
