"""jobs.enqueue_transcode and TranscodeQueue against a real Redis and a real arq worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import Job, JobStatus, deserialize_job_raw
from arq.version import VERSION
from arq.worker import Worker, func

from mediavault import jobs, metrics
from mediavault.domain.feed import VERSION_TTL_SECONDS, version_key


@pytest.fixture
async def queue(redis_url: str, user_id: str) -> AsyncIterator[ArqRedis]:
    queue_name = f"test-jobs:{uuid.uuid4().hex}"
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue_name)
    yield redis
    job_keys = [key async for key in redis.scan_iter(f"arq:*{MEDIA_PREFIX}*")]
    await redis.delete(queue_name, version_key(user_id), *job_keys)
    await redis.aclose()


# Every media id of this module starts so, which lets the fixture find the arq keys it made.
MEDIA_PREFIX = "7e57"


def _media_id() -> uuid.UUID:
    return uuid.UUID(MEDIA_PREFIX + uuid.uuid4().hex[4:])


async def _run_worker(redis_url: str, queue: ArqRedis) -> list[tuple]:
    """Runs every queued job with a real arq worker (burst mode, its own connections); returns the calls it made."""
    calls = []

    async def transcode_media(ctx, media_id: str, version: int) -> str:
        calls.append((ctx["job_id"], media_id, version))
        return "done"

    worker = Worker(
        functions=[func(transcode_media, name=jobs.TRANSCODE)],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=queue.default_queue_name,
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
    )
    try:
        await worker.main()
    finally:
        await worker.close()
    return calls


async def test_an_enqueued_run_is_the_job_arq_would_have_queued_and_a_worker_runs_it(queue: ArqRedis, redis_url: str, user_id: str):
    media_id = _media_id()
    assert await jobs.enqueue_transcode(queue, media_id, 2, feed_owner=user_id)

    job_id = jobs.transcode_job_id(media_id, 2)
    info = await Job(job_id, queue, _queue_name=queue.default_queue_name).info()
    assert (info.function, info.args, info.kwargs, info.job_try) == (jobs.TRANSCODE, (str(media_id), 2), {}, None)
    # arq's default expiry: the job may wait a day before it is dropped unrun.
    ttl_ms = await queue.pttl(job_key_prefix + job_id)
    assert queue.expires_extra_ms - 60_000 < ttl_ms <= queue.expires_extra_ms
    assert int(await queue.get(version_key(user_id))) == 1
    assert VERSION_TTL_SECONDS - 60 < await queue.ttl(version_key(user_id)) <= VERSION_TTL_SECONDS

    assert await _run_worker(redis_url, queue) == [(job_id, str(media_id), 2)]
    assert await Job(job_id, queue).status() == JobStatus.complete


async def test_a_known_job_id_is_not_queued_again_but_the_feed_is_bumped_each_time(queue: ArqRedis, redis_url: str, user_id: str):
    media_id = _media_id()
    for _ in range(3):
        assert await jobs.enqueue_transcode(queue, media_id, 0, feed_owner=user_id)
    assert await queue.zcard(queue.default_queue_name) == 1
    assert int(await queue.get(version_key(user_id))) == 3

    assert len(await _run_worker(redis_url, queue)) == 1
    # Finished: arq keeps the result, and the same id stays a no-op for keep_result seconds.
    assert await jobs.enqueue_transcode(queue, media_id, 0)
    assert await queue.zcard(queue.default_queue_name) == 0
    assert await _run_worker(redis_url, queue) == []
    # A re-enqueue by the stuck sweep has an id of its own.
    assert await jobs.enqueue_transcode(queue, media_id, 0, requeue=1)
    assert [call[0] for call in await _run_worker(redis_url, queue)] == [jobs.transcode_job_id(media_id, 0, 1)]
    assert int(await queue.get(version_key(user_id))) == 3


async def test_without_a_feed_owner_no_feed_version_changes(queue: ArqRedis, redis_url: str, user_id: str):
    assert await jobs.enqueue_transcode(queue, _media_id(), 0)
    assert await queue.get(version_key(user_id)) is None


async def test_the_script_is_loaded_again_after_redis_forgets_it(queue: ArqRedis, redis_url: str, user_id: str):
    await queue.script_flush()
    media_id = _media_id()
    assert await jobs.enqueue_transcode(queue, media_id, 0, feed_owner=user_id)
    assert await queue.zcard(queue.default_queue_name) == 1
    assert int(await queue.get(version_key(user_id))) == 1


async def test_redis_down_returns_false_and_counts_both_fallbacks():
    unreachable = ArqRedis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    enqueue_fallbacks = metrics.REDIS_FALLBACKS.labels("enqueue_transcode")
    feed_fallbacks = metrics.REDIS_FALLBACKS.labels("feed_invalidate")
    before = enqueue_fallbacks._value.get(), feed_fallbacks._value.get()
    try:
        assert await jobs.enqueue_transcode(unreachable, _media_id(), 0, feed_owner="someone") is False
    finally:
        await unreachable.aclose()
    assert (enqueue_fallbacks._value.get(), feed_fallbacks._value.get()) == (before[0] + 1, before[1] + 1)


async def test_no_redis_configured_returns_false():
    assert await jobs.enqueue_transcode(None, _media_id(), 0) is False


async def test_concurrent_runs_of_the_transcode_queue_go_together_and_each_is_queued_once(
    queue: ArqRedis, redis_url: str, user_id: str
):
    transcodes = jobs.TranscodeQueue(queue, queue.default_queue_name)
    media_ids = [_media_id() for _ in range(30)]
    # Every media twice (a retried finalize), a third of them for the owner's feed.
    results = await asyncio.gather(
        *(transcodes.enqueue(m, 0, feed_owner=user_id if i % 3 == 0 else None) for i, m in enumerate(media_ids * 2))
    )
    assert results == [True] * 60
    assert await queue.zcard(queue.default_queue_name) == 30
    assert int(await queue.get(version_key(user_id))) == 20
    calls = await _run_worker(redis_url, queue)
    assert sorted(call[1] for call in calls) == sorted(str(m) for m in media_ids)


async def test_the_transcode_queue_with_redis_down_or_absent_returns_false():
    unreachable = ArqRedis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    fallbacks = metrics.REDIS_FALLBACKS.labels("enqueue_transcode")
    before = fallbacks._value.get()
    try:
        results = await asyncio.gather(*(jobs.TranscodeQueue(unreachable, unreachable.default_queue_name).enqueue(_media_id(), 0) for _ in range(3)))
    finally:
        await unreachable.aclose()
    assert results == [False] * 3
    assert fallbacks._value.get() == before + 3
    assert await jobs.TranscodeQueue(None, "unused").enqueue(_media_id(), 0) is False


async def test_a_formats_request_whose_job_id_arq_already_holds_is_not_reported_queued(queue: ArqRedis):
    transcodes = jobs.TranscodeQueue(queue, queue.default_queue_name)
    media_id = _media_id()
    assert await transcodes.enqueue_formats(media_id, 0, 1)
    assert await transcodes.enqueue_formats(media_id, 0, 1) is False
    assert await transcodes.enqueue_formats(media_id, 0, 2)
    assert await queue.zcard(queue.default_queue_name) == 2


async def test_the_enqueue_script_writes_what_arq_enqueue_job_writes(queue: ArqRedis, redis_url: str):
    """The script mirrors arq's enqueue protocol; a newer arq that changes it fails here, not in production."""
    assert VERSION in jobs.MIRRORED_ARQ_VERSIONS, f"arq {VERSION}: compare jobs._ENQUEUE with ArqRedis.enqueue_job"
    media_id = _media_id()
    ours = jobs.transcode_job_id(media_id, 0)
    theirs = f"{ours}:arq"
    assert await jobs.enqueue_transcode(queue, media_id, 0)
    assert await queue.enqueue_job(jobs.TRANSCODE, str(media_id), 0, _job_id=theirs) is not None

    async def written(job_id: str) -> dict[str, object]:
        keys = sorted([key.decode() async for key in queue.scan_iter(f"arq:*{job_id}")])
        return {key.replace(job_id, "<id>"): await queue.type(key) for key in keys if key.endswith(job_id)}

    assert await written(ours) == await written(theirs) == {job_key_prefix + "<id>": b"string"}
    our_job = deserialize_job_raw(await queue.get(job_key_prefix + ours))
    their_job = deserialize_job_raw(await queue.get(job_key_prefix + theirs))
    # (function, args, kwargs, job_try, enqueue_time_ms): the same but for the moment of enqueueing.
    assert our_job[:4] == their_job[:4]
    assert abs(our_job[4] - their_job[4]) < 5_000
    assert abs(await queue.pttl(job_key_prefix + ours) - await queue.pttl(job_key_prefix + theirs)) < 5_000
    scores = dict(await queue.zrange(queue.default_queue_name, 0, -1, withscores=True))
    assert set(scores) == {ours.encode(), theirs.encode()}
    assert abs(scores[ours.encode()] - scores[theirs.encode()]) < 5_000

    # Each refuses a job id the other queued, and one whose result arq still keeps.
    assert await queue.enqueue_job(jobs.TRANSCODE, str(media_id), 0, _job_id=ours) is None
    finished = _media_id()
    await queue.set(result_key_prefix + jobs.transcode_job_id(finished, 0), b"done")
    assert await jobs.enqueue_transcode(queue, finished, 0)
    assert await queue.enqueue_job(jobs.TRANSCODE, str(finished), 0, _job_id=jobs.transcode_job_id(finished, 0)) is None
    assert await queue.zcard(queue.default_queue_name) == 2
