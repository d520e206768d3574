"""The cleanup cron jobs: thin loops over domain.cleanup, one bounded batch per transaction.

Every job runs from arq cron in the workers and by hand (`mediavault jobs run NAME
[--dry-run]`). A run writes one structured log line with its counts and updates the
metrics; a failing item is counted and skipped, never stops the run. A dry run does the
same row changes inside one transaction that is rolled back, touching no blob, so it
reports exactly what a real run would change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from arq.constants import in_progress_key_prefix
from arq.typing import WorkerCoroutine
from arq.utils import timestamp_ms
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.blobs import ListedObject, MultipartUpload
from mediavault.config import JobConfig, Settings
from mediavault.db.pool import sample_pool_use
from mediavault.domain import cleanup, events, ledger
from mediavault.domain.media import MAX_ATTEMPTS
from mediavault.domain.uploads.records import partial_key_for

log = logging.getLogger(__name__)

T = TypeVar("T")

# A run stops after this many batches and leaves the rest to the next run, so one run
# of a job never holds a worker for long.
MAX_BATCHES_PER_RUN = 1000


@dataclass
class RunReport:
    job: str
    dry_run: bool
    scanned: int = 0
    changed: int = 0
    freed_bytes: int = 0
    errors: int = 0
    # What the run found wrong and cannot put right itself: audit_accounts' ledger mismatches.
    findings: int = 0
    duration_ms: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


BatchStep = Callable[[cleanup.Connection, JobConfig, cleanup.Lane], Awaitable[cleanup.Batch]]
AfterCommit = Callable[[dict[str, Any], list[asyncpg.Record], RunReport], Coroutine[Any, Any, None]]


async def _batched(ctx: dict[str, Any], report: RunReport, config: JobConfig, step: BatchStep, after: AfterCommit | None) -> None:
    """Runs the step batch after batch until a short batch, in config.concurrency lanes at once."""
    if report.dry_run:
        async with ctx["pool"].acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                for _ in range(MAX_BATCHES_PER_RUN):
                    batch = await step(conn, config, cleanup.ALL)
                    _count(report, batch)
                    if batch.changed < config.batch_size:
                        break
            finally:
                await transaction.rollback()
        return
    lanes = [cleanup.Lane(index, config.concurrency) for index in range(config.concurrency)]
    await asyncio.gather(*(_lane(ctx, report, config, step, after, lane) for lane in lanes))


async def _lane(
    ctx: dict[str, Any], report: RunReport, config: JobConfig, step: BatchStep, after: AfterCommit | None, lane: cleanup.Lane
) -> None:
    pool: asyncpg.Pool = ctx["pool"]
    async with _Overlap() as overlap:
        for _ in range(MAX_BATCHES_PER_RUN):
            # A connection per batch, not per lane: the after-commit step in flight may
            # need one from the same pool.
            async with pool.acquire() as conn, conn.transaction():
                batch = await step(conn, config, lane)
            _count(report, batch)
            if after is not None and batch.rows:
                await overlap.then(after(ctx, batch.rows, report))
            if batch.changed < config.batch_size:
                break


class _Overlap:
    """Runs each batch's after-commit step while the next batch's SQL runs.

    The blob deletions and cache invalidations of batch N wait on the disk or Redis, the
    next batch waits on PostgreSQL: overlapping them roughly halves a long run. At most
    one step is in flight, so memory and the order of failures stay bounded; leaving the
    block waits for the last one.
    """

    def __init__(self) -> None:
        self._pending: asyncio.Task[None] | None = None

    async def then(self, step: Coroutine[Any, Any, None]) -> None:
        try:
            await self._drain()
        except BaseException:
            step.close()
            raise
        self._pending = asyncio.ensure_future(step)

    async def _drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def __aenter__(self) -> _Overlap:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            await self._drain()
            return
        # The run already failed; the step in flight still finishes, and its own failure
        # must not hide the first one.
        try:
            await self._drain()
        except Exception:
            log.warning("after-commit step failed while the run was failing", exc_info=True)


def _count(report: RunReport, batch: cleanup.Batch) -> None:
    report.scanned += batch.changed
    report.changed += batch.changed
    report.freed_bytes += batch.freed_bytes


async def _delete_blobs(ctx: dict[str, Any], keys: list[str], report: RunReport) -> set[str]:
    """Deletes the objects; returns the keys that failed (counted as errors, retried next run)."""
    try:
        failed = set(await ctx["blobs"].delete_many(keys))
    except Exception:
        log.warning("blob deletes failed", extra={"job": report.job, "objects": len(keys)}, exc_info=True)
        failed = set(keys)
    if failed:
        report.errors += len(failed)
        metrics.BLOB_DELETE_FAILURES.inc(len(failed))
        log.warning("blob deletes failed", extra={"job": report.job, "failed": len(failed), "example": next(iter(failed))})
    return failed


async def _feed_changed(ctx: dict[str, Any], owners: set[str]) -> None:
    await ctx["feed"].changed_many(owners)


async def _delete_upload_objects(ctx: dict[str, Any], rows: list[asyncpg.Record], report: RunReport) -> None:
    metrics.UPLOAD_OUTCOMES.labels("expired", "EXPIRED").inc(len(rows))
    # A failed delete leaves an object no row owns any more: the orphan sweep takes it.
    await _delete_blobs(ctx, [r["object_key"] for r in rows], report)
    for row in rows:
        if row["protocol"] == "single":
            continue
        # Partial bytes and, on S3, the multipart upload's parts (which no listing shows).
        try:
            await ctx["blobs"].discard_partial(partial_key_for(row["upload_id"]), row["object_key"], row["multipart_id"])
        except Exception:
            report.errors += 1
            metrics.BLOB_DELETE_FAILURES.inc()
            log.warning("partial upload delete failed", extra={"job": report.job, "upload_id": str(row["upload_id"])}, exc_info=True)


async def reclaim_stale_uploads(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Pending uploads past expires_at become EXPIRED and their reserved bytes are released."""
    await _batched(
        ctx, report, config,
        lambda conn, c, lane: cleanup.reclaim_stale_uploads(conn, c.batch_size, c.age_seconds, lane),
        _delete_upload_objects,
    )


async def _delete_then_mark_purged(ctx: dict[str, Any], rows: list[asyncpg.Record], report: RunReport) -> None:
    """Deletes the blobs of claimed media, then marks them purged; a failure leaves it for the next run."""
    pool: asyncpg.Pool = ctx["pool"]
    keys_of = {row["media_id"]: [row["object_key"], *row["variant_keys"]] for row in rows}
    failed = await _delete_blobs(ctx, [key for keys in keys_of.values() for key in keys], report)
    purged = [media_id for media_id, keys in keys_of.items() if failed.isdisjoint(keys)]
    kept = [media_id for media_id, keys in keys_of.items() if not failed.isdisjoint(keys)]
    if purged:
        deleted = [key for media_id in purged for key in keys_of[media_id]]
        again = set(await cleanup.mark_purged(pool, purged, deleted))
        purged = [media_id for media_id in purged if media_id not in again]
        report.details["purge_again"] = report.details.get("purge_again", 0) + len(again)
    if kept:
        # arq ends a run at the job timeout: held that long, the rows go to a later run
        # instead of this one's next batch, which would only fail on them again.
        await cleanup.postpone_purge(pool, kept, ctx["settings"].job_timeout_seconds)
    report.details["purged"] = report.details.get("purged", 0) + len(purged)
    report.details["purge_retry_next_run"] = report.details.get("purge_retry_next_run", 0) + len(kept)


async def _purge(ctx: dict[str, Any], report: RunReport, config: JobConfig, *, expired_only: bool = False) -> None:
    """Claims deleted media due for purge (expired_only: those the expiry job deleted) batch by batch
    and purges each claimed batch, in config.concurrency loops (a claim is exclusive, and no account is touched)."""
    await asyncio.gather(*(_purge_loop(ctx, report, config, expired_only) for _ in range(config.concurrency)))


async def _purge_loop(ctx: dict[str, Any], report: RunReport, config: JobConfig, expired_only: bool) -> None:
    pool: asyncpg.Pool = ctx["pool"]
    async with _Overlap() as overlap:
        for _ in range(MAX_BATCHES_PER_RUN):
            async with pool.acquire() as conn, conn.transaction():
                batch = await cleanup.claim_purge(conn, config.batch_size, expired_only=expired_only)
            if batch.rows:
                await overlap.then(_delete_then_mark_purged(ctx, batch.rows, report))
            if batch.changed < config.batch_size:
                break


async def _count_purge_due(ctx: dict[str, Any], report: RunReport) -> None:
    report.details["purged"] = await cleanup.count_purge_due(ctx["pool"])


async def expire_ephemeral_media(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Unsaved ephemeral media past its TTL is deleted with its blobs and its bytes freed."""

    async def purge_now(ctx: dict[str, Any], rows: list[asyncpg.Record], report: RunReport) -> None:
        await _feed_changed(ctx, {r["owner_id"] for r in rows})
        await _delete_then_mark_purged(ctx, rows, report)

    await _batched(
        ctx, report, config,
        lambda conn, c, lane: cleanup.expire_ephemeral_media(conn, c.batch_size, c.age_seconds, lane),
        purge_now,
    )
    if not report.dry_run:
        # Earlier runs' items whose blob deletions failed, now that their claims lapsed.
        await _purge(ctx, report, config, expired_only=True)


async def purge_deleted_media(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Blobs of media deleted longer ago than the grace period are removed; rows stay as tombstones."""
    if report.dry_run:
        await _count_purge_due(ctx, report)
        report.changed = report.scanned = report.details["purged"]
        return
    await _purge(ctx, report, config)
    report.changed = report.scanned = report.details.get("purged", 0)


async def fail_stuck_processing(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Media stuck in PENDING/PROCESSING is re-enqueued while it has attempts left, else FAILED."""

    async def enqueue(ctx: dict[str, Any], rows: list[asyncpg.Record], report: RunReport) -> None:
        requeued = [row for row in rows if row["processing_status"] == "pending"]
        # Each re-enqueue has a job id of its own (media.requeues), so arq runs it.
        enqueued = await asyncio.gather(
            *(ctx["transcodes"].enqueue(r["media_id"], r["variants_version"], r["requeues"]) for r in requeued)
        )
        # A run left unqueued (Redis down) changed nothing yet: the next sweep tries it again.
        not_queued = enqueued.count(False)
        report.errors += not_queued
        report.changed -= not_queued
        report.details["requeued"] = report.details.get("requeued", 0) + enqueued.count(True)
        report.details["failed"] = report.details.get("failed", 0) + len(rows) - len(requeued)
        await _feed_changed(ctx, {r["owner_id"] for r in rows})

    await _batched(
        ctx, report, config,
        lambda conn, c, lane: cleanup.fail_stuck_processing(conn, c.batch_size, c.age_seconds, MAX_ATTEMPTS),
        enqueue,
    )


@contextlib.asynccontextmanager
async def _transaction(conn: cleanup.Connection, dry_run: bool) -> AsyncIterator[None]:
    """A transaction that commits, or that a dry run rolls back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        await transaction.rollback()
        raise
    await (transaction.rollback() if dry_run else transaction.commit())


# A partition drop queues every insert behind its lock request while it waits for the
# statements already reading or writing usage_events: it gives up soon and tries again.
PARTITION_DROP_LOCK_TIMEOUT_MS = 1000
PARTITION_DROP_ATTEMPTS = 5
PARTITION_DROP_RETRY_SECONDS = 2.0


async def prune_telemetry(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Makes usage_events' partitions of the days ahead, then drops the partitions whose
    events were all received longer ago than the retention (age_seconds): whole days, so
    an event stays between age_seconds and a day more, and deletes the RecordEvents
    idempotency keys past their lifetime, batch_size at a time. Counters (media_counters)
    are lifetime totals and stay."""
    pool: asyncpg.Pool = ctx["pool"]
    dropped: list[asyncpg.Record] = []
    async with pool.acquire() as conn:
        async with _transaction(conn, report.dry_run):
            added = await events.add_partitions(conn)
        for attempt in range(1, PARTITION_DROP_ATTEMPTS + 1):
            try:
                async with _transaction(conn, report.dry_run):
                    dropped = await events.drop_partitions(conn, config.age_seconds, PARTITION_DROP_LOCK_TIMEOUT_MS)
                break
            except asyncpg.LockNotAvailableError:
                if attempt == PARTITION_DROP_ATTEMPTS:
                    raise
                await asyncio.sleep(PARTITION_DROP_RETRY_SECONDS)

    async def drop_keys(conn: cleanup.Connection, job: JobConfig, _: cleanup.Lane) -> cleanup.Batch:
        return cleanup.Batch(await events.drop_idempotency_keys(conn, job.batch_size))

    # Counted apart: the run's changes are the partitions it dropped.
    keys = RunReport(report.job, report.dry_run)
    await _batched(ctx, keys, config, drop_keys, None)
    report.scanned = report.changed = len(dropped)
    report.details.update(
        partitions_added=added,
        partitions_dropped=[r["partition_name"] for r in dropped],
        estimated_events_dropped=sum(r["estimated_rows"] for r in dropped),
        idempotency_keys_dropped=keys.changed,
    )


async def audit_accounts(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """The ledger audit, plus accounts whose reservations exceed half their quota for too long."""
    mismatches = await ledger.audit(ctx["pool"])
    heavy = await cleanup.heavy_reservations(ctx["pool"], config.age_seconds, config.batch_size)
    for m in mismatches:
        log.warning("ledger mismatch", extra={"job": report.job, "user_id": m.user_id, "figure": m.figure,
                                              "account_value": m.account_value, "expected_value": m.expected_value})
    for row in heavy:
        log.warning("reservations above half the quota", extra={"job": report.job, "user_id": row["user_id"],
                                                                 "reserved_bytes": row["reserved_bytes"], "quota_bytes": row["quota_bytes"]})
    totals = await ctx["accounts"].totals()
    for kind in ("quota", "used", "reserved"):
        metrics.STORAGE_BYTES.labels(kind).set(getattr(totals, kind))
    metrics.LEDGER_MISMATCHES.set(len(mismatches))
    metrics.HEAVY_RESERVATIONS.set(len(heavy))
    report.scanned = len(mismatches) + len(heavy)
    report.findings = len(mismatches)
    report.details.update(ledger_mismatches=len(mismatches), heavy_reservations=len(heavy))


# Stats of live originals the orphan sweep has in flight at once: one at a time, a store that
# answers a HEAD in 10 ms takes longer than the job's timeout over 100k originals.
ORIGINAL_STATS_IN_FLIGHT = 16


async def sweep_orphan_blobs(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> None:
    """Unowned objects older than the grace period go to quarantine; quarantined ones still
    unowned once quarantined for the grace period are deleted; multipart uploads no pending
    upload owns, begun before the grace period, are aborted; live media whose original is
    missing is marked FAILED."""
    # Quarantine is emptied first, so that not even a zero grace period lets a run delete what it moved.
    deleted = await _empty_quarantine(ctx, report, config)
    quarantined = await _quarantine_orphans(ctx, report, config)
    aborted = await _abort_unowned_multipart_uploads(ctx, report, config)
    missing = await _fail_media_missing_originals(ctx, report, config)
    report.changed = quarantined + deleted + aborted + missing
    report.details.update(
        quarantined=quarantined, deleted_from_quarantine=deleted, multipart_uploads_aborted=aborted, originals_missing=missing
    )


async def _empty_quarantine(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> int:
    """Deletes quarantined objects that are still unowned and were quarantined longer ago than
    the grace period, and puts back those a row came to own."""
    blobs, pool = ctx["blobs"], ctx["pool"]
    # By the time in quarantine, not by the runs: a run by hand right after the cron's (or during
    # it) must not delete what that one just quarantined. Less half a period (of the grace period
    # at most): the run after a day's run starts at the same minute, a few seconds sooner into its
    # work than the moves were, which the grace period itself would send to the run after that.
    slack = min(config.every_seconds, config.age_seconds) / 2
    cutoff = datetime.now(UTC) - timedelta(seconds=config.age_seconds - slack)
    deleted = 0
    async for page in _pages(functools.partial(blobs.list_page, cleanup.QUARANTINE), config.batch_size, _key):
        report.scanned += len(page)
        verdict = await cleanup.judge_quarantined(pool, page, cutoff)
        deleted += len(verdict.delete)
        if not report.dry_run:
            for quarantined_key, original in verdict.restore:
                await _restore(ctx, quarantined_key, original, report)
            if verdict.delete:
                # A failed delete is an error, not a change: the object stays for the next run.
                deleted -= len(await _delete_blobs(ctx, verdict.delete, report))
    return deleted


async def _pages(list_page: Callable[..., Awaitable[list[T]]], limit: int, cursor: Callable[[T], Any]) -> AsyncIterator[list[T]]:
    """A blob store listing page by page: list_page(after=..., limit=...) from the start, each
    page after the cursor of the last one's last entry, until a short page."""
    after = None
    while True:
        page = await list_page(after=after, limit=limit)
        yield page
        if len(page) < limit:
            return
        after = cursor(page[-1])


def _key(listed: ListedObject) -> str:
    return listed.key


def _itself(upload: MultipartUpload) -> MultipartUpload:
    return upload


async def _quarantine_orphans(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> int:
    """Moves the objects no row owns, older than the grace period, to quarantine."""
    blobs, pool = ctx["blobs"], ctx["pool"]
    cutoff = datetime.now(UTC) - timedelta(seconds=config.age_seconds)
    quarantined = 0
    for prefix in cleanup.SWEPT_PREFIXES:
        async for page in _pages(functools.partial(blobs.list_page, prefix), config.batch_size, _key):
            report.scanned += len(page)
            for key in await cleanup.orphans(pool, page, cutoff):
                if not report.dry_run:
                    try:
                        await blobs.move(key, cleanup.QUARANTINE + key)
                    except Exception:
                        report.errors += 1
                        log.warning("quarantine failed", extra={"job": report.job, "object_key": key}, exc_info=True)
                        continue
                quarantined += 1
    return quarantined


async def _abort_unowned_multipart_uploads(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> int:
    """Aborts the multipart uploads no pending upload owns, begun before the grace period: a released
    upload's or a failed write's whose abort failed, which no object listing shows and no other job
    aborts."""
    blobs, pool = ctx["blobs"], ctx["pool"]
    cutoff = datetime.now(UTC) - timedelta(seconds=config.age_seconds)
    aborted = 0
    for prefix in cleanup.MULTIPART_PREFIXES:
        async for page in _pages(functools.partial(blobs.list_multipart_uploads, prefix), config.batch_size, _itself):
            report.scanned += len(page)
            for upload in await cleanup.unowned_multipart_uploads(pool, page, cutoff):
                if not report.dry_run:
                    try:
                        await blobs.abort_multipart_upload(upload.key, upload.multipart_id)
                    except Exception:
                        # Its parts stay: an error, not a change, and the next run tries again.
                        report.errors += 1
                        metrics.BLOB_DELETE_FAILURES.inc()
                        log.warning("multipart upload abort failed", extra={"job": report.job, "object_key": upload.key,
                                                                            "multipart_id": upload.multipart_id}, exc_info=True)
                        continue
                aborted += 1
    return aborted


async def _fail_media_missing_originals(ctx: dict[str, Any], report: RunReport, config: JobConfig) -> int:
    """Marks live media whose original is gone from the blob store FAILED."""
    blobs, pool = ctx["blobs"], ctx["pool"]
    missing = 0
    after_id = cleanup.FIRST_MEDIA_ID
    in_flight = asyncio.Semaphore(ORIGINAL_STATS_IN_FLIGHT)

    async def present(row: Any) -> bool | None:
        """Whether the row's original is there; None when the store could not tell."""
        async with in_flight:
            try:
                return await blobs.stat(row["object_key"]) is not None
            except Exception:
                # Neither found nor known to be missing: the media stays as it is, and the next run looks again.
                report.errors += 1
                log.warning("original stat failed", extra={"job": report.job, "media_id": str(row["media_id"]),
                                                           "object_key": row["object_key"]}, exc_info=True)
                return None

    while True:
        rows = await cleanup.live_originals(pool, after_id, config.batch_size)
        for row, found in zip(rows, await asyncio.gather(*(present(row) for row in rows)), strict=True):
            if found is not False:
                continue
            owner = None if report.dry_run else await cleanup.mark_original_missing(pool, row["media_id"])
            if owner is None and not report.dry_run:
                # Expired or deleted since it was listed: its original went with it.
                continue
            missing += 1
            log.warning("original missing", extra={"job": report.job, "media_id": str(row["media_id"]), "object_key": row["object_key"]})
            if owner is not None:
                await _feed_changed(ctx, {owner})
        if len(rows) < config.batch_size:
            return missing
        after_id = rows[-1]["media_id"]


async def _restore(ctx: dict[str, Any], quarantined_key: str, original: str, report: RunReport) -> None:
    # A row came to own the object after it was quarantined (a slow upload): put it back.
    try:
        await ctx["blobs"].move(quarantined_key, original)
    except Exception:
        report.errors += 1
        log.warning("restore from quarantine failed", extra={"job": report.job, "object_key": original}, exc_info=True)
        return
    report.details["restored"] = report.details.get("restored", 0) + 1


JobFunction = Callable[[dict[str, Any], RunReport, JobConfig], Awaitable[None]]

JOBS: dict[str, JobFunction] = {
    "reclaim_stale_uploads": reclaim_stale_uploads,
    "expire_ephemeral_media": expire_ephemeral_media,
    "purge_deleted_media": purge_deleted_media,
    "fail_stuck_processing": fail_stuck_processing,
    "sweep_orphan_blobs": sweep_orphan_blobs,
    "prune_telemetry": prune_telemetry,
    "audit_accounts": audit_accounts,
}


def job_config(settings: Settings, name: str) -> JobConfig:
    return getattr(settings.jobs, name)


async def run_job(ctx: dict[str, Any], name: str, *, dry_run: bool = False) -> RunReport:
    """Runs one job once; never raises for a failing item, logs one line, updates metrics."""
    report = RunReport(job=name, dry_run=dry_run)
    started = time.perf_counter()
    outcome = "ok"
    try:
        await JOBS[name](ctx, report, job_config(ctx["settings"], name))
    except Exception:
        outcome = "failed"
        report.errors += 1
        log.exception("job failed", extra={"job": name})
    report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
    if not dry_run:
        metrics.JOB_RUNS.labels(name, outcome).inc()
        metrics.JOB_ITEMS.labels(name, "changed").inc(report.changed)
        metrics.JOB_ITEMS.labels(name, "errors").inc(report.errors)
        metrics.JOB_FREED_BYTES.labels(name).inc(report.freed_bytes)
        if outcome == "ok":
            metrics.JOB_LAST_SUCCESS.labels(name).set_to_current_time()
    log.info("job run", extra={**dataclasses.asdict(report), "outcome": outcome})
    return report


QUEUE_SAMPLE_SECONDS = 15.0
# arq's queue is a sorted set of job ids scored by when each is due; a running job stays in it
# (with an arq:in-progress:<id> key beside it) until it ends, and so does a deferred one (a
# retry's backoff), scored in the future. Waiting are the due jobs without an in-progress key.
# A worker starts only jobs among the first queue_read_limit (arq: 5 x max_jobs, at least
# 100) due ones, and every job enqueued later is due later, so no running job is further back
# than that: the in-progress keys are looked for among the oldest RUNNING_SCAN due jobs, which
# covers workers of up to 200 job slots and keeps a long backlog from costing Redis its length.
# The oldest waiting job is the first of them without an in-progress key: the very first due
# job is usually one running, whose score tells when it was due, not that anything waits.
RUNNING_SCAN = 1000
_WAITING = """
local due = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local running = 0
local oldest_waiting = false
for i = 1, #oldest, 2 do
    if redis.call('EXISTS', ARGV[2] .. oldest[i]) == 1 then
        running = running + 1
    elseif not oldest_waiting then
        oldest_waiting = oldest[i + 1]
    end
end
if not oldest_waiting and due > #oldest / 2 then
    oldest_waiting = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', ARGV[3], 1)[2] or false
end
return {due - running, oldest_waiting}
"""


async def observe_queue(ctx: dict[str, Any]) -> int:
    """Exports how many jobs wait to run in the photo, video and cron queues (due now or earlier
    and not running) and how long the oldest of each has been due; returns the jobs of all together."""
    settings = ctx["settings"]
    redis = ctx["redis"]
    total = 0
    for queue, name in (("photo", settings.queue_name), ("video", settings.video_queue), ("cron", settings.cron_queue)):
        # arq's own clock, which rounds: a job queued this millisecond has a score rounded up.
        now_ms = timestamp_ms()
        depth, oldest_due_ms = await redis.eval(_WAITING, 1, name, now_ms, in_progress_key_prefix, RUNNING_SCAN)
        metrics.QUEUE_DEPTH.labels(queue).set(int(depth))
        waited_ms = 0.0 if oldest_due_ms is None else max(0.0, now_ms - float(oldest_due_ms))
        metrics.QUEUE_OLDEST_WAITING.labels(queue).set(waited_ms / 1000)
        total += int(depth)
    metrics.QUEUE_SAMPLED.set(time.time())
    return total


def forget_queue_samples() -> None:
    """Takes this process's queue depths and waits out of its metrics."""
    metrics.QUEUE_DEPTH.clear()
    metrics.QUEUE_OLDEST_WAITING.clear()


async def sample_queues(ctx: dict[str, Any]) -> None:
    """observe_queue every QUEUE_SAMPLE_SECONDS, for as long as the worker runs.

    A sample that fails (Redis away) and the sampler's end (whatever ends it) take the queues'
    series away: a wait sampled before is not the wait of now, and exported on, it would hold
    MediavaultQueueBacklog firing, or quiet, for as long as the process lives. The other workers'
    samples stand in; the age of mediavault_queue_sampled_timestamp_seconds tells that this one
    samples no more.
    """
    try:
        while True:
            try:
                await observe_queue(ctx)
            except (RedisError, OSError):
                forget_queue_samples()
            await asyncio.sleep(QUEUE_SAMPLE_SECONDS)
    finally:
        forget_queue_samples()


def queue_label(ctx: dict[str, Any]) -> str:
    """The queue a worker's own metrics are labelled by: its ctx's, photo for the photo worker's, which names none."""
    return ctx.get("queue", "photo")


async def sample_pool(ctx: dict[str, Any]) -> None:
    """Exports, every POOL_SAMPLE_SECONDS for as long as the worker runs, how many connections of
    its database pool are in use and the most it opens, labelled by the worker's queue."""
    queue = queue_label(ctx)
    await sample_pool_use(
        ctx["pool"], metrics.WORKER_DB_CONNECTIONS_IN_USE.labels(queue), metrics.WORKER_DB_CONNECTIONS_MAX.labels(queue)
    )


def cron_task(name: str) -> WorkerCoroutine:
    async def task(ctx: dict[str, Any], *_: Any, **__: Any) -> dict[str, Any]:
        return dataclasses.asdict(await run_job(ctx, name))

    task.__qualname__ = task.__name__ = name
    return task
