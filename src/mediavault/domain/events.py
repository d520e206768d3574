"""Usage telemetry: validated, sanitised events, stored with their per-item counters in one statement.

Each event of a batch is judged alone: one a client got wrong is counted as rejected and
the others are stored, so that a bad event never costs the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mediavault import metrics
from mediavault.domain.media import PRESENT
from mediavault.errors import IdempotencyConflict, InvalidArgument
from mediavault.limits import Text, parse_uuid, storable

EVENT_TYPES = frozenset({"impression", "dwell_start", "dwell_end", "click", "open", "share", "like", "save", "hide", "report"})
MAX_BATCH = 500
MAX_SURFACE = 64
SURFACE = Text(max_len=MAX_SURFACE)
MAX_META_BYTES = 2048
MAX_META_DEPTH = 3
MAX_META_KEYS = 32
# Clients' clocks drift; anything further off than this is not a real occurrence time.
MAX_CLOCK_SKEW = timedelta(days=7)
# usage_events is partitioned by the UTC day of received_at (migration 0011); the
# partitions of today and this many days ahead are kept made, so that no insert waits for
# one even when the prune_telemetry job has not run for days.
PARTITION_DAYS_AHEAD = 7
# A batch's idempotency key is kept this long after the call that stored its events: as long as
# an event may lag the server's clock, so a client that queues its batches while offline still
# has them stored once when it sends them again.
IDEMPOTENCY_KEY_LIFETIME = MAX_CLOCK_SKEW
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Keys that look like personal data never reach the table, whatever the client sends: a key
# this matches,
_PERSONAL = re.compile(
    r"e-?mail|phone|mobile|\bip\b|^ip_|_ip$|ip_?addr|address|name|token|password|passwd|secret|ssn|birth|"
    r"credit|card|iban|lat(itude)?$|lon(gitude)?$|gps|location|device_?id|idfa|gaid|cookie|session|auth",
    re.IGNORECASE,
)
# or one of these as a word of its own (client_ip, clientIp, IPv6, lng), which inside other
# words is innocent (tip, latency).
_PERSONAL_WORDS = frozenset({"ip", "ipv4", "ipv6", "addr", "lat", "latitude", "lon", "lng", "longitude"})
_CAMEL_CASE_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_A_WORD = re.compile(r"[^a-z0-9]+")


def _personal(key: str) -> bool:
    words = _NOT_A_WORD.split(_CAMEL_CASE_WORD.sub("_", key).lower())
    return _PERSONAL.search(key) is not None or not _PERSONAL_WORDS.isdisjoint(words)


# The events of media no one can see any more (deleted, or ephemeral and expired) are kept as
# telemetry, but count for nothing: their counters are never read again.
#
# A batch with an idempotency key ($7) claims it first and stores its events only when the claim
# is new; a call that finds the key taken (after waiting for the call holding it, if that one has
# not committed yet) stores nothing. Answers whether the events were stored.
_INSERT = f"""
WITH claimed AS (
    INSERT INTO usage_event_batches (user_id, idempotency_key, accepted, rejected, batch_sha256)
    SELECT $1::text, $7::text, $8::integer, $9::integer, $10::bytea WHERE $7 <> ''
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING true
), incoming AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
        AS e(media_id, event_type, surface, occurred_at, meta)
    WHERE $7 = '' OR EXISTS (SELECT FROM claimed)
), stored AS (
    INSERT INTO usage_events (user_id, media_id, event_type, surface, occurred_at, meta)
    SELECT $1, media_id, event_type, surface, occurred_at, meta FROM incoming
    RETURNING media_id, event_type
), counted AS (
    SELECT s.media_id,
           count(*) FILTER (WHERE s.event_type = 'impression') AS views,
           count(*) FILTER (WHERE s.event_type = 'like') AS likes,
           count(*) FILTER (WHERE s.event_type = 'share') AS shares
    FROM stored s JOIN media m ON m.media_id = s.media_id
    WHERE {PRESENT}
    GROUP BY s.media_id
    HAVING count(*) FILTER (WHERE s.event_type IN ('impression', 'like', 'share')) > 0
), added AS (
    INSERT INTO media_counters AS c (media_id, view_count, like_count, share_count)
    SELECT media_id, views, likes, shares FROM counted ORDER BY media_id
    ON CONFLICT (media_id) DO UPDATE SET
        view_count = c.view_count + EXCLUDED.view_count,
        like_count = c.like_count + EXCLUDED.like_count,
        share_count = c.share_count + EXCLUDED.share_count
)
SELECT $7 = '' OR EXISTS (SELECT FROM claimed)
"""

# Read in a statement of its own, whose snapshot holds the claim of a call that committed while
# the insert waited for it.
_ANSWERED = "SELECT accepted, rejected, batch_sha256 FROM usage_event_batches WHERE user_id = $1 AND idempotency_key = $2"

# A batch at a time, as the cleanup jobs delete: one statement deleting a day of keys would hold
# their row locks, and keep vacuum from every dead row, until it ends, which on a large table a
# job timeout may never let it reach. SKIP LOCKED leaves the keys another run holds to that run.
_DROP_IDEMPOTENCY_KEYS = """
WITH due AS (
    SELECT user_id, idempotency_key FROM usage_event_batches
    WHERE recorded_at < now() - $1::interval
    ORDER BY recorded_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM usage_event_batches b USING due
WHERE b.user_id = due.user_id AND b.idempotency_key = due.idempotency_key
"""


_ADD_PARTITIONS = """
SELECT usage_events_add_partitions(today, today + $1::integer) FROM (SELECT (now() AT TIME ZONE 'UTC')::date AS today) AS t
"""

_DROP_PARTITIONS = "SELECT * FROM usage_events_drop_partitions(now() - make_interval(secs => $1))"

# Connection or pool: what asyncpg's types accept for one statement.
Executor = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


async def add_partitions(conn: Executor, days_ahead: int = PARTITION_DAYS_AHEAD) -> int:
    """Makes the missing partitions of today and the days_ahead days after, attaching again a table
    detached and left under a partition's name; returns how many. First finishes the detach of a
    partition left half-detached, which waits for the transactions older than it (migration 0024)."""
    return int(await conn.fetchval(_ADD_PARTITIONS, days_ahead))


async def drop_partitions(conn: asyncpg.Connection | PoolConnectionProxy, age_seconds: int, lock_timeout_ms: int) -> list[asyncpg.Record]:
    """Drops the partitions holding only events received more than age_seconds ago, on a
    connection the caller holds in a transaction; returns (partition_name, received_before,
    estimated_rows) of each, estimated_rows counted where the planner had no estimate (0021). Waits at most lock_timeout_ms for usage_events, behind whose
    ACCESS EXCLUSIVE request every insert queues, then raises LockNotAvailableError."""
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{lock_timeout_ms}ms")
    return await conn.fetch(_DROP_PARTITIONS, float(age_seconds))


async def drop_idempotency_keys(conn: Executor, batch_size: int) -> int:
    """Deletes up to batch_size of the idempotency keys older than IDEMPOTENCY_KEY_LIFETIME, the
    oldest first, none that another transaction holds; returns how many."""
    status = await conn.execute(_DROP_IDEMPOTENCY_KEYS, IDEMPOTENCY_KEY_LIFETIME, batch_size)
    return int(status.rpartition(" ")[2])


def _no_partition(error: asyncpg.CheckViolationError) -> bool:
    """Whether the insert failed because no partition holds its received_at (a CHECK
    constraint names itself; the partition routing names none)."""
    return error.table_name == "usage_events" and error.constraint_name is None


@dataclass(frozen=True)
class Event:
    event_type: str
    media_id: str
    surface: str
    # Microseconds since the epoch as the client sent them, whatever they are; None means now.
    occurred_at_micros: int | None
    meta: Mapping[str, object]


def sanitise_meta(meta: object, depth: int = 1) -> object:
    """Drops personal-looking keys and anything nested deeper than MAX_META_DEPTH; returns plain
    dicts and lists. Past the first MAX_META_KEYS of a mapping or sequence, no item is read."""
    if isinstance(meta, str):
        return meta[:256]
    if isinstance(meta, Mapping):
        if depth > MAX_META_DEPTH:
            return None
        clean = {}
        for key, value in islice(meta.items(), MAX_META_KEYS):
            if _personal(key):
                continue
            value = sanitise_meta(value, depth + 1)
            if value is not None:
                clean[key[:64]] = value
        return clean
    if isinstance(meta, Sequence):
        if depth > MAX_META_DEPTH:
            return None
        return [v for v in (sanitise_meta(item, depth + 1) for item in islice(meta, MAX_META_KEYS)) if v is not None]
    return meta


def _storable_meta(meta: object) -> bool:
    """Whether jsonb takes it: no NUL in any key or string, no NaN or infinity."""
    if isinstance(meta, dict):
        return all(storable(key) and _storable_meta(value) for key, value in meta.items())
    if isinstance(meta, list):
        return all(_storable_meta(item) for item in meta)
    if isinstance(meta, str):
        return storable(meta)
    if isinstance(meta, float):
        return math.isfinite(meta)
    return True


def _occurred_at(micros: int | None, now: datetime) -> datetime | None:
    """When the event happened, or None when the client's time is no real occurrence time."""
    if micros is None:
        return now
    since = now - _EPOCH
    skew = micros - ((since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds)
    if abs(skew) > MAX_CLOCK_SKEW // timedelta(microseconds=1):
        return None
    return now + timedelta(microseconds=skew)


def _accept(event: Event, meta: object, now: datetime) -> tuple[uuid.UUID, str, str, datetime, str] | None:
    """The event's row, meta its meta sanitised, or None when it is rejected."""
    if event.event_type not in EVENT_TYPES or SURFACE.violation(event.surface) is not None:
        return None
    media_id = parse_uuid(event.media_id)
    if media_id is None:
        return None
    occurred_at = _occurred_at(event.occurred_at_micros, now)
    if occurred_at is None:
        return None
    meta = meta or {}
    if not _storable_meta(meta):
        return None
    # Measured as stored, in UTF-8: escaped to ASCII, a character could count six bytes.
    encoded = json.dumps(meta, ensure_ascii=False)
    if len(encoded.encode()) > MAX_META_BYTES:
        encoded = "{}"
    return media_id, event.event_type, event.surface, occurred_at, encoded


def _as_sent(event: Event, meta: object) -> bytes:
    """What a repeat under a batch's idempotency key must repeat of each event, meta its meta
    sanitised: the event as the client sent it (an event without a time is stamped when it is
    stored, so the stored rows differ)."""
    return json.dumps([event.event_type, event.media_id, event.surface, event.occurred_at_micros, meta], sort_keys=True).encode()


class Events:
    """Usage telemetry: a client's batches of view, like and share events."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, user_id: str, events: Sequence[Event], idempotency_key: str = "") -> tuple[int, int]:
        """Stores the valid events of a batch; returns (accepted, rejected).

        A batch of the wrong length is refused before any of its events is read, so that a
        caller making each event as it is read pays nothing for a batch of millions. A batch
        whose idempotency_key stored its events already stores nothing and is answered as that
        call was.
        """
        if not 0 < len(events) <= MAX_BATCH:
            raise InvalidArgument.single("events", f"must hold 1-{MAX_BATCH} events")
        now = datetime.now(UTC)
        rows = []
        digest = hashlib.sha256()
        for event in events:
            # Sanitised once for the row and the digest: reading the meta is most of this work.
            meta = sanitise_meta(event.meta)
            if idempotency_key:
                digest.update(_as_sent(event, meta))
            row = _accept(event, meta, now)
            if row is not None:
                rows.append(row)
        accepted, rejected = len(rows), len(events) - len(rows)
        if rows:
            media_ids, types, surfaces, times, metas = (list(column) for column in zip(*rows, strict=True))
            batch_sha256 = digest.digest() if idempotency_key else b""
            arguments = (user_id, media_ids, types, surfaces, times, metas, idempotency_key, accepted, rejected, batch_sha256)
            while not await self._store(arguments):
                answered = await self._pool.fetchrow(_ANSWERED, user_id, idempotency_key)
                # None: the key outlived its lifetime and was deleted since; the batch is new again.
                if answered is not None:
                    if answered["batch_sha256"] != batch_sha256:
                        raise IdempotencyConflict("idempotency_key was used with other events")
                    # A retry of a batch stored already, whose call counted it.
                    return answered["accepted"], answered["rejected"]
        metrics.EVENTS_RECORDED.labels("accepted").inc(accepted)
        metrics.EVENTS_RECORDED.labels("rejected").inc(rejected)
        return accepted, rejected

    async def _store(self, arguments: tuple[object, ...]) -> bool:
        """Runs _INSERT; whether it stored the events."""
        try:
            return bool(await self._pool.fetchval(_INSERT, *arguments))
        except asyncpg.CheckViolationError as error:
            if not _no_partition(error):
                raise
            # Today's partition is missing (no job made it ahead, or it was detached): make it
            # and store the batch after all. The failed statement stored nothing, counters and key included.
            await add_partitions(self._pool)
            return bool(await self._pool.fetchval(_INSERT, *arguments))
