"""The SQL of the uploads aggregate.

Each write is one statement over unnest()ed arrays, built by one function from one
guard: the batched form (many calls, rows another transaction holds are skipped) and
the single form (one call, which waits for the lock) differ only in SKIP LOCKED, so
their guards cannot drift apart.
"""

from __future__ import annotations

from mediavault.domain.uploads.records import COLUMNS

_COLUMN_LIST = ", ".join(COLUMNS)

# An upload fits when its account is not frozen and the account's total of the
# statement still fits the quota, beside the bytes of its variants and renditions
# when the deployment counts those (settings.quota_counts_derived_bytes, carried by
# each requested row); the accounts_within_quota CHECK stands behind the rest.
RESERVATION_GUARD = (
    "NOT a.frozen AND a.used_bytes + a.reserved_bytes + p.total"
    " + CASE WHEN p.derived_counted THEN a.derived_bytes ELSE 0 END <= a.quota_bytes"
)

# Commits only an upload whose declaration the stored object satisfies: the caller's,
# still pending and unexpired, of the observed size, with no declared SHA-256 or the
# observed one, declared as a type the observed bytes are.
COMMIT_GUARD = (
    "u.state = 'pending' AND u.expires_at > now() AND u.user_id = r.user_id AND u.size_bytes = r.size_bytes"
    " AND (u.sha256 IS NULL OR u.sha256 = r.sha256) AND u.content_type = ANY(string_to_array(r.declarable, ','))"
)

BEGIN_PARAMETERS = (
    ("upload_id", "uuid"),
    ("user_id", "text"),
    ("filename", "text"),
    ("content_type", "text"),
    ("size_bytes", "bigint"),
    ("sha256", "text"),
    ("idempotency_key", "text"),
    ("retention", "text"),
    ("object_key", "text"),
    ("ttl_seconds", "float8"),
    ("protocol", "text"),
    ("derived_counted", "boolean"),
)

COMMIT_PARAMETERS = (
    ("upload_id", "uuid"),
    ("media_id", "uuid"),
    ("kind", "text"),
    ("sha256", "text"),
    ("ttl_seconds", "float8"),
    ("user_id", "text"),
    ("size_bytes", "bigint"),
    ("declarable", "text"),
)


def _requested(parameters: tuple[tuple[str, str], ...]) -> str:
    arrays = ", ".join(f"${i}::{sql_type}[]" for i, (_, sql_type) in enumerate(parameters, 1))
    names = ", ".join(name for name, _ in parameters)
    return f"SELECT * FROM unnest({arrays}) AS r({names})"


def _locking(skip_locked: bool) -> str:
    return " SKIP LOCKED" if skip_locked else ""


def begin_statement(*, skip_locked: bool) -> str:
    """Reserves and records uploads; each account's uploads of the statement are reserved together or not at all.

    Accounts are locked in user_id order, as every statement that locks several
    accounts does. The batched form skips an account another transaction holds (a
    finalize, a cleanup batch) rather than making the whole batch wait with it.
    """
    return f"""
WITH requested AS (
    {_requested(BEGIN_PARAMETERS)}
), per_account AS (
    SELECT user_id, sum(size_bytes)::bigint AS total, bool_or(derived_counted) AS derived_counted
    FROM requested GROUP BY user_id
), locked AS (
    SELECT a.user_id FROM accounts a JOIN per_account p USING (user_id)
    ORDER BY a.user_id FOR NO KEY UPDATE OF a{_locking(skip_locked)}
), reserved AS (
    UPDATE accounts a SET reserved_bytes = a.reserved_bytes + p.total, updated_at = now()
    FROM per_account p JOIN locked USING (user_id)
    WHERE a.user_id = p.user_id AND {RESERVATION_GUARD}
    RETURNING a.user_id
), created AS (
    INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, sha256, idempotency_key,
                         retention, object_key, expires_at, protocol)
    SELECT r.upload_id, r.user_id, r.filename, r.content_type, r.size_bytes, r.sha256, r.idempotency_key,
           r.retention, r.object_key, now() + make_interval(secs => r.ttl_seconds), r.protocol
    FROM requested r JOIN reserved USING (user_id)
    RETURNING {_COLUMN_LIST}
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id)
    SELECT user_id, 'reserve', size_bytes, upload_id FROM created
)
SELECT * FROM created
"""


def commit_statement(*, skip_locked: bool) -> str:
    """Finalizes verified uploads: reserved bytes become used, the media row and the ledger entry are written.

    Each upload keeps its own guard; the batched form skips upload rows another
    transaction holds (a fail, an expiry sweep), whose callers then commit alone.
    Accounts are locked in user_id order.
    """
    # A finalized upload has received all its bytes.
    returned = ", ".join(f"u.{column}" for column in COLUMNS) + ", u.size_bytes AS received_bytes"
    return f"""
WITH requested AS (
    {_requested(COMMIT_PARAMETERS)}
), locked AS (
    SELECT u.upload_id FROM uploads u JOIN requested r USING (upload_id)
    WHERE {COMMIT_GUARD}
    ORDER BY u.upload_id FOR NO KEY UPDATE OF u{_locking(skip_locked)}
), finalized AS (
    UPDATE uploads u SET state = 'finalized', media_id = r.media_id, updated_at = now()
    FROM requested r JOIN locked USING (upload_id)
    WHERE u.upload_id = r.upload_id AND {COMMIT_GUARD}
    RETURNING {returned}
), per_account AS (
    SELECT user_id, sum(size_bytes)::bigint AS bytes FROM finalized GROUP BY user_id
), accounts_locked AS (
    SELECT user_id FROM accounts WHERE user_id IN (SELECT user_id FROM per_account) ORDER BY user_id FOR NO KEY UPDATE
), moved AS (
    UPDATE accounts a SET reserved_bytes = a.reserved_bytes - p.bytes, used_bytes = a.used_bytes + p.bytes,
                          updated_at = now()
    FROM per_account p JOIN accounts_locked USING (user_id) WHERE a.user_id = p.user_id
), media_row AS (
    INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, sha256, object_key,
                       retention, expires_at)
    SELECT f.media_id, f.user_id, f.upload_id, r.kind, f.content_type, f.size_bytes, coalesce(f.sha256, r.sha256),
           f.object_key, f.retention,
           CASE WHEN f.retention = 'ephemeral' THEN now() + make_interval(secs => r.ttl_seconds) END
    FROM finalized f JOIN requested r USING (upload_id)
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, used_delta, reserved_delta, upload_id, media_id)
    SELECT user_id, 'commit', size_bytes, -size_bytes, upload_id, media_id FROM finalized
)
SELECT * FROM finalized
"""


BEGIN_ONE = begin_statement(skip_locked=False)
BEGIN_MANY = begin_statement(skip_locked=True)
COMMIT_ONE = commit_statement(skip_locked=False)
COMMIT_MANY = commit_statement(skip_locked=True)

# received_bytes: all of them once finalized; a resumable upload's last checkpoint while pending.
_RECEIVED = (
    "CASE WHEN u.state = 'finalized' THEN u.size_bytes"
    " WHEN u.state = 'pending' THEN coalesce(c.received_bytes, 0) ELSE 0 END AS received_bytes"
)
_READ = (
    f"SELECT {', '.join(f'u.{column}' for column in COLUMNS)}, {_RECEIVED}"
    " FROM uploads u LEFT JOIN upload_checkpoints c USING (upload_id)"
)
GET = f"{_READ} WHERE u.upload_id = $1"
GET_BY_KEY = f"{_READ} WHERE u.user_id = $1 AND u.idempotency_key = $2"

RELEASE = f"""
WITH released AS (
    UPDATE uploads SET state = $2, failure_reason = $3, failure_detail = $4, updated_at = now()
    WHERE upload_id = $1 AND state = 'pending'
    RETURNING {_COLUMN_LIST}
), freed AS (
    UPDATE accounts a SET reserved_bytes = a.reserved_bytes - r.size_bytes, updated_at = now()
    FROM released r WHERE a.user_id = r.user_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id)
    SELECT user_id, 'release', -size_bytes, upload_id FROM released
)
SELECT * FROM released
"""
