"""The cleanup jobs against real PostgreSQL, Redis and blob stores."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from mediavault import devservers
from mediavault.blobs import BlobStoreError, single_chunk
from mediavault.config import Settings
from mediavault.db import migrate
from mediavault.domain import cleanup, events, ledger
from mediavault.domain.media import Variant, variant_key
from mediavault.jobs import TranscodeQueue
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import CORPUS, running_worker
from tests.helpers import begin, fake_jpeg, midnight, partition_days, put, settled, upload
from workers.maintenance import JOBS, run_job
from workers.settings import shutdown, startup


@pytest.fixture
async def make_ctx(server):
    made = []

    async def make(settings=None):
        settings = settings or server.settings
        # As the cron worker's: arq binds the ctx's pool to the worker's own queue.
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.cron_queue)
        ctx = {"settings": settings, "redis": redis}
        await startup(ctx)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        await shutdown(ctx)
        await ctx["redis"].aclose()


@pytest.fixture
async def ctx(make_ctx):
    return await make_ctx()


async def state_of(pool, upload_id: str) -> str:
    return await pool.fetchval("SELECT state FROM uploads WHERE upload_id = $1::uuid", upload_id)


async def test_lapsed_reservations_are_released_and_objects_deleted(ctx, storage, auth, user_id, pool, server):
    md = auth(user_id)
    data = fake_jpeg(4096)
    lapsed = await begin(storage, md, data)
    await put(lapsed.upload_url, dict(lapsed.upload_headers), data)
    fresh = await begin(storage, md, data)
    await pool.execute("UPDATE uploads SET expires_at = now() - interval '1 second' WHERE upload_id = $1::uuid", lapsed.upload.upload_id)

    report = await run_job(ctx, "reclaim_stale_uploads")
    assert report.changed >= 1
    assert report.freed_bytes >= len(data)
    assert report.errors == 0

    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=lapsed.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_EXPIRED
    assert got.failure_reason == "EXPIRED"
    assert await state_of(pool, fresh.upload.upload_id) == "pending"
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.reserved_bytes == len(data)
    key = await pool.fetchval("SELECT object_key FROM uploads WHERE upload_id = $1::uuid", lapsed.upload.upload_id)
    assert not server.blobs.path(key).exists()
    assert await ledger.audit(pool) == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=lapsed.upload.upload_id), metadata=md)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_finalize_racing_reclaim_ends_committed_or_released_never_both(ctx, storage, auth, user_id, pool):
    md = auth(user_id)
    outcomes = []
    for _ in range(40):
        data = fake_jpeg(2048)
        begun = await begin(storage, md, data)
        await put(begun.upload_url, dict(begun.upload_headers), data)
        await pool.execute(
            "UPDATE uploads SET expires_at = now() + make_interval(secs => $2) WHERE upload_id = $1::uuid",
            begun.upload.upload_id, random.uniform(0.0, 0.02),
        )
        await asyncio.sleep(random.uniform(0.0, 0.02))
        await asyncio.gather(
            storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md),
            run_job(ctx, "reclaim_stale_uploads"),
            return_exceptions=True,
        )
        state = await state_of(pool, begun.upload.upload_id)
        if state == "pending":
            await asyncio.sleep(0.03)
            await run_job(ctx, "reclaim_stale_uploads")
            state = await state_of(pool, begun.upload.upload_id)
        kinds = tuple(r["kind"] for r in await pool.fetch(
            "SELECT kind FROM ledger_entries WHERE upload_id = $1::uuid ORDER BY entry_id", begun.upload.upload_id))
        assert (state, kinds) in {("finalized", ("reserve", "commit")), ("expired", ("reserve", "release"))}
        outcomes.append(state)
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.reserved_bytes == 0
    assert await ledger.audit(pool) == []


async def seed_media(pool, blobs, owner: str, count: int, *, retention: str, expired: bool, saved: bool = False) -> list[uuid.UUID]:
    """Media rows with real blobs (original and a thumbnail), committed through the ledger like finalize does,
    the thumbnail counted in the derived figures like the transcode's completion does."""
    ids = [uuid.uuid4() for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, 1073741824) ON CONFLICT DO NOTHING", owner)
        await conn.execute(
            "INSERT INTO ledger_entries (user_id, kind, quota_delta) SELECT $1, 'grant', 1073741824 "
            "WHERE NOT EXISTS (SELECT 1 FROM ledger_entries WHERE user_id = $1 AND kind = 'grant')", owner)
        for media_id in ids:
            key = f"originals/{media_id.hex[:2]}/{media_id.hex}"
            await conn.execute(
                "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key, media_id, expires_at) "
                "VALUES ($1, $2, 'x.jpg', 'image/jpeg', 100, $3, 'finalized', $4, $1, now())", media_id, owner, retention, key)
            await conn.execute(
                "INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, derived_bytes, object_key, retention, "
                "processing_status, expires_at, saved_at) VALUES ($1, $2, $1, 'image', 'image/jpeg', 100, 5, $3, $4, 'complete', "
                "CASE WHEN $4 = 'ephemeral' THEN now() + make_interval(secs => $5) END, CASE WHEN $6 THEN now() END)",
                media_id, owner, key, retention, -60.0 if expired else 3600.0, saved)
            await conn.execute(
                "INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes) "
                "VALUES ($1, 'thumbnail', 0, $2, 'image/jpeg', 10, 10, 5)", media_id, f"variants/{media_id.hex[:2]}/{media_id.hex}/v0/thumbnail.jpg")
            await conn.execute("UPDATE accounts SET used_bytes = used_bytes + 100, derived_bytes = derived_bytes + 5 WHERE user_id = $1", owner)
            await conn.execute("INSERT INTO ledger_entries (user_id, kind, used_delta, media_id) VALUES ($1, 'commit', 100, $2)", owner, media_id)
    for media_id in ids:
        await blobs.write(f"originals/{media_id.hex[:2]}/{media_id.hex}", single_chunk(b"o" * 100), content_type="image/jpeg")
        await blobs.write(f"variants/{media_id.hex[:2]}/{media_id.hex}/v0/thumbnail.jpg", single_chunk(b"t" * 5), content_type="image/jpeg")
    return ids


async def soft_delete(pool, media_ids: list[uuid.UUID], purge_after_seconds: float) -> None:
    """What DeleteMedia does, for many rows at once: bytes freed through the ledger."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE media SET deleted_at = now(), purge_after = now() + make_interval(secs => $2) "
            "WHERE media_id = ANY($1::uuid[]) AND deleted_at IS NULL RETURNING media_id, owner_id, size_bytes, derived_bytes",
            media_ids, purge_after_seconds)
        for row in rows:
            await conn.execute(
                "UPDATE accounts SET used_bytes = used_bytes - $2, derived_bytes = derived_bytes - $3 WHERE user_id = $1",
                row["owner_id"], row["size_bytes"], row["derived_bytes"])
            await conn.execute(
                "INSERT INTO ledger_entries (user_id, kind, used_delta, media_id) VALUES ($1, 'free', $2, $3)",
                row["owner_id"], -row["size_bytes"], row["media_id"])


async def blobs_exist(blobs, media_id: uuid.UUID) -> tuple[bool, bool]:
    original = await blobs.stat(f"originals/{media_id.hex[:2]}/{media_id.hex}")
    thumbnail = await blobs.stat(f"variants/{media_id.hex[:2]}/{media_id.hex}/v0/thumbnail.jpg")
    return original is not None, thumbnail is not None


async def retry_time_passed(pool, media_ids: list[uuid.UUID]) -> None:
    """Puts the retry time of purges whose blob deletions failed in the past, as waiting for a later run would."""
    await pool.execute(
        "UPDATE media SET purge_claimed_until = now() - interval '1 second' WHERE media_id = ANY($1::uuid[])", media_ids)


async def test_expired_ephemeral_media_goes_with_its_blobs_and_saved_media_stays(ctx, pool, user_id):
    blobs = ctx["blobs"]
    doomed = await seed_media(pool, blobs, user_id, 30, retention="ephemeral", expired=True)
    not_yet = await seed_media(pool, blobs, user_id, 3, retention="ephemeral", expired=False)
    saved = await seed_media(pool, blobs, user_id, 3, retention="permanent", expired=True, saved=True)
    permanent = await seed_media(pool, blobs, user_id, 3, retention="permanent", expired=False)

    report = await run_job(ctx, "expire_ephemeral_media")
    assert report.errors == 0
    assert report.changed >= 30
    assert report.freed_bytes >= 3000
    for media_id in doomed:
        row = await pool.fetchrow("SELECT deleted_at, purged_at FROM media WHERE media_id = $1", media_id)
        assert row["deleted_at"]
        assert row["purged_at"]
        assert await blobs_exist(blobs, media_id) == (False, False)
    for media_id in not_yet + saved + permanent:
        assert await pool.fetchval("SELECT deleted_at FROM media WHERE media_id = $1", media_id) is None
        assert await blobs_exist(blobs, media_id) == (True, True)
    assert await pool.fetchval("SELECT used_bytes FROM accounts WHERE user_id = $1", user_id) == 900
    assert await ledger.audit(pool) == []


async def test_a_format_committed_after_the_expiry_claims_snapshot_is_purged_too(ctx, pool, user_id, monkeypatch):
    blobs = ctx["blobs"]
    doomed = await seed_media(pool, blobs, user_id, 3, retention="ephemeral", expired=True)
    late_keys = {media_id: f"variants/{media_id.hex[:2]}/{media_id.hex}/v0/thumbnail.webp" for media_id in doomed}
    real_mark_purged = cleanup.mark_purged

    async def a_late_format_then_mark_purged(conn, media_ids, deleted_keys):
        # A WebP made on request that committed after the claim's snapshot was taken and
        # before the claim locked its row: in the table, not in the claim's variant list.
        for media_id in set(media_ids) & set(late_keys):
            key = late_keys.pop(media_id)
            await blobs.write(key, single_chunk(b"w" * 4), content_type="image/webp")
            await pool.execute(
                "INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes) "
                "VALUES ($1, 'thumbnail', 0, $2, 'image/webp', 10, 10, 4)", media_id, key)
            assert key not in deleted_keys
            late.append(key)
        return await real_mark_purged(conn, media_ids, deleted_keys)

    late: list[str] = []
    monkeypatch.setattr(cleanup, "mark_purged", a_late_format_then_mark_purged)
    report = await run_job(ctx, "expire_ephemeral_media")
    assert report.errors == 0
    assert len(late) == 3
    assert report.details["purge_again"] == 3
    for key in late:
        assert await blobs.stat(key) is None, "no blob is left without a row"
    for media_id in doomed:
        assert await blobs_exist(blobs, media_id) == (False, False)
        assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", media_id)
        assert await pool.fetchval("SELECT count(*) FROM media_variants WHERE media_id = $1", media_id) == 0


async def test_an_expiry_that_meets_a_format_being_recorded_frees_what_it_recorded(ctx, pool, user_id):
    # A format made on request adds its bytes to the media and to the account, holding the media
    # row. The race: the run commits after the expiry's batch took its snapshot and before the
    # batch locks that row. Many of the owner's items due before it make that a while, and a
    # format recorded again and again lands in it.
    items = await seed_media(pool, ctx["blobs"], user_id, 500, retention="ephemeral", expired=True)
    last = items[-1]
    await pool.execute("UPDATE media SET expires_at = now() - interval '1 second' WHERE media_id = $1", last)
    webp = variant_key(last, 0, "thumbnail", "image/webp")
    recording = True

    async def record_formats() -> None:
        size = 0
        while recording:
            size += 1
            await ctx["library"].add_formats(last, 0, [Variant("thumbnail", webp, "image/webp", 10, 10, size)])
            await asyncio.sleep(0.001)

    formats = asyncio.ensure_future(record_formats())
    try:
        # A dry run makes the batch's changes and rolls them back: the same race, run after run.
        for _ in range(20):
            assert (await run_job(ctx, "expire_ephemeral_media", dry_run=True)).errors == 0
        assert (await run_job(ctx, "expire_ephemeral_media")).errors == 0
    finally:
        recording = False
        await formats
    # The last item, if the run found it locked by a format being recorded.
    assert (await run_job(ctx, "expire_ephemeral_media")).errors == 0
    assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", items) == 0
    account = await pool.fetchrow("SELECT used_bytes, derived_bytes FROM accounts WHERE user_id = $1", user_id)
    assert tuple(account) == (0, 0)
    assert await ledger.audit(pool) == []


async def test_purge_waits_for_the_grace_period_and_keeps_tombstones(ctx, storage, media, auth, user_id, pool):
    blobs = ctx["blobs"]
    md = auth(user_id)
    ids = await seed_media(pool, blobs, user_id, 4, retention="permanent", expired=False)
    for media_id in ids:
        await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=str(media_id)), metadata=md)
    await run_job(ctx, "purge_deleted_media")
    assert all([await blobs_exist(blobs, m) == (True, True) for m in ids]), "inside the grace period nothing goes"

    await pool.execute("UPDATE media SET purge_after = now() - interval '1 second' WHERE media_id = ANY($1::uuid[])", ids[:2])
    report = await run_job(ctx, "purge_deleted_media")
    assert report.errors == 0
    assert report.details["purged"] >= 2
    for media_id in ids[:2]:
        assert await blobs_exist(blobs, media_id) == (False, False)
        row = await pool.fetchrow("SELECT purged_at, deleted_at FROM media WHERE media_id = $1", media_id)
        assert row["purged_at"], "the row stays as a tombstone"
        assert row["deleted_at"], "the row stays as a tombstone"
        assert await pool.fetchval("SELECT count(*) FROM media_variants WHERE media_id = $1", media_id) == 0
    for media_id in ids[2:]:
        assert await blobs_exist(blobs, media_id) == (True, True)


async def test_purge_loops_of_two_runners_purge_each_item_once(make_ctx, make_settings, pool, user_id, monkeypatch):
    settings = make_settings(jobs={"purge_deleted_media": {"batch_size": 15, "concurrency": 3}})
    first, second = await make_ctx(settings), await make_ctx(settings)
    ids = await seed_media(pool, first["blobs"], user_id, 240, retention="permanent", expired=False)
    await soft_delete(pool, ids, -1)
    marked = []
    real_mark_purged = cleanup.mark_purged

    async def recording_mark_purged(conn, media_ids, deleted_keys):
        marked.extend(media_ids)
        return await real_mark_purged(conn, media_ids, deleted_keys)

    # Which loop marked what: a double purge would leave the same rows behind.
    monkeypatch.setattr(cleanup, "mark_purged", recording_mark_purged)
    reports = await asyncio.gather(run_job(first, "purge_deleted_media"), run_job(second, "purge_deleted_media"))
    assert [r.errors for r in reports] == [0, 0]
    mine = [m for m in marked if m in set(ids)]
    assert sorted(mine) == sorted(ids), "every item purged by exactly one loop"
    assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", ids) == 0
    assert [await blobs_exist(first["blobs"], m) for m in ids] == [(False, False)] * 240


async def test_stuck_media_is_re_enqueued_or_failed(ctx, storage, media, auth, user_id, pool, worker):
    md = auth(user_id)
    retry = await upload(storage, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    exhausted = await upload(storage, md, fake_jpeg(1234))
    await settled(media, md, retry.media_id)
    await settled(media, md, exhausted.media_id)
    await pool.execute(
        "UPDATE media SET processing_status = 'processing', attempts = 1, updated_at = now() - interval '2 hours' "
        "WHERE media_id = $1::uuid", retry.media_id)
    await pool.execute(
        "UPDATE media SET processing_status = 'processing', attempts = 3, processing_error = NULL, "
        "updated_at = now() - interval '2 hours' WHERE media_id = $1::uuid", exhausted.media_id)
    await without_variants(pool, retry.media_id)

    report = await run_job(ctx, "fail_stuck_processing")
    assert report.errors == 0
    assert report.changed >= 2
    assert report.details["failed"] >= 1
    done = await settled(media, md, retry.media_id)
    assert done.processing_status == mpb.PROCESSING_STATUS_COMPLETE
    assert done.attempts == 2
    assert len(done.variants) == 3
    failed = (await media.GetMedia(mpb.GetMediaRequest(media_id=exhausted.media_id), metadata=md)).media
    assert failed.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert failed.processing_error == "processing did not finish"


async def test_an_expired_render_not_yet_removed_is_neither_claimed_nor_requeued(ctx, storage, media, auth, user_id, pool, worker):
    """Expired media is gone (media.PRESENT) before the expiry job removes it, up to one run later:
    the transcode claim and the stuck-media sweep read deleted_at alone, so a worker claimed, and
    the sweep re-queued, its render, a video's for minutes, for media no one can see any more."""
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1240), retention=pb.RETENTION_EPHEMERAL)
    await settled(media, md, done.media_id)
    media_id = uuid.UUID(done.media_id)
    # A render left PENDING (a reprocess, a retry), its media expired and not removed yet.
    await pool.execute(
        "UPDATE media SET processing_status = 'pending', attempts = 1, expires_at = now() - interval '1 minute', "
        "updated_at = now() - interval '2 hours' WHERE media_id = $1", media_id)
    state = "SELECT processing_status, attempts, requeues, updated_at, deleted_at FROM media WHERE media_id = $1"
    before = tuple(await pool.fetchrow(state, media_id))

    assert await ctx["library"].claim(media_id, 0) is None
    assert tuple(await pool.fetchrow(state, media_id)) == before
    report = await run_job(ctx, "fail_stuck_processing")
    assert report.errors == 0
    assert tuple(await pool.fetchrow(state, media_id)) == before, "not re-queued; the expiry job removes it"


async def stuck_before_its_claim(storage, media, md, pool) -> str:
    """A processed media put back as a database outage at the claim leaves one: PENDING, no
    attempt counted, no variants, and the job that should have run it finished (arq keeps
    its id for an hour)."""
    done = await upload(storage, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    await settled(media, md, done.media_id)
    await pool.execute(
        "UPDATE media SET processing_status = 'pending', attempts = 0, updated_at = now() - interval '2 hours' "
        "WHERE media_id = $1::uuid", done.media_id)
    await without_variants(pool, done.media_id)
    return done.media_id


async def without_variants(pool, media_id: str) -> None:
    """The media as a run that never stored its variants leaves it: no variant rows, nothing derived."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT owner_id, derived_bytes FROM media WHERE media_id = $1::uuid FOR UPDATE", media_id)
        await conn.execute("DELETE FROM media_variants WHERE media_id = $1::uuid", media_id)
        await conn.execute("UPDATE media SET derived_bytes = 0 WHERE media_id = $1::uuid", media_id)
        await conn.execute(
            "UPDATE accounts SET derived_bytes = derived_bytes - $2 WHERE user_id = $1", row["owner_id"], row["derived_bytes"])


async def test_a_stuck_run_whose_job_id_arq_remembers_runs_again(ctx, storage, media, auth, user_id, pool, worker):
    md = auth(user_id)
    media_id = await stuck_before_its_claim(storage, media, md, pool)

    report = await run_job(ctx, "fail_stuck_processing")
    assert report.errors == 0
    assert report.details["requeued"] >= 1
    item = await settled(media, md, media_id, timeout=30)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE
    assert len(item.variants) == 3
    assert await pool.fetchval("SELECT requeues FROM media WHERE media_id = $1", uuid.UUID(media_id)) == 1


async def test_a_sweep_that_cannot_queue_a_run_does_not_count_it_changed(ctx, storage, media, auth, user_id, pool, worker):
    media_id = await stuck_before_its_claim(storage, media, auth(user_id), pool)
    unreachable = ArqRedis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        report = await run_job({**ctx, "transcodes": TranscodeQueue(unreachable, ctx["settings"].queue_name)}, "fail_stuck_processing")
    finally:
        await unreachable.aclose()
    assert report.errors >= 1
    assert report.changed == 0
    assert await pool.fetchval("SELECT processing_status FROM media WHERE media_id = $1::uuid", media_id) == "pending"


async def test_prune_drops_exactly_the_partitions_past_retention_and_keeps_the_counters(ctx, storage, media, auth, user_id, pool):
    retention = ctx["settings"].jobs.prune_telemetry.age_seconds
    assert retention == 30 * 86400
    done = await upload(storage, auth(user_id), fake_jpeg(1800))
    request = mpb.RecordEventsRequest()
    for event_type in (mpb.USAGE_EVENT_TYPE_IMPRESSION, mpb.USAGE_EVENT_TYPE_LIKE):
        request.events.add(event_type=event_type, media_id=done.media_id, surface="feed")
    await media.RecordEvents(request, metadata=auth(user_id))
    counters_before = await pool.fetchrow("SELECT * FROM media_counters WHERE media_id = $1::uuid", done.media_id)

    today = datetime.now(UTC).date()
    await pool.execute("SELECT usage_events_add_partitions($1, $2)", today - timedelta(days=40), today)
    # One event at noon of each of the 40 days before today, and one a second inside the
    # retention: it shares its day's partition with events past the retention.
    await pool.execute(
        "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at) "
        "SELECT $1, $2::uuid, 'impression', now(), ($3::date - d)::timestamp AT TIME ZONE 'UTC' + interval '12 hours' "
        "FROM generate_series(1, 40) AS d",
        user_id, done.media_id, today)
    await pool.execute(
        "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at) "
        "VALUES ($1, $2::uuid, 'share', now(), now() - make_interval(secs => $3))", user_id, done.media_id, retention - 1.0)
    partitions_before = await partition_days(pool)
    cutoff_day = (datetime.now(UTC) - timedelta(seconds=retention)).date()
    expected_gone = {day: name for day, name in partitions_before.items() if day < cutoff_day}
    # Partitions never analysed (reltuples -1), as small ones stay: their rows are counted.
    events_gone = await pool.fetchval("SELECT count(*) FROM usage_events WHERE received_at < $1", midnight(cutoff_day))
    assert events_gone >= 10

    dry = await run_job(ctx, "prune_telemetry", dry_run=True)
    assert await partition_days(pool) == partitions_before
    report = await run_job(ctx, "prune_telemetry")

    assert report.errors == 0
    assert report.details["estimated_events_dropped"] == dry.details["estimated_events_dropped"] == events_gone
    assert len(expected_gone) >= 10
    assert sorted(report.details["partitions_dropped"]) == sorted(expected_gone.values()) == sorted(dry.details["partitions_dropped"])
    assert report.changed == len(expected_gone)
    assert await partition_days(pool) == {d: n for d, n in partitions_before.items() if d not in expected_gone}
    received = [r["received_at"] for r in await pool.fetch("SELECT received_at FROM usage_events WHERE media_id = $1::uuid", done.media_id)]
    assert min(received).astimezone(UTC).date() == cutoff_day, "the day holding the cutoff stays whole"
    assert len([t for t in received if t.astimezone(UTC).date() < today]) == 30 + 1
    assert len(received) == 30 + 1 + 2
    assert await pool.fetchrow("SELECT * FROM media_counters WHERE media_id = $1::uuid", done.media_id) == counters_before
    assert (await run_job(ctx, "prune_telemetry")).changed == 0


async def test_prune_deletes_the_event_idempotency_keys_past_their_lifetime(ctx, pool, user_id):
    recorder = events.Events(pool)
    batch = [events.Event("impression", str(uuid.uuid4()), "feed", None, {})]
    for key in ("old", "young"):
        await recorder.record(user_id, batch, key)
    await pool.execute(
        "UPDATE usage_event_batches SET recorded_at = now() - $2::interval - interval '1 minute'"
        " WHERE user_id = $1 AND idempotency_key = 'old'", user_id, events.IDEMPOTENCY_KEY_LIFETIME)
    keys = "SELECT array_agg(idempotency_key ORDER BY idempotency_key) FROM usage_event_batches WHERE user_id = $1"

    dry = await run_job(ctx, "prune_telemetry", dry_run=True)
    assert dry.details["idempotency_keys_dropped"] >= 1
    assert await pool.fetchval(keys, user_id) == ["old", "young"]
    report = await run_job(ctx, "prune_telemetry")
    assert report.errors == 0
    assert report.details["idempotency_keys_dropped"] >= 1
    assert await pool.fetchval(keys, user_id) == ["young"]


async def test_prune_deletes_the_idempotency_keys_batch_by_batch_past_those_another_transaction_holds(make_ctx, make_settings, pool, user_id):
    # Batches smaller than the keys due: the run goes on past a full batch.
    ctx = await make_ctx(make_settings(jobs={"prune_telemetry": {"batch_size": 2}}))
    recorder = events.Events(pool)
    batch = [events.Event("impression", str(uuid.uuid4()), "feed", None, {})]
    for key in ("old-0", "old-1", "old-2", "old-3", "old-4", "young"):
        await recorder.record(user_id, batch, key)
    await pool.execute(
        "UPDATE usage_event_batches SET recorded_at = now() - $2::interval - interval '1 minute'"
        " WHERE user_id = $1 AND idempotency_key LIKE 'old-%'", user_id, events.IDEMPOTENCY_KEY_LIFETIME)
    keys = "SELECT array_agg(idempotency_key ORDER BY idempotency_key) FROM usage_event_batches WHERE user_id = $1"

    # As another run deleting keys holds them (one by hand beside the cron's): its key is left to it.
    async with pool.acquire() as other, other.transaction():
        await other.execute("SELECT FROM usage_event_batches WHERE user_id = $1 AND idempotency_key = 'old-0' FOR UPDATE", user_id)
        async with asyncio.timeout(10):
            report = await run_job(ctx, "prune_telemetry")
    assert report.errors == 0
    assert report.details["idempotency_keys_dropped"] >= 4
    assert await pool.fetchval(keys, user_id) == ["old-0", "young"]


async def test_audit_reports_heavy_reservations(ctx, storage, auth, user_id, pool):
    from prometheus_client import REGISTRY

    md = auth(user_id)
    await storage.BeginUpload(pb.BeginUploadRequest(filename="a.mp4", content_type="video/mp4", size_bytes=400 * 1024 * 1024), metadata=md)
    await storage.BeginUpload(pb.BeginUploadRequest(filename="b.mp4", content_type="video/mp4", size_bytes=400 * 1024 * 1024), metadata=md)
    report = await run_job(ctx, "audit_accounts")
    assert report.details["ledger_mismatches"] == 0
    await pool.execute("UPDATE uploads SET created_at = now() - interval '2 hours' WHERE user_id = $1", user_id)
    report = await run_job(ctx, "audit_accounts")
    assert report.details["heavy_reservations"] >= 1
    assert REGISTRY.get_sample_value("mediavault_heavy_reservation_accounts") >= 1
    assert REGISTRY.get_sample_value("mediavault_ledger_mismatches") == 0


async def test_audit_totals_accounts_whose_quotas_add_up_past_bigint(ctx, pool, user_id):
    from prometheus_client import REGISTRY

    # Each a quota AddStorageCredits can reach (2**63 - 1 at most), granted through the ledger.
    near_the_top = 2**63 - 2**50
    for owner in (user_id, user_id + "-b"):
        await pool.execute("INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, $2)", owner, near_the_top)
        await pool.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ($1, 'grant', $2)", owner, near_the_top)
    report = await run_job(ctx, "audit_accounts")
    assert report.errors == 0
    assert report.details["ledger_mismatches"] == 0
    assert REGISTRY.get_sample_value("mediavault_ledger_mismatches") == 0
    quota = int(await pool.fetchval("SELECT sum(quota_bytes) FROM accounts"))
    assert quota > 2**64 - 2**51
    assert REGISTRY.get_sample_value("mediavault_storage_bytes", {"kind": "quota"}) == float(quota)


@pytest.mark.parametrize("name", sorted(JOBS))
async def test_dry_run_changes_nothing(ctx, pool, user_id, name):
    blobs = ctx["blobs"]
    expired = await seed_media(pool, blobs, user_id, 5, retention="ephemeral", expired=True)
    # Present: the stuck-media sweep leaves expired media's runs to the expiry job.
    (stuck,) = await seed_media(pool, blobs, user_id, 1, retention="permanent", expired=False)
    await pool.execute("UPDATE media SET processing_status = 'processing', updated_at = now() - interval '2 hours' WHERE media_id = $1", stuck)
    await soft_delete(pool, [expired[1]], -3600)
    before = await snapshot(pool)
    report = await run_job(ctx, name, dry_run=True)
    assert report.dry_run
    assert report.errors == 0
    if name in ("expire_ephemeral_media", "fail_stuck_processing", "purge_deleted_media"):
        assert report.changed >= 1, "a dry run reports what it would change"
    assert await snapshot(pool) == before
    assert all([await blobs_exist(blobs, m) == (True, True) for m in expired])


async def snapshot(pool) -> list:
    return [
        await pool.fetch("SELECT * FROM media ORDER BY media_id"),
        await pool.fetch("SELECT * FROM uploads ORDER BY upload_id"),
        await pool.fetch("SELECT * FROM accounts ORDER BY user_id"),
        await pool.fetchval("SELECT count(*) FROM ledger_entries"),
        await pool.fetchval("SELECT count(*) FROM usage_events"),
    ]


async def seed_stale_reservations(pool, owner_ids: list[str], per_owner: int) -> None:
    """New accounts each holding per_owner lapsed 1000-byte reservations, consistent with the ledger."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (user_id, quota_bytes, reserved_bytes) SELECT o, 1000000, $2 FROM unnest($1::text[]) AS o",
            owner_ids, 1000 * per_owner)
        await conn.execute(
            "INSERT INTO ledger_entries (user_id, kind, quota_delta) SELECT o, 'grant', 1000000 FROM unnest($1::text[]) AS o",
            owner_ids)
        await conn.execute(
            "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, object_key, expires_at) "
            "SELECT gen_random_uuid(), o, 'x', 'image/jpeg', 1000, 'permanent', 'originals/zz/' || md5(random()::text), "
            "now() - make_interval(secs => random() * 60 + 1) FROM unnest($1::text[]) AS o, generate_series(1, $2)",
            owner_ids, per_owner)
        await conn.execute(
            "INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id) "
            "SELECT user_id, 'reserve', size_bytes, upload_id FROM uploads WHERE user_id = ANY($1::text[])", owner_ids)


async def test_two_runners_split_the_work_and_do_nothing_twice(make_ctx, pool, user_id):
    first, second = await make_ctx(), await make_ctx()
    owner_ids = [f"{user_id}-{i}" for i in range(20)]
    await seed_stale_reservations(pool, owner_ids, 100)
    reports = await asyncio.gather(run_job(first, "reclaim_stale_uploads"), run_job(second, "reclaim_stale_uploads"))
    assert sum(r.changed for r in reports) >= 2000
    assert all(r.changed > 0 for r in reports), "both runners took a share"
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = ANY($1::text[]) AND state = 'pending'", owner_ids) == 0
    releases = await pool.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'release' AND user_id = ANY($1::text[])", owner_ids)
    assert releases == 2000, "every reservation released exactly once"
    assert await pool.fetchval("SELECT sum(reserved_bytes) FROM accounts WHERE user_id = ANY($1::text[])", owner_ids) == 0
    assert await ledger.audit(pool) == []


async def test_runners_with_many_lanes_over_shared_accounts_never_deadlock(make_ctx, make_settings, pool, user_id):
    # Small batches spread over many accounts: every batch locks dozens of accounts that
    # other batches (other lanes, the other runner) also hold rows of.
    settings = make_settings(jobs={"reclaim_stale_uploads": {"batch_size": 40, "concurrency": 3},
                                   "expire_ephemeral_media": {"batch_size": 40, "concurrency": 3}})
    first, second = await make_ctx(settings), await make_ctx(settings)
    owner_ids = [f"{user_id}-{i}" for i in range(150)]
    await seed_stale_reservations(pool, owner_ids, 8)
    reports = await asyncio.gather(run_job(first, "reclaim_stale_uploads"), run_job(second, "reclaim_stale_uploads"))
    assert [r.errors for r in reports] == [0, 0]
    assert sum(r.changed for r in reports) >= 1200
    releases = await pool.fetch(
        "SELECT upload_id, count(*) AS n FROM ledger_entries WHERE kind = 'release' AND user_id = ANY($1::text[]) "
        "GROUP BY upload_id", owner_ids)
    assert len(releases) == 1200
    assert {r["n"] for r in releases} == {1}
    assert await pool.fetchval("SELECT sum(reserved_bytes) FROM accounts WHERE user_id = ANY($1::text[])", owner_ids) == 0

    media_ids = []
    for owner in owner_ids[:30]:
        media_ids += await seed_media(pool, first["blobs"], owner, 8, retention="ephemeral", expired=True)
    reports = await asyncio.gather(run_job(first, "expire_ephemeral_media"), run_job(second, "expire_ephemeral_media"))
    assert [r.errors for r in reports] == [0, 0]
    assert sum(r.changed for r in reports) >= 240
    assert await pool.fetchval(
        "SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NOT NULL", media_ids) == 240
    assert [await blobs_exist(first["blobs"], m) for m in media_ids] == [(False, False)] * 240
    assert await ledger.audit(pool) == []


def test_a_lane_is_one_share_of_the_accounts():
    assert cleanup.Lane(0, 1) == cleanup.ALL
    with pytest.raises(ValueError, match="lane 2 of 2"):
        cleanup.Lane(2, 2)


async def test_saved_canaries_survive_every_job_run_by_two_workers(make_ctx, pool, user_id):
    first, second = await make_ctx(), await make_ctx()
    blobs = first["blobs"]
    canaries = await seed_media(pool, blobs, f"{user_id}-canary", 20, retention="permanent", expired=True, saved=True)
    candidates = await seed_media(pool, blobs, user_id, 2000, retention="ephemeral", expired=True)
    random.shuffle(candidates)
    await soft_delete(pool, candidates[:400], 0)
    for name in JOBS:
        reports = await asyncio.gather(run_job(first, name), run_job(second, name))
        assert all(r.errors == 0 for r in reports), name
        assert await ledger.audit(pool) == [], f"books add up after {name}"
    for media_id in canaries:
        row = await pool.fetchrow("SELECT deleted_at, purged_at, processing_status FROM media WHERE media_id = $1", media_id)
        assert row["deleted_at"] is None
        assert row["purged_at"] is None
        assert row["processing_status"] == "complete"
        assert await blobs_exist(blobs, media_id) == (True, True)
    assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", candidates) == 0
    assert await ledger.audit(pool) == []


async def test_jobs_cli_dry_run_prints_a_report(database_url, redis_url, server):
    import json

    from tests.test_cli import mediavault

    result = await asyncio.to_thread(
        mediavault, "jobs", "run", "reclaim_stale_uploads", "--dry-run", database_url=database_url,
        MEDIAVAULT_REDIS_URL=redis_url, MEDIAVAULT_BLOB_DIR=str(server.settings.blob_dir),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["job"] == "reclaim_stale_uploads"
    assert report["dry_run"] is True
    listed = await asyncio.to_thread(mediavault, "jobs", "list")
    assert listed.returncode == 0
    assert len(listed.stdout.splitlines()) == len(JOBS)


async def test_a_failing_item_never_stops_the_run(ctx, pool, user_id):
    ids = await seed_media(pool, ctx["blobs"], user_id, 3, retention="ephemeral", expired=True)
    # An object key the blob store refuses (not one mediavault would write) makes its delete fail.
    await pool.execute("UPDATE media SET object_key = 'originals/../escape' WHERE media_id = $1", ids[0])
    report = await run_job(ctx, "expire_ephemeral_media")
    assert report.errors == 1, "the run's own purge of earlier failures does not take it again"
    assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", ids[0]) is None, "retried next run"
    for media_id in ids[1:]:
        assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", media_id) is not None

    await pool.execute("UPDATE media SET object_key = $2 WHERE media_id = $1", ids[0], f"originals/{ids[0].hex[:2]}/{ids[0].hex}")
    await retry_time_passed(pool, ids[:1])
    retried = await run_job(ctx, "purge_deleted_media")
    assert retried.errors == 0
    assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", ids[0]) is not None
    assert await blobs_exist(ctx["blobs"], ids[0]) == (False, False)


async def test_the_expiry_job_retries_its_own_purges_and_leaves_deleted_media_to_the_purge_job(ctx, media, auth, pool, user_id):
    blobs = ctx["blobs"]
    expired = await seed_media(pool, blobs, user_id, 1, retention="ephemeral", expired=True)
    # An expiry whose blob deletions failed, its retry time since passed.
    await pool.execute("UPDATE media SET object_key = 'originals/../escape' WHERE media_id = $1", expired[0])
    assert (await run_job(ctx, "expire_ephemeral_media")).errors == 1
    await pool.execute("UPDATE media SET object_key = $2 WHERE media_id = $1", expired[0], f"originals/{expired[0].hex[:2]}/{expired[0].hex}")
    await retry_time_passed(pool, expired)
    # Media the owner deleted, ephemeral and permanent, past the grace period: purge_deleted_media's
    # to purge, on its own schedule, and not at all while it is disabled.
    deleted = [*await seed_media(pool, blobs, user_id, 1, retention="ephemeral", expired=False),
               *await seed_media(pool, blobs, user_id, 1, retention="permanent", expired=False)]
    for media_id in deleted:
        await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=str(media_id)), metadata=auth(user_id))
    await pool.execute("UPDATE media SET purge_after = now() - interval '1 second' WHERE media_id = ANY($1::uuid[])", deleted)

    report = await run_job(ctx, "expire_ephemeral_media")
    assert report.errors == 0
    assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", expired[0]) is not None
    assert await blobs_exist(blobs, expired[0]) == (False, False)
    for media_id in deleted:
        assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", media_id) is None
        assert await blobs_exist(blobs, media_id) == (True, True)

    assert (await run_job(ctx, "purge_deleted_media")).errors == 0
    for media_id in deleted:
        assert await pool.fetchval("SELECT purged_at FROM media WHERE media_id = $1", media_id) is not None
        assert await blobs_exist(blobs, media_id) == (False, False)
    assert await ledger.audit(pool) == []


async def test_blob_delete_failure_is_retried_next_run_and_loses_nothing(make_ctx, make_settings, pool, user_id):
    from mediavault.blobs.s3 import S3BlobStore
    from tests.s3server import moto_server

    async with moto_server() as moto:
        settings = make_settings(blob_backend="s3", s3_endpoint_url=moto.endpoint_url, s3_bucket="cleanup-test")
        ctx = await make_ctx(settings)
        assert isinstance(ctx["blobs"], S3BlobStore)
        await ctx["blobs"].ensure_bucket()
        doomed = await seed_media(pool, ctx["blobs"], user_id, 5, retention="ephemeral", expired=True)
        kept = await seed_media(pool, ctx["blobs"], f"{user_id}-kept", 3, retention="permanent", expired=False)

        await moto.stop()
        failed = await run_job(ctx, "expire_ephemeral_media")
        assert failed.errors >= 5
        rows = await pool.fetch("SELECT deleted_at, purged_at FROM media WHERE media_id = ANY($1::uuid[])", doomed)
        assert all(r["deleted_at"] is not None and r["purged_at"] is None for r in rows), "blobs not gone, so not purged"
        assert await ledger.audit(pool) == []

        await moto.start()
        await ctx["blobs"].ensure_bucket()
        await retry_time_passed(pool, doomed)
        retried = await run_job(ctx, "purge_deleted_media")
        assert retried.errors == 0
        assert retried.details["purged"] >= 5
        assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", doomed) == 0
        assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND deleted_at IS NULL", kept) == 3


def blob_delete_failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("mediavault_blob_delete_failures_total")


async def test_the_blob_deletions_the_jobs_fail_are_counted_in_the_metric(database_of_its_own, make_ctx, make_settings, user_id):
    from tests.s3server import moto_server

    async with moto_server() as moto:
        # A database of its own: the counts are this test's rows' alone.
        ctx = await make_ctx(make_settings(
            database_url=database_of_its_own, blob_backend="s3", s3_endpoint_url=moto.endpoint_url, s3_bucket="delete-failures"))
        pool, blobs = ctx["pool"], ctx["blobs"]
        await blobs.ensure_bucket()
        await seed_media(pool, blobs, user_id, 2, retention="ephemeral", expired=True)
        lapsed = uuid.uuid4()
        # A lapsed tus upload: its object's delete and its partial bytes' discard both fail.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, object_key, expires_at, protocol) "
                "VALUES ($1, $2, 'x.jpg', 'image/jpeg', 100, 'permanent', $3, now() - interval '1 second', 'tus')",
                lapsed, user_id, f"originals/{lapsed.hex[:2]}/{lapsed.hex}")
            await conn.execute("UPDATE accounts SET reserved_bytes = reserved_bytes + 100 WHERE user_id = $1", user_id)
            await conn.execute(
                "INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id) VALUES ($1, 'reserve', 100, $2)", user_id, lapsed)

        await moto.stop()
        before = blob_delete_failures()
        reclaimed = await run_job(ctx, "reclaim_stale_uploads")
        assert (reclaimed.changed, reclaimed.errors) == (1, 2)
        assert blob_delete_failures() - before == 2, "the object and the partial bytes"
        expired = await run_job(ctx, "expire_ephemeral_media")
        assert (expired.changed, expired.errors) == (2, 4)
        assert blob_delete_failures() - before == 2 + 4, "each media's original and thumbnail"
        assert await ledger.audit(pool) == []


async def test_a_purge_whose_deletes_fail_is_tried_once_a_run_and_again_after_its_retry_time(make_ctx, make_settings, pool, user_id):
    # Batches smaller than the failing rows: a run that took them again would keep finding full batches.
    ctx = await make_ctx(make_settings(jobs={"purge_deleted_media": {"batch_size": 4}}))
    ids = await seed_media(pool, ctx["blobs"], user_id, 10, retention="permanent", expired=False)
    await soft_delete(pool, ids, -1)
    # Keys the blob store refuses (not ones mediavault would write): every delete of an original fails.
    await pool.execute("UPDATE media SET object_key = 'originals/../' || media_id WHERE media_id = ANY($1::uuid[])", ids)

    failed = await run_job(ctx, "purge_deleted_media")
    assert failed.errors == len(ids), "each row tried once"
    assert failed.details["purge_retry_next_run"] == len(ids)
    rows = await pool.fetch("SELECT purged_at, purge_claimed_until > now() AS held FROM media WHERE media_id = ANY($1::uuid[])", ids)
    assert [(r["purged_at"], r["held"]) for r in rows] == [(None, True)] * len(ids)

    await pool.executemany("UPDATE media SET object_key = $2 WHERE media_id = $1", [(m, f"originals/{m.hex[:2]}/{m.hex}") for m in ids])
    early = await run_job(ctx, "purge_deleted_media")
    assert early.errors == 0
    assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", ids) == len(ids), \
        "not before the retry time"
    held = await run_job(ctx, "purge_deleted_media", dry_run=True)
    await retry_time_passed(pool, ids)
    due = await run_job(ctx, "purge_deleted_media", dry_run=True)
    assert due.changed - held.changed == len(ids), "a dry run counts only what a real run would take"

    retried = await run_job(ctx, "purge_deleted_media")
    assert retried.errors == 0
    assert await pool.fetchval("SELECT count(*) FROM media WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL", ids) == 0
    assert [await blobs_exist(ctx["blobs"], m) for m in ids] == [(False, False)] * len(ids)


async def test_orphans_are_quarantined_then_deleted_and_missing_originals_reported(ctx, pool, user_id, server):
    import os
    import time as clock

    blobs = ctx["blobs"]
    owned = await seed_media(pool, blobs, user_id, 2, retention="permanent", expired=False)
    orphan, fresh_orphan = f"originals/ff/{uuid.uuid4().hex}", f"originals/ff/{uuid.uuid4().hex}"
    for key in (orphan, fresh_orphan):
        await blobs.write(key, single_chunk(b"lost"), content_type="image/jpeg")
    two_days_ago = clock.time() - 2 * 86400
    for key in (orphan, *(f"originals/{m.hex[:2]}/{m.hex}" for m in owned)):
        os.utime(blobs.path(key), (two_days_ago, two_days_ago))
    missing = (await seed_media(pool, blobs, user_id, 1, retention="permanent", expired=False))[0]
    await blobs.delete(f"originals/{missing.hex[:2]}/{missing.hex}")

    first = await run_job(ctx, "sweep_orphan_blobs")
    assert first.details["quarantined"] >= 1
    assert first.details["originals_missing"] >= 1
    assert await blobs.stat(orphan) is None
    assert await blobs.stat("quarantine/" + orphan) is not None
    assert await blobs.stat(fresh_orphan) is not None, "younger than the grace period: maybe an upload in flight"
    assert all([await blobs_exist(blobs, m) == (True, True) for m in owned])
    row = await pool.fetchrow("SELECT processing_status, processing_error FROM media WHERE media_id = $1", missing)
    assert (row["processing_status"], row["processing_error"]) == ("failed", "original missing")

    # A grace period in quarantine later.
    os.utime(blobs.path("quarantine/" + orphan), (two_days_ago, two_days_ago))
    second = await run_job(ctx, "sweep_orphan_blobs")
    assert second.details["deleted_from_quarantine"] >= 1
    assert await blobs.stat("quarantine/" + orphan) is None
    assert all([await blobs_exist(blobs, m) == (True, True) for m in owned])


@pytest.fixture
async def database_of_its_own(postgres_admin_url):
    """A migrated database no other test writes to: a sweep over a blob store of the test's own
    would find every other test's originals missing and mark their media FAILED."""
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_sweep")
    try:
        await migrate(dsn)
        yield dsn
    finally:
        await devservers.drop_database(postgres_admin_url, dsn)


@pytest.mark.parametrize("backend", ["fs", "s3"])
async def test_a_sweep_right_after_another_deletes_nothing_it_quarantined(
    backend, database_of_its_own, make_ctx, make_settings, tmp_path, user_id
):
    from tests.s3server import moto_server

    # S3 LastModified has whole seconds: a grace period of a few seconds keeps the test short and
    # still tells an object quarantined a moment ago from one quarantined a grace period ago (the
    # sweep counts half of it, at most, as slack).
    grace = 6
    async with contextlib.AsyncExitStack() as stack:
        if backend == "s3":
            moto = await stack.enter_async_context(moto_server())
            store = {"blob_backend": "s3", "s3_endpoint_url": moto.endpoint_url, "s3_bucket": "sweep-test"}
        else:
            store = {"blob_dir": tmp_path / "blobs"}
        settings = make_settings(database_url=database_of_its_own, jobs={"sweep_orphan_blobs": {"age_seconds": grace}}, **store)
        cron, by_hand = await make_ctx(settings), await make_ctx(settings)
        blobs = cron["blobs"]
        if backend == "s3":
            await blobs.ensure_bucket()
        orphan, claimed = f"originals/fd/{uuid.uuid4().hex}", f"originals/fd/{uuid.uuid4().hex}"
        for key in (orphan, claimed):
            await blobs.write(key, single_chunk(b"lost"), content_type="image/jpeg")
        await asyncio.sleep(grace + 0.5)

        first = await run_job(cron, "sweep_orphan_blobs")
        assert (first.errors, first.details["quarantined"]) == (0, 2)
        # A slow upload's row commits after its object was quarantined.
        async with cron["pool"].acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, 1000000)", user_id)
            await conn.execute(
                "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, object_key, expires_at) "
                "VALUES (gen_random_uuid(), $1, 'x.jpg', 'image/jpeg', 4, 'permanent', $2, now() + interval '1 hour')",
                user_id, claimed)
        second = await run_job(by_hand, "sweep_orphan_blobs")
        assert second.errors == 0
        assert second.details["deleted_from_quarantine"] == 0
        assert await blobs.stat("quarantine/" + orphan) is not None, "quarantined a moment ago"
        assert await blobs.stat(claimed) is not None, "put back at once, however young"

        await asyncio.sleep(grace + 0.5)
        third = await run_job(by_hand, "sweep_orphan_blobs")
        assert (third.errors, third.details["deleted_from_quarantine"]) == (0, 1)
        assert await blobs.stat("quarantine/" + orphan) is None
        assert await blobs.stat(orphan) is None
        assert await blobs.stat(claimed) is not None


async def test_the_daily_sweep_deletes_what_the_previous_days_run_quarantined(database_of_its_own, make_ctx, make_settings, tmp_path):
    # The default schedule: daily, with a day's grace. Yesterday's run moved this a little later
    # into its work than today's run has got into its own.
    ctx = await make_ctx(make_settings(database_url=database_of_its_own, blob_dir=tmp_path / "blobs", jobs={"sweep_orphan_blobs": {}}))
    blobs = ctx["blobs"]
    key = f"quarantine/originals/fd/{uuid.uuid4().hex}"
    await blobs.write(key, single_chunk(b"lost"), content_type="image/jpeg")
    moved = time.time() - (24 * 3600 - 60)
    os.utime(blobs.path(key), (moved, moved))
    report = await run_job(ctx, "sweep_orphan_blobs")
    assert (report.errors, report.details["deleted_from_quarantine"]) == (0, 1)
    assert await blobs.stat(key) is None


async def test_the_sweep_reports_no_original_missing_of_media_expired_and_purged_meanwhile(
    database_of_its_own, make_ctx, make_settings, tmp_path, user_id, monkeypatch
):
    ctx = await make_ctx(make_settings(database_url=database_of_its_own, blob_dir=tmp_path / "blobs"))
    pool, blobs = ctx["pool"], ctx["blobs"]
    # Past its expires_at, not yet removed by the expiry job: gone for clients, its blobs about to be.
    expired = (await seed_media(pool, blobs, user_id, 1, retention="ephemeral", expired=True))[0]
    expiring = (await seed_media(pool, blobs, user_id, 1, retention="ephemeral", expired=False))[0]
    missing = (await seed_media(pool, blobs, user_id, 1, retention="permanent", expired=False))[0]
    await blobs.delete(f"originals/{missing.hex[:2]}/{missing.hex}")
    real_live_originals = cleanup.live_originals

    async def listed_then_expired(conn, after, limit):
        rows = await real_live_originals(conn, after, limit)
        # The expiry job runs (every 5 minutes, and at 03:00 with the sweep) between the sweep's
        # listing and its stat of the originals: it deletes the items that expired and their blobs.
        await pool.execute("UPDATE media SET expires_at = now() WHERE media_id = $1", expiring)
        await blobs.delete(f"originals/{expired.hex[:2]}/{expired.hex}")
        assert (await run_job(ctx, "expire_ephemeral_media")).errors == 0
        return rows

    monkeypatch.setattr(cleanup, "live_originals", listed_then_expired)
    report = await run_job(ctx, "sweep_orphan_blobs")
    assert report.errors == 0
    assert report.details["originals_missing"] == 1, "the permanent media's alone"
    statuses = dict(await pool.fetch("SELECT media_id, processing_status FROM media WHERE media_id = ANY($1::uuid[])",
                                     [expired, expiring, missing]))
    assert statuses == {expired: "complete", expiring: "complete", missing: "failed"}
    assert await ledger.audit(pool) == []


async def test_an_original_the_store_cannot_stat_leaves_the_sweep_to_check_the_others(ctx, pool, user_id):
    blobs = ctx["blobs"]
    unreadable, missing = sorted(await seed_media(pool, blobs, user_id, 2, retention="permanent", expired=False))
    original = f"originals/{unreadable.hex[:2]}/{unreadable.hex}"
    # A key under an existing object: the file system answers ENOTDIR, which the fs store
    # raises as BlobStoreError, as the S3 store does a 403 or a 5xx.
    await pool.execute("UPDATE media SET object_key = $2 WHERE media_id = $1", unreadable, f"{original}/unreadable")
    await blobs.delete(f"originals/{missing.hex[:2]}/{missing.hex}")
    try:
        report = await run_job(ctx, "sweep_orphan_blobs")
    finally:
        await pool.execute("UPDATE media SET object_key = $2 WHERE media_id = $1", unreadable, original)

    assert report.errors == 1
    assert report.details["originals_missing"] >= 1
    rows = await pool.fetch("SELECT media_id, processing_status, processing_error FROM media WHERE media_id = ANY($1::uuid[])",
                            [unreadable, missing])
    assert {r["media_id"]: (r["processing_status"], r["processing_error"]) for r in rows} == {
        unreadable: ("complete", None),
        missing: ("failed", "original missing"),
    }


class SlowStats:
    """A blob store whose stat answers after `seconds`, as an object store's HEAD does across a network."""

    def __init__(self, store, seconds: float) -> None:
        self._store = store
        self._seconds = seconds

    async def stat(self, key: str):
        await asyncio.sleep(self._seconds)
        return await self._store.stat(key)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class RefusingKeys:
    """A blob store that refuses to move or delete the given keys, as a store answering 403 for them does."""

    def __init__(self, store, refused: set[str]) -> None:
        self._store = store
        self._refused = refused

    async def move(self, key: str, new_key: str) -> None:
        if key in self._refused:
            raise BlobStoreError("move failed: AccessDenied")
        await self._store.move(key, new_key)

    async def delete_many(self, keys: list[str]) -> list[str]:
        return [key for key in keys if key in self._refused] + await self._store.delete_many(
            [key for key in keys if key not in self._refused])

    async def abort_multipart_upload(self, key: str, multipart_id: str) -> None:
        if key in self._refused:
            raise BlobStoreError("abort multipart failed: SlowDown")
        await self._store.abort_multipart_upload(key, multipart_id)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


async def test_the_sweep_counts_as_changed_only_the_moves_and_deletes_that_succeeded(
    database_of_its_own, make_ctx, make_settings, tmp_path, user_id
):
    import os
    import time as clock

    from prometheus_client import REGISTRY

    # A database and a blob directory of its own: the counts are this test's objects' alone.
    ctx = await make_ctx(make_settings(database_url=database_of_its_own, blob_dir=tmp_path / "blobs"))
    blobs = ctx["blobs"]
    orphans = {outcome: f"originals/fc/{uuid.uuid4().hex}" for outcome in ("moved", "refused")}
    quarantined = {outcome: f"quarantine/originals/fc/{uuid.uuid4().hex}" for outcome in ("deleted", "refused")}
    claimed = {outcome: f"originals/fc/{uuid.uuid4().hex}" for outcome in ("restored", "refused")}
    two_days_ago = clock.time() - 2 * 86400
    for key in (*orphans.values(), *quarantined.values(), *(cleanup.QUARANTINE + key for key in claimed.values())):
        await blobs.write(key, single_chunk(b"lost"), content_type="image/jpeg")
        os.utime(blobs.path(key), (two_days_ago, two_days_ago))
    async with ctx["pool"].acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, 1000000)", user_id)
        await conn.executemany(
            "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, object_key, expires_at) "
            "VALUES (gen_random_uuid(), $1, 'x.jpg', 'image/jpeg', 4, 'permanent', $2, now() + interval '1 hour')",
            [(user_id, key) for key in claimed.values()])
    refused = {orphans["refused"], quarantined["refused"], cleanup.QUARANTINE + claimed["refused"]}

    def items(kind: str) -> float:
        return REGISTRY.get_sample_value("mediavault_job_items_total", {"job": "sweep_orphan_blobs", "kind": kind}) or 0.0

    changed, errors = items("changed"), items("errors")
    report = await run_job({**ctx, "blobs": RefusingKeys(blobs, refused)}, "sweep_orphan_blobs")

    assert report.details == {
        "quarantined": 1, "deleted_from_quarantine": 1, "restored": 1, "multipart_uploads_aborted": 0, "originals_missing": 0
    }
    assert (report.changed, report.errors) == (2, 3)
    assert (items("changed") - changed, items("errors") - errors) == (2, 3)
    assert await blobs.stat(cleanup.QUARANTINE + orphans["moved"]) is not None
    assert await blobs.stat(orphans["refused"]) is not None
    assert await blobs.stat(quarantined["deleted"]) is None
    assert await blobs.stat(quarantined["refused"]) is not None
    assert await blobs.stat(claimed["restored"]) is not None
    assert await blobs.stat(cleanup.QUARANTINE + claimed["refused"]) is not None


MiB = 1024 * 1024


@pytest.fixture
async def s3_of_its_own(database_of_its_own, make_settings):
    """Settings of an S3 backend on a moto server of the test's own, its bucket made, over a database of
    its own: a sweep then judges the test's multipart uploads and rows alone."""
    from mediavault.blobs.s3 import S3BlobStore
    from tests.s3server import moto_server

    async with moto_server() as moto:

        def make(**overrides):
            return make_settings(database_url=database_of_its_own, blob_backend="s3", s3_endpoint_url=moto.endpoint_url,
                                 s3_bucket="multipart-sweep", tus_chunk_size_bytes=5 * MiB, **overrides)

        store = await S3BlobStore.open(make())
        await store.ensure_bucket()
        await store.close()
        yield make


def multipart_uploads(settings) -> set[tuple[str, str]]:
    """(key, upload id) of every multipart upload S3 holds in the bucket, neither completed nor aborted."""
    import boto3

    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)
    return {(u["Key"], u["UploadId"]) for u in client.list_multipart_uploads(Bucket=settings.s3_bucket).get("Uploads", [])}


class BegunAt:
    """A blob store listing the given multipart uploads (by id) as begun at the given times, as S3 would:
    moto lists every one as begun on 2010-11-10, however new."""

    def __init__(self, store, begun: dict[str, datetime]) -> None:
        self._store = store
        self._begun = begun

    async def list_multipart_uploads(self, prefix: str, *, after, limit: int):
        listed = await self._store.list_multipart_uploads(prefix, after=after, limit=limit)
        return [dataclasses.replace(u, started_at=self._begun.get(u.multipart_id, u.started_at)) for u in listed]

    def __getattr__(self, name: str):
        return getattr(self._store, name)


async def test_a_multipart_upload_whose_abort_failed_at_fail_upload_is_aborted_by_the_sweep(
    s3_of_its_own, make_ctx, auth, user_id, monkeypatch
):
    from mediavault.blobs.s3 import S3BlobStore
    from mediavault.storage.v1 import storage_pb2_grpc
    from tests.conftest import running

    settings = s3_of_its_own(jobs={"sweep_orphan_blobs": {"age_seconds": 0}})
    md = auth(user_id)
    data = fake_jpeg(5 * MiB + 10)
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        upload_id = (await begin(storage, md, data, protocol=pb.UPLOAD_PROTOCOL_S3_MULTIPART)).upload.upload_id
        request = pb.PresignUploadPartsRequest(upload_id=upload_id, parts=[pb.UploadPartRequest(part_number=1)])
        [part] = (await storage.PresignUploadParts(request, metadata=md)).parts
        assert await put(part.url, dict(part.headers), data[: 5 * MiB]) == 200
        real_discard = S3BlobStore.discard_partial

        async def slow_down_once(self, *args):
            monkeypatch.setattr(S3BlobStore, "discard_partial", real_discard)
            raise BlobStoreError("abort multipart failed: SlowDown")

        monkeypatch.setattr(S3BlobStore, "discard_partial", slow_down_once)
        failed = await storage.FailUpload(pb.FailUploadRequest(upload_id=upload_id, reason="gave up"), metadata=md)
    assert failed.upload.state == pb.UPLOAD_STATE_FAILED
    assert len(multipart_uploads(settings)) == 1, "its one abort failed"

    ctx = await make_ctx(settings)
    assert (await run_job(ctx, "reclaim_stale_uploads")).changed == 0, "FAILED already: the expiry never sees it"
    report = await run_job(ctx, "sweep_orphan_blobs")
    assert multipart_uploads(settings) == set()
    assert (report.changed, report.errors, report.details["multipart_uploads_aborted"]) == (1, 0, 1)


async def test_the_sweep_keeps_a_pending_uploads_multipart_upload_and_one_begun_within_the_grace_period(
    s3_of_its_own, make_ctx, auth, user_id
):
    from mediavault.storage.v1 import storage_pb2_grpc
    from tests.conftest import running

    settings = s3_of_its_own(jobs={"sweep_orphan_blobs": {"age_seconds": 3600}})
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        await begin(storage, auth(user_id), fake_jpeg(5 * MiB + 10), protocol=pb.UPLOAD_PROTOCOL_S3_MULTIPART)
    [(key, recorded)] = multipart_uploads(settings)
    ctx = await make_ctx(settings)
    blobs = ctx["blobs"]
    # One more of the pending upload's key, never recorded (a start that lost to another), and a
    # variant's whose write failed and whose abort failed too: both begun long ago.
    unrecorded = await blobs.start_partial(key, content_type="image/jpeg")
    variant_key = f"variants/fb/{uuid.uuid4().hex}/v0/display.jpg"
    failed_write = await blobs.start_partial(variant_key, content_type="image/jpeg")
    # Begun a moment ago by a start whose commit, recording it, is still to come.
    starting_key = f"originals/fb/{uuid.uuid4().hex}"
    starting = await blobs.start_partial(starting_key, content_type="image/jpeg")
    long_ago = datetime.now(UTC) - timedelta(days=2)
    ctx["blobs"] = BegunAt(blobs, {recorded: long_ago, unrecorded: long_ago, failed_write: long_ago, starting: datetime.now(UTC)})

    report = await run_job(ctx, "sweep_orphan_blobs")
    assert multipart_uploads(settings) == {(key, recorded), (starting_key, starting)}
    assert (report.changed, report.errors, report.details["multipart_uploads_aborted"]) == (2, 0, 2)


async def test_a_dry_run_aborts_no_multipart_upload_and_a_failed_abort_is_an_error_tried_again_next_run(
    s3_of_its_own, make_ctx
):
    from prometheus_client import REGISTRY

    def items(kind: str) -> float:
        return REGISTRY.get_sample_value("mediavault_job_items_total", {"job": "sweep_orphan_blobs", "kind": kind}) or 0.0

    settings = s3_of_its_own(jobs={"sweep_orphan_blobs": {"age_seconds": 0}})
    ctx = await make_ctx(settings)
    blobs = ctx["blobs"]
    key = f"variants/fa/{uuid.uuid4().hex}/v0/display.jpg"
    stray = await blobs.start_partial(key, content_type="image/jpeg")

    dry = await run_job(ctx, "sweep_orphan_blobs", dry_run=True)
    assert (dry.changed, dry.errors, dry.details["multipart_uploads_aborted"]) == (1, 0, 1), "what a real run would abort"
    assert multipart_uploads(settings) == {(key, stray)}

    failures, changed, errors = blob_delete_failures(), items("changed"), items("errors")
    refused = await run_job({**ctx, "blobs": RefusingKeys(blobs, {key})}, "sweep_orphan_blobs")
    assert (refused.changed, refused.errors, refused.details["multipart_uploads_aborted"]) == (0, 1, 0)
    assert (blob_delete_failures() - failures, items("changed") - changed, items("errors") - errors) == (1, 0, 1)
    assert multipart_uploads(settings) == {(key, stray)}

    again = await run_job(ctx, "sweep_orphan_blobs")
    assert (again.changed, again.errors, again.details["multipart_uploads_aborted"]) == (1, 0, 1)
    assert multipart_uploads(settings) == set()


async def test_the_sweep_stats_live_originals_side_by_side(ctx, pool, user_id):
    blobs = ctx["blobs"]
    seeded = await seed_media(pool, blobs, user_id, 40, retention="permanent", expired=False)
    await blobs.delete(f"originals/{seeded[0].hex[:2]}/{seeded[0].hex}")
    live = await pool.fetchval("SELECT count(*) FROM media WHERE deleted_at IS NULL AND purged_at IS NULL")
    stat_seconds = 0.1
    ctx["blobs"] = SlowStats(blobs, stat_seconds)
    try:
        started = asyncio.get_running_loop().time()
        report = await run_job(ctx, "sweep_orphan_blobs")
        took = asyncio.get_running_loop().time() - started
    finally:
        ctx["blobs"] = blobs
    assert report.errors == 0
    assert await pool.fetchval("SELECT processing_error FROM media WHERE media_id = $1", seeded[0]) == "original missing"
    one_by_one = live * stat_seconds
    assert took < one_by_one / 4, (took, one_by_one)


async def test_the_queue_depth_is_exported_for_the_photo_video_and_cron_queues(make_ctx, make_settings, user_id):
    from prometheus_client import REGISTRY

    from workers.maintenance import observe_queue

    ctx = await make_ctx(make_settings(queue_name=f"depth:{user_id}"))
    settings, redis = ctx["settings"], ctx["redis"]
    for n in range(2):
        await redis.enqueue_job("transcode_media", f"photo-{n}", 0, _queue_name=settings.queue_name)
    for n in range(3):
        await redis.enqueue_job("transcode_video", f"video-{n}", 0, _queue_name=settings.video_queue)
    await redis.enqueue_job("cron:audit_accounts", _queue_name=settings.cron_queue)
    assert await observe_queue(ctx) == 6
    depth = {queue: REGISTRY.get_sample_value("mediavault_queue_depth", {"queue": queue}) for queue in ("photo", "video", "cron")}
    assert depth == {"photo": 2, "video": 3, "cron": 1}


@contextlib.asynccontextmanager
async def its_one_slot_held(settings: Settings) -> AsyncIterator[None]:
    """An arq worker with one job slot on the settings' queue, whose first job ("hold") holds that
    slot until the block ends: from then on, the next job due waits."""
    from arq import Worker, func

    started, release = asyncio.Event(), asyncio.Event()

    async def hold(_ctx) -> None:
        started.set()
        await release.wait()

    worker = Worker(
        functions=[func(hold, name="hold")], redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=settings.queue_name, max_jobs=1, poll_delay=0.05, handle_signals=False,
    )
    run = asyncio.create_task(worker.async_run())
    try:
        async with asyncio.timeout(20):
            await started.wait()
        yield
    finally:
        release.set()
        await worker.close()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def test_the_queue_depth_counts_the_jobs_waiting_to_run_not_running_or_deferred_ones(make_ctx, make_settings, user_id):
    from prometheus_client import REGISTRY

    from workers.maintenance import observe_queue

    ctx = await make_ctx(make_settings(queue_name=f"depth-waiting:{user_id}"))
    settings, redis = ctx["settings"], ctx["redis"]
    await redis.enqueue_job("hold", _queue_name=settings.queue_name)
    await redis.enqueue_job("hold", _queue_name=settings.queue_name, _defer_by=3600)
    async with its_one_slot_held(settings):
        await redis.enqueue_job("hold", _queue_name=settings.queue_name)
        await redis.enqueue_job("transcode_video", "video-0", 0, _queue_name=settings.video_queue)
        await redis.enqueue_job("transcode_video", "video-1", 0, _queue_name=settings.video_queue, _defer_by=3600)
        assert await observe_queue(ctx) == 2
        depth = {queue: REGISTRY.get_sample_value("mediavault_queue_depth", {"queue": queue}) for queue in ("photo", "video")}
        assert depth == {"photo": 1, "video": 1}


async def test_the_oldest_waiting_job_is_timed_from_when_it_was_due_passing_over_running_and_deferred_ones(
    make_ctx, make_settings, user_id
):
    from prometheus_client import REGISTRY

    from workers.maintenance import observe_queue

    ctx = await make_ctx(make_settings(queue_name=f"oldest-waiting:{user_id}"))
    settings, redis = ctx["settings"], ctx["redis"]
    now = datetime.now(UTC)
    # Due half an hour ago and running: first in the queue, yet waiting for nothing.
    await redis.enqueue_job("hold", _queue_name=settings.queue_name, _defer_until=now - timedelta(minutes=30))
    await redis.enqueue_job("hold", _queue_name=settings.queue_name, _defer_by=3600)
    async with its_one_slot_held(settings):
        await redis.enqueue_job("hold", _queue_name=settings.queue_name, _defer_until=now - timedelta(minutes=20))
        await redis.enqueue_job("hold", _queue_name=settings.queue_name)
        await redis.enqueue_job("transcode_video", "video-0", 0, _queue_name=settings.video_queue, _defer_by=3600)
        assert await observe_queue(ctx) == 2
        waited = {
            queue: REGISTRY.get_sample_value("mediavault_queue_oldest_waiting_seconds", {"queue": queue})
            for queue in ("photo", "video", "cron")
        }
    assert 20 * 60 <= waited["photo"] < 21 * 60, waited
    assert waited["video"] == waited["cron"] == 0, waited


async def test_a_worker_samples_the_queues_itself_without_taking_a_job_slot(make_settings, user_id):
    from prometheus_client import REGISTRY

    from mediavault import metrics

    for queue in ("photo", "video"):
        metrics.QUEUE_DEPTH.labels(queue).set(-1)
    async with running_worker(make_settings(queue_name=f"depth-sampled:{user_id}")) as worker:
        async with asyncio.timeout(20):
            while REGISTRY.get_sample_value("mediavault_queue_depth", {"queue": "photo"}) == -1:
                await asyncio.sleep(0.01)
        jobs_started = worker.jobs_complete + worker.jobs_failed + worker.jobs_retried + len(worker.tasks)
        # Read while the worker runs: its sampler's end takes the series away.
        depths = {queue: REGISTRY.get_sample_value("mediavault_queue_depth", {"queue": queue}) for queue in ("photo", "video")}
    assert depths == {"photo": 0, "video": 0}
    assert jobs_started == 0
