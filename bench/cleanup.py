"""Cleanup-job throughput against its floor: one bare SQL statement making the same row changes.

Seeds --reservations stale reservations (pending uploads past expires_at, spread over
--accounts accounts) and --media expired ephemeral media rows (each with its original and
one thumbnail variant row, and both as real small files on an fs blob store), all of it
consistent with the ledger, plus a few survivors the jobs must leave alone (1%: fresh
pending uploads, and media not yet expired / permanent / expired but saved). Seeding is
set-based SQL (generate_series into temp tables, then INSERT ... SELECT) followed by
VACUUM ANALYZE, and is timed but not measured.

The seeded database is the TEMPLATE of every measured database (CREATE DATABASE ...
TEMPLATE ... STRATEGY FILE_COPY): the floor and each job trial run on their own copy of
the very same rows, indexes, constraints, triggers, statistics and hint bits, each copy
prewarmed the same way (pg_prewarm, or sequential scans without it) and CHECKPOINTed
before each measured step. Every trial writes a fresh set of blob files, fsyncs them
(os.sync) and then measures, so that blob deletions start from the same state too.

  floor  on one copy: the reclaim statement, then the expire statement (UPDATE media to
         deleted + purged, DELETE its variant rows, free used bytes, INSERT the 'free'
         ledger rows: the job's final row changes in one statement), then an os.unlink
         loop in one thread over the doomed media's files (blob_unlink_floor_seconds), and
         the same over a second set of the same files in --unlink-threads threads
         (blob_unlink_threads_floor: what deleting concurrently could reach)
  jobs   per batch size (the configured default, then each --batch-sizes value) on a fresh
         copy: workers.maintenance.run_job(ctx, "reclaim_stale_uploads") until no stale
         reservation is left, then run_job(ctx, "expire_ephemeral_media") (which purges the
         blobs too) until every doomed item is purged, with ctx filled by workers.settings.startup

ratio_to_floor is the job's seconds over its floor's: for expire_ephemeral_media the floor is
floor_seconds + blob_unlink_floor_seconds, since the job's time includes the blob deletions
(ratio_to_sql_floor leaves them out). After each trial it verifies: no stale reservation
pending, every doomed item deleted and purged with its variant rows gone, its files gone,
every survivor untouched (row and files), one release/free ledger row per item, no job
error, and mediavault.domain.ledger.audit(pool) == []. The floor copy is audited too and
its account figures must equal the trials'.

Database and Redis as bench/stack.py: MEDIAVAULT_BENCH_DATABASE_URL (else
MEDIAVAULT_TEST_DATABASE_URL) as admin URL, else an embedded pgserver; MEDIAVAULT_BENCH_REDIS_URL
(else MEDIAVAULT_TEST_REDIS_URL), else an embedded Valkey. Prints exactly one JSON line on
stdout, progress on stderr; exits 1 if verification failed or a job counted errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stack import bench_database, bench_postgres, bench_redis

from mediavault.devservers import with_database

SPEC_RESERVATIONS = 200_000
SPEC_MEDIA = 100_000
GOALS = {"ratio_to_floor": 3.0, "reclaim_seconds": 10.0, "expire_seconds": 30.0}
JOB_NAMES = ("reclaim_stale_uploads", "expire_ephemeral_media")
MAX_CALLS = 50  # run_job calls per job before a trial gives up on draining
ORIGINAL_BYTES = b"\xff\xd8\xff\xe0" + b"o" * 96
VARIANT_BYTES = b"\xff\xd8\xff\xe0" + b"t" * 28


def _log(message: str) -> None:
    print(f"[bench cleanup] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- seeding

# Every seeded row, first into temp tables so that the accounts get their final figures
# in one INSERT; {A} accounts, {N} stale reservations, {F} fresh ones, {M} doomed media, {K}
# surviving media (integers), {P} the user-id prefix (a quoted literal of hex digits), {D}
# the bytes of each media's one variant (THUMBNAIL_BYTES).
THUMBNAIL_BYTES = 32
_SEED = [
    """
    CREATE TEMP TABLE s_acct AS
    SELECT i, {P} || lpad(i::text, 6, '0') AS user_id FROM generate_series(0, {A} - 1) AS i
    """,
    """
    CREATE TEMP TABLE s_up AS
    SELECT gen_random_uuid() AS upload_id, a.user_id, (65536 + floor(random() * 4194304))::bigint AS size_bytes,
           g < {N} AS stale,
           CASE WHEN g < {N} THEN now() - make_interval(secs => 1 + random() * 86400)
                ELSE now() + interval '2 hours' END AS expires_at
    FROM generate_series(0, {N} + {F} - 1) AS g JOIN s_acct a ON a.i = g % {A}
    """,
    """
    CREATE TEMP TABLE s_media AS
    SELECT gen_random_uuid() AS upload_id, gen_random_uuid() AS media_id, a.user_id AS owner_id,
           (1000 + floor(random() * 2000000))::bigint AS size_bytes, j < {M} AS doomed,
           CASE WHEN j >= {M} AND (j - {M}) % 3 = 1 THEN 'permanent' ELSE 'ephemeral' END AS retention,
           CASE WHEN j < {M} THEN now() - make_interval(secs => 1 + random() * 3600)
                WHEN (j - {M}) % 3 = 0 THEN now() + interval '1 hour'
                WHEN (j - {M}) % 3 = 1 THEN NULL
                ELSE now() - interval '10 minutes' END AS expires_at,
           CASE WHEN j >= {M} AND (j - {M}) % 3 = 2 THEN now() - interval '20 minutes' END AS saved_at
    FROM generate_series(0, {M} + {K} - 1) AS j JOIN s_acct a ON a.i = j % {A}
    """,
    # Created an hour before it expires (the ephemeral TTL); permanent media half an hour ago.
    "ALTER TABLE s_media ADD COLUMN created_at timestamptz",
    "UPDATE s_media SET created_at = coalesce(expires_at - interval '1 hour', now() - interval '30 minutes')",
    """
    INSERT INTO accounts (user_id, quota_bytes, used_bytes, reserved_bytes, derived_bytes, created_at, updated_at)
    SELECT a.user_id, greatest(1073741824, coalesce(m.used, 0) + coalesce(u.reserved, 0)),
           coalesce(m.used, 0), coalesce(u.reserved, 0), coalesce(m.derived, 0), now() - interval '30 days', now() - interval '1 day'
    FROM s_acct a
    LEFT JOIN (SELECT owner_id, sum(size_bytes)::bigint AS used, {D} * count(*) AS derived FROM s_media GROUP BY owner_id) m
           ON m.owner_id = a.user_id
    LEFT JOIN (SELECT user_id, sum(size_bytes)::bigint AS reserved FROM s_up GROUP BY user_id) u ON u.user_id = a.user_id
    ORDER BY a.i
    """,
    """
    INSERT INTO ledger_entries (user_id, kind, quota_delta, created_at)
    SELECT user_id, 'grant', quota_bytes, created_at FROM accounts ORDER BY user_id
    """,
    # Uploads (the media's, finalized, and the reservations, pending), media, variants and
    # ledger rows each in creation order, as production writes them: the heap order follows
    # created_at and so expires_at, which the jobs scan by.
    """
    INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key,
                         media_id, created_at, updated_at, expires_at)
    SELECT upload_id, user_id, filename, 'image/jpeg', size_bytes, retention, state,
           'originals/' || left(replace(upload_id::text, '-', ''), 2) || '/' || replace(upload_id::text, '-', ''),
           media_id, created_at, updated_at, expires_at
    FROM (
        SELECT upload_id, owner_id AS user_id, 'photo.jpg' AS filename, size_bytes, retention, 'finalized' AS state,
               media_id, created_at - interval '1 minute' AS created_at, created_at AS updated_at,
               created_at + interval '119 minutes' AS expires_at
        FROM s_media
        UNION ALL
        SELECT upload_id, user_id, 'clip.jpg', size_bytes, 'permanent', 'pending', NULL,
               expires_at - interval '2 hours', expires_at - interval '2 hours', expires_at
        FROM s_up
    ) u ORDER BY created_at
    """,
    """
    INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, derived_bytes, object_key, retention,
                       processing_status, created_at, expires_at, saved_at, width, height, processed_at, updated_at)
    SELECT media_id, owner_id, upload_id, 'image', 'image/jpeg', size_bytes, {D},
           'originals/' || left(replace(upload_id::text, '-', ''), 2) || '/' || replace(upload_id::text, '-', ''),
           retention, 'complete', created_at, expires_at, saved_at, 640, 480,
           created_at + interval '1 second', coalesce(saved_at, created_at + interval '1 second')
    FROM s_media ORDER BY created_at
    """,
    """
    INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes, created_at)
    SELECT media_id, 'thumbnail', 0,
           'variants/' || left(replace(media_id::text, '-', ''), 2) || '/' || replace(media_id::text, '-', '') || '/v0/thumbnail.jpg',
           'image/jpeg', 320, 240, {D}, created_at + interval '1 second'
    FROM s_media ORDER BY created_at
    """,
    # What begin and finalize wrote to the ledger: a reserve per upload, a commit per media.
    """
    INSERT INTO ledger_entries (user_id, kind, used_delta, reserved_delta, upload_id, media_id, created_at)
    SELECT user_id, kind, used_delta, reserved_delta, upload_id, media_id, created_at FROM (
        SELECT owner_id AS user_id, 'reserve' AS kind, 0::bigint AS used_delta, size_bytes AS reserved_delta,
               upload_id, NULL::uuid AS media_id, created_at - interval '1 minute' AS created_at FROM s_media
        UNION ALL
        SELECT owner_id, 'commit', size_bytes, -size_bytes, upload_id, media_id, created_at FROM s_media
        UNION ALL
        SELECT user_id, 'reserve', 0, size_bytes, upload_id, NULL, expires_at - interval '2 hours' FROM s_up
    ) e ORDER BY created_at, kind DESC
    """,
]

_SEEDED_MEDIA = """
SELECT replace(upload_id::text, '-', '') AS up, replace(media_id::text, '-', '') AS me, doomed FROM s_media
"""


async def seed(url: str, args: argparse.Namespace, prefix: str) -> dict[str, list[tuple[str, str]]]:
    """Seeds the template database; returns the hex ids (upload, media) of doomed and surviving media."""
    import asyncpg

    fresh = args.reservations // 100
    surviving = max(3, args.media // 100)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            values = {"A": args.accounts, "N": args.reservations, "F": fresh, "M": args.media, "K": surviving,
                      "P": f"'{prefix}'", "D": THUMBNAIL_BYTES}
            for sql in _SEED:
                await conn.execute(sql.format(**values))
            rows = await conn.fetch(_SEEDED_MEDIA)
        await conn.execute("VACUUM ANALYZE")
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        except asyncpg.PostgresError as exc:
            _log(f"no pg_prewarm ({exc.__class__.__name__}); prewarming with sequential scans")
    finally:
        await conn.close()
    return {
        "doomed": [(r["up"], r["me"]) for r in rows if r["doomed"]],
        "survivors": [(r["up"], r["me"]) for r in rows if not r["doomed"]],
    }


# --------------------------------------------------------------------------- blob files


def _paths(root: Path, media: list[tuple[str, str]]) -> list[str]:
    base = str(root)
    out = []
    for up, me in media:
        out.append(f"{base}/originals/{up[:2]}/{up}")
        out.append(f"{base}/variants/{me[:2]}/{me}/v0/thumbnail.jpg")
    return out


def write_blobs(root: Path, media: list[tuple[str, str]]) -> None:
    """Each media's original and thumbnail as real files, with plain os calls (no BlobStore)."""
    base = str(root)
    for top in ("originals", "variants"):
        for shard in range(256):
            os.makedirs(f"{base}/{top}/{shard:02x}", exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for up, me in media:
        fd = os.open(f"{base}/originals/{up[:2]}/{up}", flags, 0o644)
        os.write(fd, ORIGINAL_BYTES)
        os.close(fd)
        directory = f"{base}/variants/{me[:2]}/{me}"
        os.mkdir(directory)
        os.mkdir(directory + "/v0")
        fd = os.open(directory + "/v0/thumbnail.jpg", flags, 0o644)
        os.write(fd, VARIANT_BYTES)
        os.close(fd)


class _Thread(threading.Thread):
    """A thread whose exception is re-raised by join()."""

    def __init__(self, target, *args) -> None:
        super().__init__(daemon=True)
        self._call = (target, args)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._call[0](*self._call[1])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc
        self.seconds = time.perf_counter() - started

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def _unlink_all(paths: list[str]) -> None:
    unlink = os.unlink
    for path in paths:
        unlink(path)


def _unlink_parallel(paths: list[str], threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(_unlink_all, paths[i::threads]) for i in range(threads)]:
            done.result()


# --------------------------------------------------------------------------- database copies


@contextlib.asynccontextmanager
async def copy_of(admin_url: str, template: str, label: str):
    """A fresh database CREATEd from the seeded template (no connection to it may be open); DROPped after."""
    import asyncpg

    name = f"{template}_{label}"
    admin = await asyncpg.connect(admin_url)
    try:
        strategy = " STRATEGY FILE_COPY" if admin.get_server_version() >= (15,) else ""
        for attempt in range(10):
            try:
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
                break
            except asyncpg.ObjectInUseError:
                if attempt == 9:
                    raise
                await asyncio.sleep(1.0)  # an autovacuum worker still on the template
    finally:
        await admin.close()
    try:
        yield with_database(admin_url, name)
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own outcome
            _log(f"could not drop database {name}: {exc!r}")
        finally:
            await admin.close()


_RELATIONS = """
SELECT c.oid::regclass::text AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY c.relkind DESC, c.relname
"""


async def prewarm(url: str) -> None:
    """Same cache state for every copy: each table, then each index, read in name order."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rels = await conn.fetch(_RELATIONS)
        has_prewarm = await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_prewarm'")
        for row in rels:
            if has_prewarm:
                await conn.execute("SELECT pg_prewarm($1::regclass)", row["rel"])
            elif row["relkind"] == "r":
                await conn.execute(f"SELECT count(*) FROM {row['rel']}")
    finally:
        await conn.close()


async def checkpoint(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass
    finally:
        await conn.close()


# --------------------------------------------------------------------------- floor

_FLOOR_RECLAIM = """
WITH expired AS (
    UPDATE uploads SET state = 'expired', failure_reason = 'EXPIRED', updated_at = now()
    WHERE state = 'pending' AND expires_at <= now()
    RETURNING upload_id, user_id, size_bytes
), per_user AS (
    SELECT user_id, sum(size_bytes)::bigint AS bytes FROM expired GROUP BY user_id
), freed AS (
    UPDATE accounts a SET reserved_bytes = a.reserved_bytes - p.bytes, updated_at = now()
    FROM per_user p WHERE a.user_id = p.user_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id)
    SELECT user_id, 'release', -size_bytes, upload_id FROM expired
)
SELECT count(*) AS n FROM expired
"""

# The job's final row changes: deleted, purged (purge_after = now(), no claim left), variant
# rows gone, used bytes freed with one 'free' ledger row per item. Blob deletions excluded.
_FLOOR_EXPIRE = """
WITH removed AS (
    UPDATE media SET deleted_at = now(), purge_after = now(), purged_at = now(), updated_at = now()
    WHERE retention = 'ephemeral' AND deleted_at IS NULL AND saved_at IS NULL AND expires_at <= now()
    RETURNING media_id, owner_id, size_bytes, derived_bytes
), variants AS (
    DELETE FROM media_variants v USING removed r WHERE v.media_id = r.media_id
), per_owner AS (
    SELECT owner_id, sum(size_bytes)::bigint AS bytes, sum(derived_bytes)::bigint AS derived FROM removed GROUP BY owner_id
), freed AS (
    UPDATE accounts a SET used_bytes = a.used_bytes - p.bytes, derived_bytes = a.derived_bytes - p.derived, updated_at = now()
    FROM per_owner p WHERE a.user_id = p.owner_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, used_delta, media_id)
    SELECT owner_id, 'free', -size_bytes, media_id FROM removed
)
SELECT count(*) AS n FROM removed
"""


async def _timed_statement(url: str, sql: str) -> tuple[float, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        n = await conn.fetchval(sql)
        return time.perf_counter() - started, n
    finally:
        await conn.close()


# --------------------------------------------------------------------------- verification

_ACCOUNTS_DIGEST = """
SELECT md5(string_agg(user_id || ':' || quota_bytes || ':' || used_bytes || ':' || reserved_bytes, ',' ORDER BY user_id))
FROM accounts
"""

_CHECKS = {
    "stale_pending_left": "SELECT count(*) FROM uploads WHERE state = 'pending' AND expires_at <= now()",
    "fresh_pending": "SELECT count(*) FROM uploads WHERE state = 'pending' AND expires_at > now()",
    "expired_uploads": "SELECT count(*) FROM uploads WHERE state = 'expired'",
    "release_entries": "SELECT count(*) FROM ledger_entries WHERE kind = 'release'",
    "free_entries": "SELECT count(*) FROM ledger_entries WHERE kind = 'free'",
    "doomed_not_purged": "SELECT count(*) FROM media WHERE retention = 'ephemeral' AND saved_at IS NULL"
                         " AND expires_at <= now() AND (deleted_at IS NULL OR purged_at IS NULL)",
    "purged": "SELECT count(*) FROM media WHERE deleted_at IS NOT NULL AND purged_at IS NOT NULL",
    "live_media": "SELECT count(*) FROM media WHERE deleted_at IS NULL",
    "variants_left": "SELECT count(*) FROM media_variants",
    "purge_claims_left": "SELECT count(*) FROM media WHERE purge_claimed_until IS NOT NULL",
}


async def verify_rows(url: str, args: argparse.Namespace, survivors: int) -> tuple[dict, list[str]]:
    """Row-side checks; returns the figures (incl. the accounts digest) and a list of what failed."""
    import asyncpg

    from mediavault.domain import ledger

    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        got = {name: await pool.fetchval(sql) for name, sql in _CHECKS.items()}
        got["accounts_digest"] = await pool.fetchval(_ACCOUNTS_DIGEST)
        mismatches = await ledger.audit(pool)
    finally:
        await pool.close()
    expected = {
        "stale_pending_left": 0,
        "fresh_pending": args.reservations // 100,
        "expired_uploads": args.reservations,
        "release_entries": args.reservations,
        "free_entries": args.media,
        "doomed_not_purged": 0,
        "purged": args.media,
        "live_media": survivors,
        "variants_left": survivors,
        "purge_claims_left": 0,
    }
    failed = [f"{k}={got[k]} (expected {v})" for k, v in expected.items() if got[k] != v]
    if mismatches:
        failed.append(f"ledger audit: {len(mismatches)} mismatches, first {mismatches[0]}")
    return got, failed


def verify_files(doomed: list[str], survivors: list[str]) -> list[str]:
    exists = os.path.exists
    left = sum(1 for p in doomed if exists(p))
    lost = sum(1 for p in survivors if not exists(p))
    failed = []
    if left:
        failed.append(f"{left} doomed blob files still on disk")
    if lost:
        failed.append(f"{lost} surviving blob files gone")
    return failed


# --------------------------------------------------------------------------- trials


@dataclass
class Trial:
    label: str
    batch_sizes: dict[str, int]
    results: dict[str, dict] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    digest: str | None = None
    blob_write_s: float = 0.0


_REMAINING = {
    "reclaim_stale_uploads": "SELECT count(*) FROM uploads WHERE state = 'pending' AND expires_at <= now()",
    "expire_ephemeral_media": "SELECT count(*) FROM media WHERE (retention = 'ephemeral' AND deleted_at IS NULL"
                              " AND saved_at IS NULL AND expires_at <= now())"
                              " OR (deleted_at IS NOT NULL AND purged_at IS NULL)",
}


async def drain(ctx: dict, name: str) -> dict:
    """run_job until nothing of the job's is left; only the run_job calls are timed."""
    from workers.maintenance import run_job

    pool = ctx["pool"]
    seconds, calls, changed, errors, freed, details = 0.0, 0, 0, 0, 0, {}
    while calls < MAX_CALLS:
        started = time.perf_counter()
        report = await run_job(ctx, name)
        seconds += time.perf_counter() - started
        calls += 1
        changed += report.changed
        errors += report.errors
        freed += report.freed_bytes
        for key, value in report.details.items():
            if isinstance(value, int):
                details[key] = details.get(key, 0) + value
        left = await pool.fetchval(_REMAINING[name])
        if left == 0 or (report.changed == 0 and not report.details.get("purged")):
            break
    return {"seconds": seconds, "calls": calls, "changed": changed, "errors": errors, "left": left,
            "freed_bytes": freed, **details}


async def run_trial(trial: Trial, url: str, redis_url: str, blob_root: Path, doomed_paths: list[str],
                    survivor_paths: list[str], args: argparse.Namespace, survivors: int, queue: str) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    from mediavault.config import Settings
    from workers.settings import shutdown, startup

    settings = Settings(
        database_url=url, redis_url=redis_url, blob_backend="fs", blob_dir=blob_root, queue_name=queue,
        jwt_secret=secrets.token_hex(32), log_level="WARNING",
        jobs={name: {"batch_size": size} for name, size in trial.batch_sizes.items()},
    )
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
    ctx = {"settings": settings, "redis": redis}
    try:
        await startup(ctx)
        for name in JOB_NAMES:
            await checkpoint(url)
            _log(f"[{trial.label}] {name} batch_size={trial.batch_sizes[name]} ...")
            result = await drain(ctx, name)
            trial.results[name] = result
            _log(f"[{trial.label}] {name}: {result['seconds']:.2f}s in {result['calls']} call(s), "
                 f"{result['changed']} changed, {result['errors']} errors, {result['left']} left")
            if result["errors"]:
                trial.failed.append(f"{name}: {result['errors']} errors")
            if result["left"]:
                trial.failed.append(f"{name}: {result['left']} left after {result['calls']} calls")
    finally:
        await shutdown(ctx)
        await redis.aclose()
    figures, failed = await verify_rows(url, args, survivors)
    trial.failed += failed + verify_files(doomed_paths, survivor_paths)
    trial.digest = figures["accounts_digest"]


async def forget_feed_keys(redis_url: str, prefix: str) -> None:
    """The feed versions the expire runs bumped: keys of this run's own owners only."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"feed:v:{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await redis.delete(*keys[i : i + 1000])
    finally:
        await redis.aclose()


# --------------------------------------------------------------------------- the run


def _rate(rows: int, seconds: float) -> float | None:
    return round(rows / seconds, 1) if seconds > 0 else None


def _ratio(seconds: float, floor: float) -> float | None:
    return round(seconds / floor, 2) if floor > 0 else None


async def measure(args: argparse.Namespace, admin_url: str, seed_url: str, redis_url: str, work_dir: Path) -> dict:
    prefix = f"b{secrets.token_hex(4)}-"  # of the seeded user ids, so that their feed keys can be found
    try:
        return await _measure(args, admin_url, seed_url, redis_url, work_dir, prefix)
    finally:
        await forget_feed_keys(redis_url, prefix)


@dataclass
class Floor:
    """The bare statements and unlinks on a copy of the same rows and blob files: what the jobs are compared to."""

    reclaim_s: float
    expire_s: float
    unlink_s: float
    unlink_threads_s: float | None
    accounts_digest: str
    blob_write_s: float
    failed: list[str]


def _blob_set(work_dir: Path, label: str, media: dict[str, list[tuple[str, str]]]) -> tuple[Path, list[str], list[str], _Thread]:
    root = work_dir / label
    thread = _Thread(write_blobs, root, media["doomed"] + media["survivors"])
    thread.start()
    return root, _paths(root, media["doomed"]), _paths(root, media["survivors"]), thread


async def _ready(url: str, writer: _Thread) -> None:
    await prewarm(url)
    await asyncio.to_thread(writer.join)
    await asyncio.to_thread(os.sync)
    await checkpoint(url)


async def _unlink_seconds(target: Callable[..., None], *target_args: object) -> float:
    unlinker = _Thread(target, *target_args)
    unlinker.start()
    await asyncio.to_thread(unlinker.join)
    return unlinker.seconds


async def _measure_floor(
    args: argparse.Namespace, admin_url: str, template: str, media: dict[str, list[tuple[str, str]]], work_dir: Path
) -> Floor:
    # Its own copy of the rows and its own blob files (a second set for the unlink floor with threads).
    survivors = len(media["survivors"])
    root, doomed_paths, survivor_paths, writer = _blob_set(work_dir, "floor", media)
    par_root = work_dir / "floor-threads"
    par_writer = _Thread(write_blobs, par_root, media["doomed"] if args.unlink_threads else [])
    par_writer.start()
    par_paths = _paths(par_root, media["doomed"])
    async with copy_of(admin_url, template, "floor") as url:
        await asyncio.to_thread(par_writer.join)
        await _ready(url, writer)
        reclaim_s, n_reclaim = await _timed_statement(url, _FLOOR_RECLAIM)
        _log(f"[floor] reclaim statement: {reclaim_s:.2f}s for {n_reclaim} rows")
        await checkpoint(url)
        expire_s, n_expire = await _timed_statement(url, _FLOOR_EXPIRE)
        _log(f"[floor] expire statement: {expire_s:.2f}s for {n_expire} rows")
        unlink_s = await _unlink_seconds(_unlink_all, doomed_paths)
        _log(f"[floor] os.unlink of {len(doomed_paths)} files: {unlink_s:.2f}s")
        unlink_threads_s = None
        if args.unlink_threads:
            unlink_threads_s = await _unlink_seconds(_unlink_parallel, par_paths, args.unlink_threads)
            _log(f"[floor] os.unlink of {len(par_paths)} files in {args.unlink_threads} threads: {unlink_threads_s:.2f}s")
        figures, failed = await verify_rows(url, args, survivors)
        failed += verify_files(doomed_paths, survivor_paths)
        if args.unlink_threads:
            failed += verify_files(par_paths, [])
    await asyncio.to_thread(shutil.rmtree, root, True)
    await asyncio.to_thread(shutil.rmtree, par_root, True)
    if n_reclaim != args.reservations or n_expire != args.media:
        failed.append(f"floor changed {n_reclaim} reservations, {n_expire} media")
    return Floor(reclaim_s, expire_s, unlink_s, unlink_threads_s, figures["accounts_digest"], writer.seconds, failed)


async def _run_trials(
    args: argparse.Namespace, admin_url: str, template: str, media: dict[str, list[tuple[str, str]]], work_dir: Path,
    redis_url: str, floor: Floor,
) -> list[Trial]:
    """The jobs: the configured defaults first, then each batch size asked for."""
    from mediavault.config import JobsConfig

    queue = f"mediavault-bench:{secrets.token_hex(6)}"
    survivors = len(media["survivors"])
    defaults = {name: getattr(JobsConfig(), name).batch_size for name in JOB_NAMES}
    trials = [Trial("default", dict(defaults))]
    trials += [
        Trial(f"b{size}", {name: size for name in JOB_NAMES})
        for size in args.batch_sizes
        if any(defaults[name] != size for name in JOB_NAMES)
    ]
    for trial in trials:
        root, doomed_paths, survivor_paths, writer = _blob_set(work_dir, trial.label, media)
        async with copy_of(admin_url, template, trial.label) as url:
            await _ready(url, writer)
            trial.blob_write_s = writer.seconds
            await run_trial(trial, url, redis_url, root, doomed_paths, survivor_paths, args, survivors, queue)
        await asyncio.to_thread(shutil.rmtree, root, True)
        if trial.digest != floor.accounts_digest:
            trial.failed.append("account figures differ from the floor's")
        for problem in trial.failed:
            _log(f"[{trial.label}] FAILED: {problem}")
    return trials


def _job_figures(name: str, trial: Trial, args: argparse.Namespace, floor: Floor) -> dict:
    from mediavault.config import JobsConfig

    floors = {"reclaim_stale_uploads": floor.reclaim_s, "expire_ephemeral_media": floor.expire_s + floor.unlink_s}
    rows = {"reclaim_stale_uploads": args.reservations, "expire_ephemeral_media": args.media}
    r = trial.results[name]
    out = {
        "seconds": round(r["seconds"], 3),
        "rows_per_s": _rate(rows[name], r["seconds"]),
        "batch_size": trial.batch_sizes[name],
        "concurrency": getattr(JobsConfig(), name).concurrency,
        "calls": r["calls"],
        "ratio_to_floor": _ratio(r["seconds"], floors[name]),
    }
    if name == "expire_ephemeral_media":
        out["ratio_to_sql_floor"] = _ratio(r["seconds"], floor.expire_s)
    return out


def _job_entry(name: str, trials: list[Trial], args: argparse.Namespace, floor: Floor) -> dict:
    entry = _job_figures(name, trials[0], args, floor)
    entry["floor_seconds"] = round(floor.reclaim_s if name == "reclaim_stale_uploads" else floor.expire_s, 3)
    if name == "expire_ephemeral_media":
        entry["blob_unlink_floor_seconds"] = round(floor.unlink_s, 3)
        if floor.unlink_threads_s is not None:
            entry["blob_unlink_threads_floor"] = {"threads": args.unlink_threads, "seconds": round(floor.unlink_threads_s, 3)}
    entry["by_batch_size"] = {str(t.batch_sizes[name]): _job_figures(name, t, args, floor) for t in trials}
    best = min(trials, key=lambda t: t.results[name]["seconds"])
    entry["best"] = _job_figures(name, best, args, floor)
    return entry


def _goals(reclaim: dict, expire: dict) -> dict:
    return {
        "reclaim_ratio_le_3": bool(reclaim["ratio_to_floor"] is not None and reclaim["ratio_to_floor"] <= GOALS["ratio_to_floor"]),
        "reclaim_lt_10s": reclaim["seconds"] < GOALS["reclaim_seconds"],
        "expire_ratio_le_3": bool(expire["ratio_to_floor"] is not None and expire["ratio_to_floor"] <= GOALS["ratio_to_floor"]),
        "expire_lt_30s": expire["seconds"] < GOALS["expire_seconds"],
    }


async def _measure(args: argparse.Namespace, admin_url: str, seed_url: str, redis_url: str, work_dir: Path, prefix: str) -> dict:
    from mediavault.db import migrate

    template = urlsplit(seed_url).path.lstrip("/")

    started = time.perf_counter()
    await migrate(seed_url)
    _log(f"seeding {args.reservations} stale reservations, {args.media} expired media over {args.accounts} accounts ...")
    media = await seed(seed_url, args, prefix)
    seed_s = time.perf_counter() - started
    survivors = len(media["survivors"])
    _log(f"seeded in {seed_s:.1f}s ({survivors} surviving media, {args.reservations // 100} fresh reservations)")

    floor = await _measure_floor(args, admin_url, template, media, work_dir)
    trials = await _run_trials(args, admin_url, template, media, work_dir, redis_url, floor)
    for problem in floor.failed:
        _log(f"[floor] FAILED: {problem}")

    result: dict = {
        "bench": "cleanup",
        "reservations": args.reservations,
        "ephemeral_media": args.media,
        "accounts": args.accounts,
        "survivors": {"fresh_reservations": args.reservations // 100, "media": survivors},
        "seed_s": round(seed_s, 2),
        "blob_write_s": round(floor.blob_write_s, 2),
    }
    for name in JOB_NAMES:
        result[name] = _job_entry(name, trials, args, floor)
    reclaim, expire = result["reclaim_stale_uploads"], result["expire_ephemeral_media"]
    result["goals"] = {
        **_goals(reclaim, expire),
        "batch_size": {"reclaim_stale_uploads": reclaim["batch_size"], "expire_ephemeral_media": expire["batch_size"]},
        "spec_size": args.reservations == SPEC_RESERVATIONS and args.media == SPEC_MEDIA,
    }
    result["goals_at_best_batch_size"] = {
        **_goals(reclaim["best"], expire["best"]),
        "batch_size": {"reclaim_stale_uploads": reclaim["best"]["batch_size"],
                       "expire_ephemeral_media": expire["best"]["batch_size"]},
    }
    problems = floor.failed + [f"{t.label}: {p}" for t in trials for p in t.failed]
    result["verified"] = not problems
    if problems:
        result["problems"] = problems[:10]
    result["job_errors"] = sum(t.results[n]["errors"] for t in trials for n in JOB_NAMES if n in t.results)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reservations", type=int, default=SPEC_RESERVATIONS, help=f"stale reservations (default {SPEC_RESERVATIONS})")
    parser.add_argument("--media", type=int, default=SPEC_MEDIA, help=f"expired ephemeral media (default {SPEC_MEDIA})")
    parser.add_argument("--accounts", type=int, default=2000, help="accounts the rows are spread over (default 2000)")
    parser.add_argument(
        "--batch-sizes", default="1000,5000,10000",
        help="comma-separated batch sizes tried for both jobs besides the configured default (default 1000,5000,10000)",
    )
    parser.add_argument(
        "--unlink-threads", type=int, default=8,
        help="also measure the unlink floor with this many threads, on a blob set of its own (default 8; 0: skip)",
    )
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--batch-sizes takes comma-separated integers")
    if args.reservations < 1 or args.media < 1 or args.accounts < 1 or any(s < 1 for s in args.batch_sizes) or args.unlink_threads < 0:
        parser.error("--reservations, --media, --accounts and every batch size must be >= 1, --unlink-threads >= 0")
    return args


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mediavault-bench-cleanup-")).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the database copies, the seeded
    # database, the blob files and the feed keys are still removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        work_dir = stack.enter_context(_work_dir())
        admin_url = stack.enter_context(bench_postgres())
        seed_url = stack.enter_context(bench_database(admin_url))
        redis_url = stack.enter_context(bench_redis())
        result = asyncio.run(measure(args, admin_url, seed_url, redis_url, work_dir))
    print(json.dumps(result, allow_nan=False), flush=True)
    return 0 if result["verified"] and not result["job_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
