"""Formats made on request: asked for once through MediaService, made by one make_formats job, served after.

Each test has a queue of its own, so jobs wait in Redis until the test starts a worker.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from arq import Retry
from arq.connections import RedisSettings, create_pool
from arq.constants import result_key_prefix, retry_key_prefix
from arq.jobs import Job
from PIL import Image
from redis.asyncio import Redis

from mediavault.domain.media import Library
from mediavault.imaging.decode import NEAR_BLACK_LUMA
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2_grpc
from tests import videos as make
from tests.conftest import CORPUS, POOLERS, running, running_worker
from tests.faults import PrivateRedis
from tests.helpers import fetch, settled, upload
from tests.imaging.helpers import mean_difference
from workers.formats import make_formats
from workers.transcode import INFRASTRUCTURE_TRIES

WEBP_FIRST = ["image/webp", "image/jpeg"]
SMALL = ("thumbnail", "preview")


class Client:
    def __init__(self, channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]) -> None:
        self.storage = storage_pb2_grpc.StorageServiceStub(channel)
        self.media = media_pb2_grpc.MediaServiceStub(channel)
        self.md = md

    async def get(self, media_id: str, accept: list[str]) -> mpb.Media:
        return (await self.media.GetMedia(mpb.GetMediaRequest(media_id=media_id, accept=accept), metadata=self.md)).media


async def queued_jobs(redis_url: str, queue: str) -> list[str]:
    """The make_formats jobs waiting in the queue (the worker's own cron runs are left out)."""
    redis = Redis.from_url(redis_url)
    try:
        return sorted(job for member in await redis.zrange(queue, 0, -1) if (job := member.decode()).startswith("formats:"))
    finally:
        await redis.aclose()


async def processed(settings, client: Client, relative: str, content_type: str = "image/jpeg") -> str:
    """An upload of the corpus file, settled by a worker that stops again."""
    async with running_worker(settings):
        done = await upload(client.storage, client.md, (CORPUS / relative).read_bytes(),
                            filename=relative.rsplit("/", 1)[1], content_type=content_type)
        item = await settled(client.media, client.md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    return done.media_id


async def chosen(client: Client, media_id: str, accept: list[str], timeout: float = 60.0) -> dict[str, mpb.Variant]:
    """The variants as answered once every small one comes in the first accepted format."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        variants = {v.name: v for v in (await client.get(media_id, accept)).variants}
        if all(variants[name].content_type == accept[0] for name in SMALL):
            return variants
        assert asyncio.get_running_loop().time() < deadline, {n: v.content_type for n, v in variants.items()}
        await asyncio.sleep(0.05)


@pytest.fixture
async def own_queue(make_settings, user_id) -> AsyncIterator[tuple]:
    settings = make_settings(queue_name=f"formats:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield settings, channel


@pytest.fixture(params=POOLERS)
async def own_queue_pooled(request: pytest.FixtureRequest, make_settings, user_id) -> AsyncIterator[tuple]:
    """own_queue, its server and workers straight to PostgreSQL or through PgBouncer."""
    pooled = {}
    if request.param == "pgbouncer":
        pooled = {"database_url": request.getfixturevalue("pgbouncer_database_url"), "database_pooler": "pgbouncer"}
    settings = make_settings(queue_name=f"formats:{user_id}", **pooled)
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield settings, channel


async def test_webp_is_asked_for_once_made_by_one_job_and_served_after(own_queue_pooled, auth, user_id, pool):
    settings, channel = own_queue_pooled
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/jolla.jpg")
    stored = await pool.fetch("SELECT name, content_type FROM media_variants WHERE media_id = $1::uuid", media_id)
    assert ("thumbnail", "image/webp") not in {(r["name"], r["content_type"]) for r in stored}, "the upload's job makes no WebP"

    answers = await asyncio.gather(*(client.get(media_id, WEBP_FIRST) for _ in range(8)))
    for answer in answers:
        for variant in answer.variants:
            assert variant.content_type == "image/jpeg", "meanwhile the next accepted format"
    assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == [
        "preview:image/webp", "thumbnail:image/webp",
    ]
    feed_before = await client.media.ListFeed(mpb.ListFeedRequest(accept=WEBP_FIRST), metadata=client.md)
    again = await client.media.ListFeed(mpb.ListFeedRequest(accept=WEBP_FIRST, if_none_match=feed_before.etag), metadata=client.md)
    assert again.not_modified, "a request changes no answer"
    await client.get(media_id, ["image/webp"])
    assert await queued_jobs(settings.redis_url, settings.queue_name) == [f"formats:{media_id}:v0:q1"]

    jpeg_sizes = {v.name: v.size_bytes for v in answers[0].variants}
    async with running_worker(settings):
        variants = await chosen(client, media_id, WEBP_FIRST)
    for name in SMALL:
        webp = variants[name]
        assert [a.content_type for a in webp.alternatives] == ["image/jpeg", "image/avif"]
        status, body, headers = await fetch(webp.url)
        assert (status, headers["Content-Type"], len(body)) == (200, "image/webp", webp.size_bytes)
        picture = Image.open(io.BytesIO(body))
        assert (picture.format, picture.size) == ("WEBP", (webp.width, webp.height))
        assert picture.size == (webp.alternatives[0].width, webp.alternatives[0].height)
        assert webp.size_bytes < jpeg_sizes[name]
        assert not picture.getexif()
        assert "icc_profile" not in picture.info
    derived = await pool.fetchrow(
        "SELECT m.derived_bytes, (SELECT sum(size_bytes) FROM media_variants v WHERE v.media_id = m.media_id) AS summed, "
        "a.derived_bytes AS account FROM media m JOIN accounts a ON a.user_id = m.owner_id WHERE m.media_id = $1::uuid",
        media_id,
    )
    assert derived["derived_bytes"] == derived["summed"] == derived["account"]
    feed_after = await client.media.ListFeed(
        mpb.ListFeedRequest(accept=WEBP_FIRST, if_none_match=feed_before.etag), metadata=client.md
    )
    assert not feed_after.not_modified, "a format made changes the page and its etag"
    assert {v.content_type for v in feed_after.media[0].variants if v.name in SMALL} == {"image/webp"}
    assert await queued_jobs(settings.redis_url, settings.queue_name) == []


async def test_a_webp_is_kept_only_when_smaller_than_the_stored_primary(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    # Its preview's stored JPEG comes from the planes strategy, a few dozen bytes smaller than
    # the JPEG Pillow makes of it again, and its WebP lies between the two.
    media_id = await processed(settings, client, "images/orientation/Landscape_6.jpg")
    jpegs = {v.name: v for v in (await client.get(media_id, WEBP_FIRST)).variants}
    (job,) = await queued_jobs(settings.redis_url, settings.queue_name)
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running_worker(settings):
            deadline = asyncio.get_running_loop().time() + 60
            while not await redis.exists(result_key_prefix + job):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        assert (await Job(job, redis).result_info()).result == "complete"
    finally:
        await redis.aclose()
    rows = await pool.fetch("SELECT name, content_type, size_bytes FROM media_variants WHERE media_id = $1::uuid", media_id)
    stored = {(r["name"], r["content_type"]): r["size_bytes"] for r in rows}
    assert ("thumbnail", "image/webp") in stored
    for name in SMALL:
        assert stored.get((name, "image/webp"), 0) < stored[(name, "image/jpeg")] == jpegs[name].size_bytes, name
    for name, variant in {v.name: v for v in (await client.get(media_id, WEBP_FIRST)).variants}.items():
        status, body, _ = await fetch(variant.url)
        assert status == 200
        assert len(body) <= jpegs[name].size_bytes, f"the {name} answers in no more bytes than its JPEG"


async def test_clients_that_take_avif_or_anything_ask_for_nothing(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/jolla.jpg")
    for accept in (["image/avif", "image/webp"], ["*/*"], ["image/*"], [], ["image/jpeg", "image/webp"]):
        await client.get(media_id, accept)
    await client.media.ListFeed(mpb.ListFeedRequest(accept=["image/avif", "image/webp"]), metadata=client.md)
    assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []
    assert await queued_jobs(settings.redis_url, settings.queue_name) == []


async def test_webp_primaries_ask_for_nothing(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/formats/transparent.png", "image/png")
    answer = await client.get(media_id, ["image/webp"])
    assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []
    assert await queued_jobs(settings.redis_url, settings.queue_name) == []
    assert {v.content_type for v in answer.variants if v.name in SMALL} == {"image/webp"}, "WebP is its primary"


async def test_a_videos_webp_is_made_from_the_rendition_its_poster_came_from(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "video/realshort.mp4", "video/mp4")
    first = {v.name: v for v in (await client.get(media_id, WEBP_FIRST)).variants}
    assert {first[name].content_type for name in (*SMALL, "poster")} == {"image/jpeg"}
    assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == [
        "preview:image/webp", "thumbnail:image/webp",
    ]
    assert await queued_jobs(settings.redis_url, settings.queue_name) == [f"formats:{media_id}:v0:q1"]
    # The job reads the smallest rendition, never the original, which may be 500 MiB.
    original = await pool.fetchval("SELECT object_key FROM media WHERE media_id = $1::uuid", media_id)
    (settings.blob_dir / original).unlink()

    async with running_worker(settings):
        variants = await chosen(client, media_id, WEBP_FIRST)
    assert variants["poster"].content_type == "image/jpeg", "the poster has no WebP"
    for name in SMALL:
        webp, jpeg = variants[name], first[name]
        status, body, headers = await fetch(webp.url)
        assert (status, headers["Content-Type"], len(body)) == (200, "image/webp", webp.size_bytes)
        picture = Image.open(io.BytesIO(body))
        assert (picture.format, picture.size) == ("WEBP", (jpeg.width, jpeg.height))
        assert webp.size_bytes < jpeg.size_bytes
        # The same frame as the JPEG's: the poster's, taken from the same rendition.
        status, body, _ = await fetch(jpeg.url)
        assert mean_difference(picture, Image.open(io.BytesIO(body))) < 6, name
    derived = await pool.fetchrow(
        "SELECT m.derived_bytes, (SELECT sum(size_bytes) FROM media_variants v WHERE v.media_id = m.media_id) AS summed "
        "FROM media m WHERE m.media_id = $1::uuid",
        media_id,
    )
    assert derived["derived_bytes"] == derived["summed"]


async def test_a_late_pictures_webp_is_of_the_poster_frame_its_jpeg_is_of(own_queue, auth, user_id, tmp_path):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    # The picture starts 2 s after the sound, black for its first 2 s: the video job searched its
    # poster frame from the picture's start, and the WebPs, searching from the rendition's start
    # (its held first frame), found nothing but black.
    source = make.late_black_lead_in(tmp_path / "late-fade.mp4")
    async with running_worker(settings):
        done = await upload(client.storage, client.md, source.read_bytes(), filename="clip.mp4", content_type="video/mp4")
        item = await settled(client.media, client.md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    first = {v.name: v for v in (await client.get(done.media_id, WEBP_FIRST)).variants}
    async with running_worker(settings):
        variants = await chosen(client, done.media_id, WEBP_FIRST)
    for name in SMALL:
        webp, jpeg = variants[name], first[name]
        assert (webp.content_type, jpeg.content_type) == ("image/webp", "image/jpeg")
        lumas = []
        for variant in (webp, jpeg):
            status, body, _ = await fetch(variant.url)
            assert status == 200
            luma = Image.open(io.BytesIO(body)).convert("L").resize((32, 32))
            lumas.append(sum(luma.get_flattened_data()) / 1024)
        assert lumas[1] > NEAR_BLACK_LUMA, name
        assert lumas[0] == pytest.approx(lumas[1], abs=4), name


async def test_a_reprocess_forgets_the_requests_and_the_stale_job_records_nothing(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/Canon_40D.jpg")
    await client.get(media_id, WEBP_FIRST)
    assert await queued_jobs(settings.redis_url, settings.queue_name) == [f"formats:{media_id}:v0:q1"]
    await client.media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=media_id), metadata=client.md)
    assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []
    async with running_worker(settings):
        item = await settled(client.media, client.md, media_id)
        assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE
        deadline = asyncio.get_running_loop().time() + 30
        while await queued_jobs(settings.redis_url, settings.queue_name):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    rows = await pool.fetch("SELECT content_type, version FROM media_variants WHERE media_id = $1::uuid", media_id)
    assert {r["content_type"] for r in rows} == {"image/jpeg", "image/avif"}
    assert {r["version"] for r in rows} == {1}


async def test_a_job_for_a_deleted_media_or_an_old_run_makes_nothing(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/Canon_40D.jpg")
    await client.get(media_id, WEBP_FIRST)
    async with running_worker(settings) as worker:
        while "library" not in worker.ctx:
            await asyncio.sleep(0.01)
        ctx = worker.ctx
        library: Library = ctx["library"]
        assert await make_formats(ctx, media_id, 7) == "skipped", "no such run"
        await client.media.DeleteMedia(mpb.DeleteMediaRequest(media_id=media_id), metadata=client.md)
        assert await library.formats_to_make(uuid.UUID(media_id), 0) is None
    assert await pool.fetchval(
        "SELECT count(*) FROM media_variants WHERE media_id = $1::uuid AND content_type = 'image/webp'", media_id
    ) == 0


async def test_a_job_for_media_expired_since_its_request_makes_nothing(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/jolla.jpg")
    await client.get(media_id, WEBP_FIRST)
    assert await queued_jobs(settings.redis_url, settings.queue_name) == [f"formats:{media_id}:v0:q1"]
    await pool.execute(
        "UPDATE media SET retention = 'ephemeral', saved_at = NULL, expires_at = now() - interval '1 second' "
        "WHERE media_id = $1::uuid", media_id)
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running_worker(settings):
            # As the transcode claim: formats of media no one can see any more are for no one.
            assert await Job(f"formats:{media_id}:v0:q1", redis, _queue_name=settings.queue_name).result(timeout=60) == "skipped"
    finally:
        await redis.aclose()
    assert await pool.fetchval(
        "SELECT count(*) FROM media_variants WHERE media_id = $1::uuid AND content_type = 'image/webp'", media_id
    ) == 0


async def test_a_job_that_gives_up_withdraws_its_requests_so_they_are_asked_again(own_queue, auth, user_id, pool):
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/jolla.jpg")
    await client.get(media_id, WEBP_FIRST)
    original = await pool.fetchval("SELECT object_key FROM media WHERE media_id = $1::uuid", media_id)
    stored = settings.blob_dir / original
    kept = stored.read_bytes()
    stored.unlink()
    async with running_worker(settings) as worker:
        while "library" not in worker.ctx:
            await asyncio.sleep(0.01)
        retried = {**worker.ctx, "job_try": 1}
        with pytest.raises(Retry):
            await make_formats(retried, media_id, 0)
        assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) != []
        last = {**worker.ctx, "job_try": INFRASTRUCTURE_TRIES}
        assert await make_formats(last, media_id, 0) == "gave up"
        assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []
        stored.write_bytes(kept)
        await client.get(media_id, WEBP_FIRST)
        await chosen(client, media_id, WEBP_FIRST)


async def test_a_request_after_a_job_gave_up_queues_a_job_of_its_own(own_queue, auth, user_id, pool):
    """arq keeps the id of the job that gave up for an hour and ignores a new job under it."""
    settings, channel = own_queue
    client = Client(channel, auth(user_id))
    media_id = await processed(settings, client, "images/camera/jolla.jpg")
    await client.get(media_id, WEBP_FIRST)
    (given_up,) = await queued_jobs(settings.redis_url, settings.queue_name)
    original = settings.blob_dir / await pool.fetchval("SELECT object_key FROM media WHERE media_id = $1::uuid", media_id)
    kept = original.read_bytes()
    original.unlink()
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        # arq's count of the tries before the last: the worker's run is the last, and gives up.
        await redis.set(retry_key_prefix + given_up, INFRASTRUCTURE_TRIES - 1, ex=3600)
        async with running_worker(settings):
            deadline = asyncio.get_running_loop().time() + 30
            while not await redis.exists(result_key_prefix + given_up):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        assert (await Job(given_up, redis).result_info()).result == "gave up"
        assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []

        original.write_bytes(kept)
        await client.get(media_id, WEBP_FIRST)
        queued = await queued_jobs(settings.redis_url, settings.queue_name)
        assert len(queued) == 1, "the request is queued again"
        assert queued != [given_up]
        async with running_worker(settings):
            await chosen(client, media_id, WEBP_FIRST)
    finally:
        await redis.aclose()


async def test_a_request_redis_cannot_queue_is_withdrawn_and_asked_again(make_settings, auth, user_id, pool):
    redis = PrivateRedis()
    redis.start()
    try:
        settings = make_settings(redis_url=redis.url, queue_name=f"formats-redis:{user_id}")
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = Client(channel, auth(user_id))
            media_id = await processed(settings, client, "images/camera/jolla.jpg")
            redis.stop()
            answer = await client.get(media_id, WEBP_FIRST)
            assert {v.content_type for v in answer.variants} == {"image/jpeg"}, "the call still answers"
            assert await pool.fetchval("SELECT requested_formats FROM media WHERE media_id = $1::uuid", media_id) == []
            redis.start()
            await client.get(media_id, WEBP_FIRST)
            # The withdrawn request had number 1; this one has a job id of its own.
            assert await queued_jobs(settings.redis_url, settings.queue_name) == [f"formats:{media_id}:v0:q2"]
            async with running_worker(settings):
                await chosen(client, media_id, WEBP_FIRST)
    finally:
        redis.close()
