"""MediaService over real gRPC, PostgreSQL, Redis and a running arq worker."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from mediavault.domain import cleanup, ledger
from mediavault.domain.media import Variant, variant_key
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.services import build_services
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import CORPUS, running
from tests.faults import proxied
from tests.helpers import error_info, fake_jpeg, fetch, settled, until_waiting_for_lock, upload


async def test_photo_becomes_upright_variants_within_budget(storage, media, auth, user_id, worker):
    md = auth(user_id)
    data = (CORPUS / "images/formats/rommel.jpg").read_bytes()
    done = await upload(storage, md, data, filename="rommel.jpg")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.kind == mpb.MEDIA_KIND_IMAGE
    assert item.attempts == 1
    assert (item.width, item.height) == (2304, 3072), "EXIF orientation 6 makes it portrait"
    variants = {v.name: v for v in item.variants}
    assert set(variants) == {"thumbnail", "preview", "display"}
    assert item.feed_url == variants["thumbnail"].url
    for name, box, budget in (("thumbnail", 300, 40_000), ("preview", 600, 100_000), ("display", 4000, 2_000_000)):
        variant = variants[name]
        status, body, headers = await fetch(variant.url)
        assert status == 200
        assert len(body) == variant.size_bytes <= budget
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert headers["Content-Type"] == variant.content_type
        picture = Image.open(io.BytesIO(body))
        assert picture.size == (variant.width, variant.height)
        assert max(picture.size) <= box
        assert picture.height > picture.width
        assert not picture.getexif()
        not_modified, _, _ = await fetch(variant.url, {"If-None-Match": headers["ETag"]})
        assert not_modified == 304
    status, body, _ = await fetch(item.original_url)
    assert (status, body) == (200, data)


async def test_variants_answer_in_the_accepted_format_with_the_others_as_alternatives(storage, media, auth, user_id, worker, pool):
    md = auth(user_id)
    done = await upload(storage, md, (CORPUS / "images/formats/hopper.jpg").read_bytes(), filename="hopper.jpg")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert 5 <= len(item.thumbhash) <= 25
    rows = await pool.fetch("SELECT name, content_type FROM media_variants WHERE media_id = $1", uuid.UUID(done.media_id))
    assert sorted((r["name"], r["content_type"]) for r in rows) == [
        ("display", "image/jpeg"),
        ("preview", "image/avif"), ("preview", "image/jpeg"),
        ("thumbnail", "image/avif"), ("thumbnail", "image/jpeg"),
    ]
    assert [v.content_type for v in item.variants] == ["image/jpeg"] * 3, "no accept: JPEG, which every client decodes"

    avif = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id, accept=["image/avif", "image/webp"]), metadata=md)).media
    variants = {v.name: v for v in avif.variants}
    assert avif.feed_url == variants["thumbnail"].url
    for name in ("thumbnail", "preview"):
        chosen = variants[name]
        assert chosen.content_type == "image/avif"
        assert [a.content_type for a in chosen.alternatives] == ["image/jpeg"]
        for served in (chosen, *chosen.alternatives):
            status, body, headers = await fetch(served.url)
            assert (status, headers["Content-Type"], len(body)) == (200, served.content_type, served.size_bytes)
            assert Image.open(io.BytesIO(body)).size == (served.width, served.height)
        jpeg = chosen.alternatives[-1]
        assert chosen.size_bytes < jpeg.size_bytes
    assert variants["display"].content_type == "image/jpeg"
    assert not variants["display"].alternatives

    plain = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    preferring = await media.ListFeed(mpb.ListFeedRequest(accept=["image/avif", "image/webp"]), metadata=md)
    assert {v.content_type for v in preferring.media[0].variants if v.name != "display"} == {"image/avif"}
    assert {v.content_type for v in plain.media[0].variants} == {"image/jpeg"}
    assert preferring.media[0].thumbhash == item.thumbhash
    assert preferring.etag != plain.etag
    again = await media.ListFeed(mpb.ListFeedRequest(accept=["image/avif", "image/webp"], if_none_match=preferring.etag), metadata=md)
    assert again.not_modified
    other = await media.ListFeed(mpb.ListFeedRequest(accept=["image/jpeg"], if_none_match=preferring.etag), metadata=md)
    assert not other.not_modified


async def test_video_gets_a_poster_and_its_variants(storage, media, auth, user_id, worker):
    md = auth(user_id)
    data = (CORPUS / "video/realshort.mp4").read_bytes()
    done = await upload(storage, md, data, filename="clip.mp4", content_type="video/mp4")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.kind == mpb.MEDIA_KIND_VIDEO
    assert {v.name for v in item.variants} == {"poster", "thumbnail", "preview"}
    assert (item.width, item.height) == (320, 240)


@pytest.mark.parametrize(
    ("path", "content_type", "reason"),
    [
        ("images/bad/truncated_jpeg.jpg", "image/jpeg", "corrupt image"),
        ("images/bad/broken.png", "image/png", "corrupt image"),
        ("images/bad/decompression_bomb.gif", "image/gif", "image too large"),
    ],
)
async def test_bad_files_fail_at_once_with_a_clear_reason(storage, media, auth, user_id, worker, path, content_type, reason):
    md = auth(user_id)
    data = (CORPUS / path).read_bytes()
    done = await upload(storage, md, data, filename=path.rsplit("/", 1)[1], content_type=content_type)
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert item.processing_error == reason
    assert item.attempts == 1, "permanent failures are not retried"
    assert item.feed_url == item.original_url, "a feed still has something to show"


async def test_feed_pages_are_stable_under_concurrent_inserts(storage, media, auth, user_id):
    md = auth(user_id)
    created = [(await upload(storage, md, fake_jpeg(1000 + i))).media_id for i in range(12)]
    first = await media.ListFeed(mpb.ListFeedRequest(page_size=5), metadata=md)
    assert [m.media_id for m in first.media] == created[::-1][:5]
    newer = await asyncio.gather(*(upload(storage, md, fake_jpeg(3000 + i)) for i in range(3)))
    seen = [m.media_id for m in first.media]
    token = first.next_page_token
    while token:
        page = await media.ListFeed(mpb.ListFeedRequest(page_size=5, page_token=token), metadata=md)
        seen.extend(m.media_id for m in page.media)
        token = page.next_page_token
    assert seen == created[::-1], "no repeats, no skips, the inserts land before the cursor"
    top = await media.ListFeed(mpb.ListFeedRequest(page_size=3), metadata=md)
    assert {m.media_id for m in top.media} == {n.media_id for n in newer}


async def test_page_size_is_clamped(storage, media, auth, user_id):
    md = auth(user_id)
    await asyncio.gather(*(upload(storage, md, fake_jpeg(900 + i)) for i in range(3)))
    page = await media.ListFeed(mpb.ListFeedRequest(page_size=500), metadata=md)
    assert len(page.media) == 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media.ListFeed(mpb.ListFeedRequest(page_token="not-a-token"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_etag_answers_not_modified_until_the_feed_changes(storage, media, auth, user_id, worker):
    md = auth(user_id)
    first = await upload(storage, md, fake_jpeg(1234))
    second = await upload(storage, md, fake_jpeg(1235))
    # The session's worker processes both; its status changes would change the feed mid-test.
    for done in (first, second):
        await settled(media, md, done.media_id)
    page = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    assert page.etag
    assert len(page.media) == 2
    same = await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)
    assert same.not_modified
    assert not same.media
    assert same.etag == page.etag

    await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=first.media_id), metadata=md)
    changed = await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)
    assert not changed.not_modified
    assert changed.etag != page.etag
    assert [m.media_id for m in changed.media] != [m.media_id for m in page.media]
    assert first.media_id not in {m.media_id for m in changed.media}


async def test_the_feed_etag_is_the_callers_answers_the_owners_differs_from_a_readers(storage, media, auth, user_id):
    md, reader = auth(user_id), auth("feed-svc", "service")
    await upload(storage, md, fake_jpeg(1200))
    own = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    seen = await media.ListFeed(mpb.ListFeedRequest(user_id=user_id), metadata=reader)
    assert own.media[0].original_url
    assert not seen.media[0].original_url
    assert own.etag != seen.etag
    for caller, held in ((reader, own.etag), (md, seen.etag)):
        answer = await media.ListFeed(mpb.ListFeedRequest(user_id=user_id, if_none_match=held), metadata=caller)
        assert not answer.not_modified, "another caller's etag is not this answer's"


async def test_an_etag_stops_being_current_before_its_answers_signed_urls_expire(make_settings, auth, user_id):
    ttl = 2
    async with running(make_settings(media_url_ttl_seconds=ttl)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage, media = storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        await upload(storage, md, fake_jpeg(1200))
        page = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
        # Within the same half TTL the page is current (a second try if the first met its end).
        for _ in range(2):
            held = await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)
            if held.not_modified:
                break
            page = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
        assert held.not_modified
        await asyncio.sleep(ttl / 2)
        later = await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)
        assert not later.not_modified, "its URLs would have had less than half their life left"
        assert later.etag != page.etag
        status, _, _ = await fetch(later.media[0].original_url)
        assert status == 200


async def test_a_run_starting_reporting_progress_or_waiting_to_retry_changes_the_feed(storage, media, auth, user_id, worker, server):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1300))
    await settled(media, md, done.media_id)
    # A run of a new version, which no worker is asked for: this test plays the worker.
    version = await server.pool.fetchval(
        "UPDATE media SET variants_version = variants_version + 1, processing_status = 'pending', attempts = 0, "
        "processing_error = NULL WHERE media_id = $1::uuid RETURNING variants_version",
        done.media_id,
    )
    services = build_services(server.pool, server.blobs, server.queue, server.settings)
    await services.feed.changed(user_id)
    media_id = uuid.UUID(done.media_id)
    etags: list[str] = []

    async def in_feed() -> mpb.Media:
        page = await media.ListFeed(mpb.ListFeedRequest(if_none_match=etags[-1] if etags else ""), metadata=md)
        assert not page.not_modified, "the page changed, so its etag must have"
        etags.append(page.etag)
        [item] = [m for m in page.media if m.media_id == done.media_id]
        return item

    assert (await in_feed()).processing_status == mpb.PROCESSING_STATUS_PENDING
    assert await services.library.claim(media_id, version) is not None
    item = await in_feed()
    assert (item.processing_status, item.attempts) == (mpb.PROCESSING_STATUS_PROCESSING, 1)
    assert await services.library.progress(media_id, version, 40)
    assert (await in_feed()).processing_progress == 40
    assert await services.library.retry_later(media_id, version, "blob store unreachable", 3600)
    assert (await in_feed()).processing_status == mpb.PROCESSING_STATUS_PENDING
    assert len(set(etags)) == 4


async def test_progress_is_the_running_attempts_alone(storage, media, auth, user_id, worker, server):
    """A run's progress goes with it: a new attempt, a run the stuck sweep ended and a reprocess
    show none of the last one's (0: nothing runs), not the percentage it stopped at."""
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1400))
    await settled(media, md, done.media_id)
    media_id = uuid.UUID(done.media_id)
    version = await server.pool.fetchval(
        "UPDATE media SET variants_version = variants_version + 1, processing_status = 'pending', attempts = 0 "
        "WHERE media_id = $1 RETURNING variants_version",
        media_id,
    )
    services = build_services(server.pool, server.blobs, server.queue, server.settings)

    async def progress() -> int:
        await services.feed.changed(user_id)
        return (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media.processing_progress

    assert await services.library.claim(media_id, version) is not None
    assert await services.library.progress(media_id, version, 40)
    assert await progress() == 40
    # Its worker died: the next attempt claims the run again.
    assert await services.library.claim(media_id, version) is not None
    assert await progress() == 0
    assert await services.library.progress(media_id, version, 70)
    await server.pool.execute("UPDATE media SET updated_at = now() - interval '1 hour' WHERE media_id = $1", media_id)
    async with server.pool.acquire() as conn:
        ended = await cleanup.fail_stuck_processing(conn, 100, 60, 1)
    assert media_id in {row["media_id"] for row in ended.rows}
    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert (item.processing_status, item.processing_progress) == (mpb.PROCESSING_STATUS_FAILED, 0)
    await server.pool.execute("UPDATE media SET processing_progress = 55 WHERE media_id = $1", media_id)
    again = (await media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md)).media
    assert (again.processing_status, again.processing_progress) == (mpb.PROCESSING_STATUS_PENDING, 0)


async def test_a_reprocess_that_meets_a_delete_is_not_found_not_busy(make_settings, auth, user_id, pool):
    # A queue no worker serves: a worker that claimed the upload's run would make the media busy.
    settings = make_settings(queue_name=f"reprocess-meets-delete:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage, media = storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)
        await _reprocess_meets_delete(storage, media, auth(user_id), user_id, pool)


async def _reprocess_meets_delete(storage, media, md, user_id, pool) -> None:
    done = await upload(storage, md, fake_jpeg(1500))
    async with pool.acquire() as deleting:
        transaction = deleting.transaction()
        await transaction.start()
        # What DeleteMedia does, its bytes freed through the ledger, held uncommitted.
        size = await deleting.fetchval(
            "UPDATE media SET deleted_at = now(), purge_after = now() + interval '1 day' WHERE media_id = $1::uuid "
            "RETURNING size_bytes", done.media_id)
        await deleting.execute("UPDATE accounts SET used_bytes = used_bytes - $2 WHERE user_id = $1", user_id, size)
        await deleting.execute(
            "INSERT INTO ledger_entries (user_id, kind, used_delta, media_id) VALUES ($1, 'free', $2, $3::uuid)",
            user_id, -size, done.media_id)
        # The reprocess reads the media as live, then waits for the delete's row lock.
        reprocess = asyncio.ensure_future(media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md))
        await until_waiting_for_lock(pool, reprocess, "%SET variants_version = variants_version + 1%")
        await transaction.commit()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reprocess
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "NOT_FOUND"


async def test_a_reprocess_that_meets_the_expiry_of_its_media_is_not_found_and_changes_nothing(make_settings, auth, user_id, pool):
    # A queue no worker serves: the upload's run stays PENDING, which a reprocess may restart.
    settings = make_settings(queue_name=f"reprocess-meets-expiry:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage, media = storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        done = await upload(storage, md, fake_jpeg(1501), retention=pb.RETENTION_EPHEMERAL)
        state = "SELECT variants_version, processing_status, requested_formats FROM media WHERE media_id = $1::uuid"
        before = tuple(await pool.fetchrow(state, done.media_id))
        async with pool.acquire() as expiring:
            transaction = expiring.transaction()
            await transaction.start()
            await expiring.execute("UPDATE media SET expires_at = now() - interval '1 second' WHERE media_id = $1::uuid",
                                   done.media_id)
            # The reprocess reads the media as present, then waits for the row, which expired meanwhile.
            reprocess = asyncio.ensure_future(media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md))
            await until_waiting_for_lock(pool, reprocess, "%SET variants_version = variants_version + 1%")
            await transaction.commit()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reprocess
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A run restarted for media no one can see any more, for the expiry job to remove.
    assert tuple(await pool.fetchrow(state, done.media_id)) == before


@pytest.mark.parametrize("recording", ["complete", "add_formats"])
async def test_a_delete_that_meets_a_run_recording_its_variants_frees_their_bytes(make_settings, auth, user_id, pool, recording):
    # A queue no worker serves: the test plays the worker.
    settings = make_settings(queue_name=f"delete-meets-variants:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage, media = storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        done = await upload(storage, md, fake_jpeg(1500))
        media_id = uuid.UUID(done.media_id)
        library = build_services(server.pool, server.blobs, None, server.settings).library
        thumbnail = Variant("thumbnail", variant_key(media_id, 0, "thumbnail", "image/jpeg"), "image/jpeg", 10, 10, 700)
        webp = Variant("thumbnail", variant_key(media_id, 0, "thumbnail", "image/webp"), "image/webp", 10, 10, 300)
        assert await library.claim(media_id, 0)
        if recording == "add_formats":
            assert await library.complete(media_id, 0, 10, 10, [thumbnail])
        async with pool.acquire() as holding, holding.transaction():
            # The owner's account held: the run records its variants, holding the media row,
            # and waits to add their bytes to the account.
            await holding.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR NO KEY UPDATE", user_id)
            if recording == "complete":
                run = asyncio.ensure_future(library.complete(media_id, 0, 10, 10, [thumbnail]))
            else:
                run = asyncio.ensure_future(library.add_formats(media_id, 0, [webp]))
            await until_waiting_for_lock(pool, run, "%derived_bytes = a.derived_bytes + c.delta%")
            # The delete waits for the media row.
            delete = asyncio.ensure_future(media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=md))
            await until_waiting_for_lock(pool, delete, "%SET deleted_at = now()%")
        assert await run
        await delete
        summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
        assert (summary.used_bytes, summary.derived_bytes, summary.media_count) == (0, 0, 0)
    assert [m for m in await ledger.audit(pool) if m.user_id == user_id] == []


async def test_delete_frees_bytes_and_hides_media_from_everyone(storage, media, auth, user_id, pool):
    md = auth(user_id)
    data = fake_jpeg(7000)
    done = await upload(storage, md, data)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=auth("intruder"))
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND

    await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=md)
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.used_bytes, summary.media_count) == (0, 0)
    assert await pool.fetchval("SELECT used_delta FROM ledger_entries WHERE media_id = $1::uuid AND kind = 'free'", done.media_id) == -7000
    for who in (md, auth("ops", "admin")):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=who)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(gone.value).reason == "NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError):
        await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=md)
    assert await ledger.audit(pool) == []


async def test_others_media_is_not_found_but_service_may_read(storage, media, auth, user_id):
    done = await upload(storage, auth(user_id), fake_jpeg(1500))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=auth("someone"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    seen = await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=auth("feed-svc", "service"))
    assert seen.media.user_id == user_id
    feed = await media.ListFeed(mpb.ListFeedRequest(user_id=user_id), metadata=auth("feed-svc", "service"))
    assert [m.media_id for m in feed.media] == [done.media_id]
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await media.ListFeed(mpb.ListFeedRequest(user_id=user_id), metadata=auth("someone"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_original_with_its_gps_goes_to_the_owner_alone(storage, media, auth, user_id):
    exif = Image.Exif()
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    done = await upload(storage, auth(user_id), data)
    own = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=auth(user_id))).media
    status, body, _ = await fetch(own.original_url)
    assert (status, body) == (200, data)
    assert Image.open(io.BytesIO(body)).getexif().get_ifd(0x8825), "the original keeps its GPS"
    assert own.feed_url == own.original_url, "no variant yet"
    for reader in (auth("feed-svc", "service"), auth("ops", "admin")):
        seen = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=reader)).media
        listed = (await media.ListFeed(mpb.ListFeedRequest(user_id=user_id), metadata=reader)).media
        assert [m.media_id for m in listed] == [done.media_id]
        for item in (seen, listed[0]):
            assert (item.original_url, item.feed_url) == ("", "")


async def test_behind_a_cdn_the_variants_are_plain_urls_and_the_original_stays_signed(make_settings, auth, user_id, worker):
    cdn = "https://cdn.example/media"
    async with running(make_settings(public_base_url=cdn)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage, media = storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        data = (CORPUS / "images/formats/hopper.jpg").read_bytes()
        done = await upload(storage, md, data)
        item = await settled(media, md, done.media_id)
        assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
        urls = [v.url for v in item.variants] + [a.url for v in item.variants for a in v.alternatives]
        assert urls
        assert all(url.startswith(f"{cdn}/variants/") for url in urls), urls
        # The thumbnail's URL names the media: a CDN URL of the original would be its neighbour.
        assert not item.original_url.startswith(cdn), item.original_url
        status, body, _ = await fetch(item.original_url)
        assert (status, body) == (200, data)


async def test_save_makes_ephemeral_media_permanent(storage, media, auth, user_id):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(2500), retention=pb.RETENTION_EPHEMERAL)
    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert item.retention == pb.RETENTION_EPHEMERAL
    assert item.HasField("expires_at")
    saved = (await media.SaveMedia(mpb.SaveMediaRequest(media_id=done.media_id), metadata=md)).media
    assert saved.retention == pb.RETENTION_PERMANENT
    assert saved.HasField("saved_at")
    assert not saved.HasField("expires_at")


def feed_cache_lookups() -> tuple[float, float]:
    """The feed page cache's hits and misses so far."""
    return tuple(REGISTRY.get_sample_value("mediavault_feed_cache_total", {"result": result}) or 0.0 for result in ("hit", "miss"))


async def test_saving_media_that_is_saved_already_keeps_the_cached_feed(storage, media, auth, user_id, worker):
    """SaveMedia bumped the owner's feed version, dropping every cached page, even when it changed
    nothing (the media permanent already); only a save that changes a row bumps it now."""
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(2550), retention=pb.RETENTION_EPHEMERAL)
    # The session's worker processes it; its status changes would change the feed mid-test.
    await settled(media, md, done.media_id)
    save = mpb.SaveMediaRequest(media_id=done.media_id)

    async def lookups_of_a_feed_read() -> tuple[float, float]:
        before = feed_cache_lookups()
        await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
        return tuple(after - earlier for after, earlier in zip(feed_cache_lookups(), before, strict=True))

    await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    assert await lookups_of_a_feed_read() == (1, 0)
    await media.SaveMedia(save, metadata=md)
    assert await lookups_of_a_feed_read() == (0, 1), "a save that makes the media permanent changes the feed"
    assert await lookups_of_a_feed_read() == (1, 0)
    assert (await media.SaveMedia(save, metadata=md)).media.retention == pb.RETENTION_PERMANENT
    assert await lookups_of_a_feed_read() == (1, 0), "a save that changes nothing leaves the cached page"


async def test_ephemeral_media_past_its_expiry_is_gone_before_the_expiry_job_removes_it(storage, media, auth, user_id, pool, worker):
    md = auth(user_id)
    expired = await upload(storage, md, fake_jpeg(2600), retention=pb.RETENTION_EPHEMERAL)
    live = await upload(storage, md, fake_jpeg(2601), retention=pb.RETENTION_EPHEMERAL)
    # The session's worker processes both; its status changes would change the feed mid-test.
    for done in (expired, live):
        await settled(media, md, done.media_id)
    await pool.execute("UPDATE media SET expires_at = now() - interval '1 second' WHERE media_id = $1::uuid", expired.media_id)

    for who in (md, auth("ops", "admin"), auth("feed-svc", "service")):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await media.GetMedia(mpb.GetMediaRequest(media_id=expired.media_id), metadata=who)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(gone.value).reason == "NOT_FOUND"
        listed = await media.ListFeed(mpb.ListFeedRequest(user_id=user_id), metadata=who)
        assert [m.media_id for m in listed.media] == [live.media_id]
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.media_count == 1, "the summary counts what the feed lists"
    for call in (media.SaveMedia(mpb.SaveMediaRequest(media_id=expired.media_id), metadata=md),
                 media.DeleteMedia(mpb.DeleteMediaRequest(media_id=expired.media_id), metadata=md),
                 media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=expired.media_id), metadata=md)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    row = await pool.fetchrow("SELECT retention, saved_at, deleted_at FROM media WHERE media_id = $1::uuid", expired.media_id)
    assert tuple(row) == ("ephemeral", None, None), "not saved; the expiry job removes it"
    saved = (await media.SaveMedia(mpb.SaveMediaRequest(media_id=live.media_id), metadata=md)).media
    assert saved.retention == pb.RETENTION_PERMANENT


async def test_a_feed_page_and_its_etag_end_when_an_item_on_it_expires(storage, media, auth, user_id, pool, worker):
    md = auth(user_id)
    kept = await upload(storage, md, fake_jpeg(2700))
    expiring = await upload(storage, md, fake_jpeg(2701), retention=pb.RETENTION_EPHEMERAL)
    for done in (kept, expiring):
        await settled(media, md, done.media_id)
    # Well inside the feed cache's TTL (30 s); an expiry bumps no feed version.
    expires_at = await pool.fetchval(
        "UPDATE media SET expires_at = now() + interval '2 seconds' WHERE media_id = $1::uuid RETURNING expires_at", expiring.media_id)
    page = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    assert [m.media_id for m in page.media] == [expiring.media_id, kept.media_id]
    assert (await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)).not_modified

    await asyncio.sleep((expires_at - datetime.now(UTC)).total_seconds() + 0.1)
    later = await media.ListFeed(mpb.ListFeedRequest(if_none_match=page.etag), metadata=md)
    assert not later.not_modified
    assert later.etag != page.etag
    assert [m.media_id for m in later.media] == [kept.media_id]


async def test_reprocess_runs_again_under_a_new_job_and_keys(storage, media, auth, user_id, worker, pool):
    md = auth(user_id)
    done = await upload(storage, md, (CORPUS / "images/formats/hopper.png").read_bytes(), content_type="image/png")
    first = await settled(media, md, done.media_id)
    assert first.processing_status == mpb.PROCESSING_STATUS_COMPLETE, first.processing_error
    again = (await media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md)).media
    assert again.processing_status == mpb.PROCESSING_STATUS_PENDING
    second = await settled(media, md, done.media_id)
    assert second.processing_status == mpb.PROCESSING_STATUS_COMPLETE
    keys = [r["object_key"] for r in await pool.fetch("SELECT object_key FROM media_variants WHERE media_id = $1::uuid", done.media_id)]
    assert len(keys) == 5, "display, and thumbnail and preview in JPEG and AVIF"
    assert all("/v1/" in k for k in keys)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=auth("someone"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reprocess_while_a_worker_processes_answers_media_busy(storage, media, auth, user_id, worker, pool):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(2700))
    await settled(media, md, done.media_id)
    # As a worker's claim leaves it; settled first, so no queued job of this media runs meanwhile.
    version = await pool.fetchval(
        "UPDATE media SET processing_status = 'processing', processing_started_at = now() "
        "WHERE media_id = $1::uuid RETURNING variants_version",
        done.media_id,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "MEDIA_BUSY"
    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert item.processing_status == mpb.PROCESSING_STATUS_PROCESSING
    assert await pool.fetchval("SELECT variants_version FROM media WHERE media_id = $1::uuid", done.media_id) == version


async def test_events_are_counted_and_sanitised(storage, media, auth, user_id, pool):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1800))
    request = mpb.RecordEventsRequest()
    for event_type in (mpb.USAGE_EVENT_TYPE_IMPRESSION,) * 3 + (mpb.USAGE_EVENT_TYPE_LIKE, mpb.USAGE_EVENT_TYPE_SHARE):
        event = request.events.add(event_type=event_type, media_id=done.media_id, surface="feed")
        event.meta.update({"position": 3, "email": "a@b.c", "client": {"os": "ios", "ip": "1.2.3.4", "deep": {"deeper": {"x": 1}}}})
    request.events.add(event_type=mpb.USAGE_EVENT_TYPE_UNSPECIFIED, media_id=done.media_id)
    request.events.add(event_type=mpb.USAGE_EVENT_TYPE_CLICK, media_id="not-a-uuid")
    result = await media.RecordEvents(request, metadata=md)
    assert (result.accepted, result.rejected) == (5, 2)

    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert (item.view_count, item.like_count, item.share_count) == (3, 1, 1)
    meta = json.loads(await pool.fetchval("SELECT meta::text FROM usage_events WHERE media_id = $1::uuid LIMIT 1", done.media_id))
    assert meta == {"position": 3, "client": {"os": "ios", "deep": {}}}
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await media.RecordEvents(mpb.RecordEventsRequest(), metadata=md)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def events_counted(result: str) -> float:
    return REGISTRY.get_sample_value("mediavault_usage_events_total", {"result": result}) or 0.0


async def test_a_batch_retried_with_its_idempotency_key_is_counted_once(storage, media, auth, user_id):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1800))
    request = mpb.RecordEventsRequest(idempotency_key=f"batch-{uuid.uuid4()}")
    request.events.add(event_type=mpb.USAGE_EVENT_TYPE_IMPRESSION, media_id=done.media_id, surface="feed")
    request.events.add(event_type=mpb.USAGE_EVENT_TYPE_LIKE, media_id=done.media_id, surface="feed")
    request.events.add(event_type=mpb.USAGE_EVENT_TYPE_CLICK, media_id="not-a-uuid")
    before = events_counted("accepted"), events_counted("rejected")
    answers = [await media.RecordEvents(request, metadata=md) for _ in range(3)]
    assert {(answer.accepted, answer.rejected) for answer in answers} == {(2, 1)}
    assert (events_counted("accepted") - before[0], events_counted("rejected") - before[1]) == (2, 1)


# What asyncpg sends to cancel a statement, on a connection of its own: a CancelRequest.
CANCEL_REQUEST = b"\x00\x00\x00\x10\x04\xd2\x16\x2e"


async def test_events_of_a_call_shed_after_their_insert_committed_are_stored_once_by_its_retry(
    storage, media, auth, user_id, pool, make_settings
):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1800))
    surface = f"shed-{uuid.uuid4().hex[:8]}"
    request = mpb.RecordEventsRequest(idempotency_key=f"batch-{uuid.uuid4()}")
    for event_type in (mpb.USAGE_EVENT_TYPE_IMPRESSION, mpb.USAGE_EVENT_TYPE_IMPRESSION, mpb.USAGE_EVENT_TYPE_LIKE):
        request.events.add(event_type=event_type, media_id=done.media_id, surface=surface)
    settings = make_settings()
    async with (
        proxied(settings.database_url) as proxy,
        running(settings.model_copy(update={"database_url": proxy.url_for(settings.database_url)})) as draining,
        grpc.aio.insecure_channel(f"127.0.0.1:{draining.grpc_port}") as channel,
    ):
        # PostgreSQL commits the insert (its parameters carry the surface); its reply is held until
        # the drain sheds the call, which has asyncpg ask PostgreSQL to cancel what already ended.
        proxy.hold_replies(after=surface.encode(), until=CANCEL_REQUEST)
        call = media_pb2_grpc.MediaServiceStub(channel).RecordEvents(request, metadata=md)
        while await pool.fetchval("SELECT count(*) FROM usage_events WHERE surface = $1", surface) < 3:
            await asyncio.sleep(0.01)
        shutdown = asyncio.create_task(draining.shutdown(0.1))
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await call
        await shutdown
    assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(shed.value).reason == "SERVER_SHUTTING_DOWN"

    retried = await media.RecordEvents(request, metadata=md)
    assert (retried.accepted, retried.rejected) == (3, 0)
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE surface = $1", surface) == 3
    del request.events[-1]
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await media.RecordEvents(request, metadata=md)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(conflict.value).reason == "IDEMPOTENCY_CONFLICT"
    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert (item.view_count, item.like_count) == (2, 1)
