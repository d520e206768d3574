"""The ledger audit: every account's figures must equal the sums of its ledger entries."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

_AUDIT = """
SELECT a.user_id,
       a.quota_bytes, coalesce(l.quota, 0) AS ledger_quota,
       a.used_bytes, coalesce(l.used, 0) AS ledger_used,
       a.reserved_bytes, coalesce(l.reserved, 0) AS ledger_reserved
FROM accounts a
LEFT JOIN (
    SELECT user_id, sum(quota_delta)::bigint AS quota, sum(used_delta)::bigint AS used, sum(reserved_delta)::bigint AS reserved
    FROM ledger_entries GROUP BY user_id
) l ON l.user_id = a.user_id
WHERE a.quota_bytes <> coalesce(l.quota, 0)
   OR a.used_bytes <> coalesce(l.used, 0)
   OR a.reserved_bytes <> coalesce(l.reserved, 0)
ORDER BY a.user_id
"""

_PENDING_RESERVATIONS = """
SELECT a.user_id, a.reserved_bytes, coalesce(p.pending, 0) AS pending_bytes
FROM accounts a
LEFT JOIN (SELECT user_id, sum(size_bytes)::bigint AS pending FROM uploads WHERE state = 'pending' GROUP BY user_id) p
       ON p.user_id = a.user_id
WHERE a.reserved_bytes <> coalesce(p.pending, 0)
ORDER BY a.user_id
"""


_LIVE_MEDIA = """
SELECT a.user_id, a.used_bytes, coalesce(m.live, 0) AS live_bytes
FROM accounts a
LEFT JOIN (SELECT owner_id, sum(size_bytes)::bigint AS live FROM media WHERE deleted_at IS NULL GROUP BY owner_id) m
       ON m.owner_id = a.user_id
WHERE a.used_bytes <> coalesce(m.live, 0)
ORDER BY a.user_id
"""

# Both derived figures against the variants they stand for: each live media's, and each
# account's over its live media (deleted media keep their figure until purged, counted nowhere).
_DERIVED = """
WITH live AS (
    SELECT m.media_id, m.owner_id, m.derived_bytes,
           (SELECT coalesce(sum(v.size_bytes), 0)::bigint FROM media_variants v WHERE v.media_id = m.media_id) AS variant_bytes
    FROM media m WHERE m.deleted_at IS NULL
)
SELECT a.user_id, 'derived_bytes_vs_variants' AS figure, a.derived_bytes AS account_value,
       coalesce(l.variant_bytes, 0) AS expected_value
FROM accounts a
LEFT JOIN (SELECT owner_id, sum(variant_bytes)::bigint AS variant_bytes FROM live GROUP BY owner_id) l ON l.owner_id = a.user_id
WHERE a.derived_bytes <> coalesce(l.variant_bytes, 0)
UNION ALL
SELECT owner_id, 'media_derived_bytes_vs_variants:' || media_id, derived_bytes, variant_bytes
FROM live WHERE derived_bytes <> variant_bytes
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class Mismatch:
    user_id: str
    figure: str
    account_value: int
    expected_value: int


async def audit(pool: asyncpg.Pool) -> list[Mismatch]:
    """Returns every disagreement; an empty list means the books add up.

    Four checks in one REPEATABLE READ snapshot, so concurrent writers cannot
    produce a false alarm: account figures against the ledger sums, reserved bytes
    against the uploads still pending, used bytes against the media not deleted, and
    derived bytes (the account's and each media's) against the variants stored.
    """
    mismatches: list[Mismatch] = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        for row in await conn.fetch(_AUDIT):
            for figure in ("quota", "used", "reserved"):
                actual, expected = row[f"{figure}_bytes"], row[f"ledger_{figure}"]
                if actual != expected:
                    mismatches.append(Mismatch(row["user_id"], f"{figure}_bytes", actual, expected))
        for row in await conn.fetch(_PENDING_RESERVATIONS):
            mismatches.append(Mismatch(row["user_id"], "reserved_bytes_vs_pending_uploads", row["reserved_bytes"], row["pending_bytes"]))
        for row in await conn.fetch(_LIVE_MEDIA):
            mismatches.append(Mismatch(row["user_id"], "used_bytes_vs_live_media", row["used_bytes"], row["live_bytes"]))
        for row in await conn.fetch(_DERIVED):
            mismatches.append(Mismatch(*row))
    return mismatches
