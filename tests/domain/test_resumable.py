"""The writer's lease on a resumable upload, straight to PostgreSQL and through PgBouncer (conftest: stack).

The lease is the upload_progress row naming a writer's token until lease_until. The tests stand
in for the other writers (one that died holding it, one that took the upload over) by writing
those two columns, as such a writer's statements would.

And the start of a resumable upload on S3 (moto): its multipart upload is made while no
transaction waits, and recorded once, whatever races or cancels the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import pydantic
import pytest

from mediavault.auth import Principal
from mediavault.blobs.s3 import S3BlobStore
from mediavault.domain import accounts, uploads
from mediavault.domain.uploads.records import partial_key_for
from mediavault.errors import BeyondDeclaredSize, NotFound, UploadBusy
from mediavault.jobs import TranscodeQueue
from tests.helpers import fake_jpeg, sha256_hex
from tests.s3server import MotoServer, moto_server

MiB = 1024 * 1024
LEASE_SECONDS = 2.0

S3_BUCKET = "resumable-test"

SET_LEASE = "UPDATE upload_progress SET writer = $2, lease_until = now() + make_interval(secs => $3) WHERE upload_id = $1"


@pytest.fixture
def pool(stack):
    return stack.pool


@pytest.fixture
def settings(stack):
    return stack.settings.model_copy(
        update={"tus_lease_seconds": LEASE_SECONDS, "tus_chunk_size_bytes": 5 * MiB, "free_quota_bytes": 100 * MiB}
    )


@pytest.fixture
def resumable(pool, blobs, settings) -> uploads.Resumable:
    return uploads.Resumable(pool, blobs, settings)


@pytest.fixture
def service(pool, blobs, settings, resumable) -> uploads.Uploads:
    return uploads.Uploads(pool, blobs, settings, TranscodeQueue(None, settings.queue_name), resumable)


def principal(user_id: str) -> Principal:
    return Principal(user_id, frozenset({"user"}))


async def begin_tus(pool, service: uploads.Uploads, settings, data: bytes) -> tuple[str, uuid.UUID]:
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    await accounts.ensure(pool, user_id, settings.free_quota_bytes)
    request = uploads.BeginRequest("a.jpg", "image/jpeg", len(data), sha256_hex(data), None, "permanent", "tus")
    return user_id, (await service.begin(principal(user_id), request)).upload.upload_id


async def body(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def trickle_deadline() -> float:
    """Until when a test's body trickles: a writer that has not stopped by then gets the rest at once."""
    return asyncio.get_running_loop().time() + 3 * LEASE_SECONDS


async def checkpoint_bytes(pool, upload_id: uuid.UUID) -> int | None:
    return await pool.fetchval("SELECT received_bytes FROM upload_checkpoints WHERE upload_id = $1", upload_id)


async def stored_sha256(service: uploads.Uploads, blobs, user_id: str, upload_id: uuid.UUID) -> str:
    finalized = await service.finalize(principal(user_id), upload_id)
    assert finalized.state == "finalized"
    return sha256_hex(await blobs.read(finalized.object_key))


async def test_a_dead_writers_lease_holds_the_upload_until_it_lapses_then_the_next_goes_on_from_its_checkpoint(
    pool, blobs, settings, resumable, service
):
    data = fake_jpeg(3000, fill=os.urandom(1))
    user_id, upload_id = await begin_tus(pool, service, settings, data)
    assert (await resumable.append(upload_id, body(data[:1000]), offset=0, length=1000)).received_bytes == 1000

    # A writer took the upload, stored bytes past the checkpoint, and died before recording them.
    await pool.execute(SET_LEASE, upload_id, uuid.uuid4(), 1.5)
    with Path(settings.blob_dir, partial_key_for(upload_id)).open("ab") as partial:
        partial.write(b"never recorded")

    with pytest.raises(UploadBusy):
        await resumable.append(upload_id, body(data[1000:]), offset=1000, length=2000)
    with pytest.raises(UploadBusy):
        await resumable.append(upload_id, body(data[1000:]), owner=user_id)
    # Another user's caller learns nothing of the upload, busy or not.
    with pytest.raises(NotFound):
        await resumable.append(upload_id, body(data[1000:]), owner="someone-else")
    # Busy for as long as the lease runs, as PostgreSQL's clock tells (with room for one try).
    while await pool.fetchval("SELECT lease_until - now() > interval '0.3 s' FROM upload_progress WHERE upload_id = $1", upload_id):
        with pytest.raises(UploadBusy):
            await resumable.append(upload_id, body(data[1000:]), offset=1000, length=2000)
        await asyncio.sleep(0.1)
    assert await checkpoint_bytes(pool, upload_id) == 1000

    while await pool.fetchval("SELECT lease_until > now() FROM upload_progress WHERE upload_id = $1", upload_id):
        await asyncio.sleep(0.05)
    done = await resumable.append(upload_id, body(data[1000:]), offset=1000, length=2000)
    assert done.received_bytes == 3000
    assert await pool.fetchval("SELECT writer IS NULL AND lease_until IS NULL FROM upload_progress WHERE upload_id = $1", upload_id)
    assert await stored_sha256(service, blobs, user_id, upload_id) == sha256_hex(data)


@pytest.mark.parametrize("found_by", ["renewal", "checkpoint"])
async def test_a_writer_whose_lease_is_taken_mid_chunk_stops_and_records_nothing(
    pool, blobs, settings, service, found_by
):
    data = fake_jpeg(6 * MiB, fill=os.urandom(1))
    user_id, upload_id = await begin_tus(pool, service, settings, data)
    # Found by a renewal while the bytes trickle in; or, with a lease no renewal comes due in,
    # by the checkpoint at 5 MiB (the chunk size on fs).
    lease_seconds = LEASE_SECONDS if found_by == "renewal" else 300.0
    resumable = uploads.Resumable(pool, blobs, settings.model_copy(update={"tus_lease_seconds": lease_seconds}))
    thief = uuid.uuid4()
    sent = 0

    async def stolen_mid_chunk() -> AsyncIterator[bytes]:
        nonlocal sent
        yield data[:MiB]
        sent = MiB
        async with pool.acquire() as conn, conn.transaction():
            # A takeover is one short UPDATE: it waits on no writer.
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            await conn.execute(SET_LEASE, upload_id, thief, 3600.0)
        if found_by == "renewal":
            until = trickle_deadline()
            while asyncio.get_running_loop().time() < until:
                await asyncio.sleep(0.05)
                yield data[sent : sent + 1000]
                sent += 1000
        yield data[sent:]
        sent = len(data)

    started = asyncio.get_running_loop().time()
    with pytest.raises(UploadBusy):
        await resumable.append(upload_id, stolen_mid_chunk(), offset=0, length=len(data))
    if found_by == "renewal":
        # Stopped at the first renewal after the theft (every quarter of the lease), not at the body's end.
        assert asyncio.get_running_loop().time() - started < LEASE_SECONDS
        assert sent < MiB + 100_000
    assert await checkpoint_bytes(pool, upload_id) is None, "nothing the writer stored is recorded"
    assert await pool.fetchval("SELECT writer FROM upload_progress WHERE upload_id = $1", upload_id) == thief, (
        "the writer gave back no lease it no longer held"
    )

    # Once the thief lets go, the upload starts over from its last checkpoint (none: offset 0).
    await pool.execute("UPDATE upload_progress SET writer = NULL, lease_until = NULL WHERE upload_id = $1", upload_id)
    assert (await resumable.append(upload_id, body(data), offset=0, length=len(data))).received_bytes == len(data)
    assert await stored_sha256(service, blobs, user_id, upload_id) == sha256_hex(data)


async def test_a_writer_whose_renewals_do_not_get_through_stops_before_its_lease_could_lapse(
    pool, blobs, settings, resumable, service
):
    data = fake_jpeg(MiB, fill=os.urandom(1))
    user_id, upload_id = await begin_tus(pool, service, settings, data)
    loop = asyncio.get_running_loop()
    row_locked = asyncio.Event()
    last_read = loop.time()

    async def trickle() -> AsyncIterator[bytes]:
        nonlocal last_read
        yield data[:1000]
        row_locked.set()
        sent, until = 1000, trickle_deadline()
        while loop.time() < until:
            await asyncio.sleep(0.05)
            last_read = loop.time()
            yield data[sent : sent + 1000]
            sent += 1000
        yield data[sent:]

    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            writing = asyncio.create_task(resumable.append(upload_id, trickle(), offset=0, length=len(data)))
            await row_locked.wait()
            # The renewals wait behind this lock, as they would for a database that stopped answering.
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            await conn.execute("SELECT 1 FROM upload_progress WHERE upload_id = $1 FOR UPDATE", upload_id)
            locked_at = loop.time()
            while loop.time() - last_read < 0.3:
                assert loop.time() - locked_at < LEASE_SECONDS, "the writer still reads its body"
                await asyncio.sleep(0.05)
            assert last_read - locked_at < LEASE_SECONDS * 2 / 3 + 0.2
            assert await conn.fetchval("SELECT lease_until > now() FROM upload_progress WHERE upload_id = $1", upload_id), (
                "the writer stopped while its lease still ran: no other writer could have taken the upload yet"
            )
        finally:
            await transaction.rollback()
    with pytest.raises(UploadBusy):
        await asyncio.wait_for(writing, timeout=LEASE_SECONDS)
    assert await checkpoint_bytes(pool, upload_id) is None


async def test_a_chunk_at_the_end_of_a_complete_upload_leaves_nothing_a_concurrent_finalize_could_publish(
    pool, blobs, settings, resumable, service
):
    """On fs, an empty chunk at the end of a complete upload (a PATCH repeated, an UploadContent
    stream without chunks) that came after a finalize had published the bytes made a new partial
    file of the upload's size, all zeros; a finalize that had found no object before that publish
    then published it in the object's place, and committed the checkpoint's digest over zeros."""
    data = fake_jpeg(3000, fill=os.urandom(1))
    user_id, upload_id = await begin_tus(pool, service, settings, data)
    assert (await resumable.append(upload_id, body(data), offset=0, length=len(data))).received_bytes == len(data)
    # A finalize publishes the bytes; its commit has not come yet.
    assert await resumable.observe(upload_id, user_id) is not None

    assert (await resumable.append(upload_id, body(), offset=len(data), length=0)).received_bytes == len(data)
    assert (await resumable.append(upload_id, body(b""), owner=user_id)).received_bytes == len(data)
    with pytest.raises(BeyondDeclaredSize):
        await resumable.append(upload_id, body(b"x"), offset=len(data))
    assert not Path(settings.blob_dir, partial_key_for(upload_id)).exists()

    # A concurrent finalize that looked for the object before the first one published it.
    await resumable.observe(upload_id, user_id)
    assert await stored_sha256(service, blobs, user_id, upload_id) == sha256_hex(data)


@pytest.mark.parametrize("seconds", [1.9, 300.1])
def test_the_lease_length_is_bounded(make_settings, seconds):
    with pytest.raises(pydantic.ValidationError, match="tus_lease_seconds"):
        make_settings(tus_lease_seconds=seconds)



@pytest.fixture(scope="module")
async def moto() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


@pytest.fixture
def s3_settings(settings, moto):
    return settings.model_copy(update={"blob_backend": "s3", "s3_endpoint_url": moto.endpoint_url, "s3_bucket": S3_BUCKET})


@pytest.fixture
async def s3_store(s3_settings) -> AsyncIterator[S3BlobStore]:
    """An S3 store of the test's own on the module's moto server, the bucket made."""
    store = await S3BlobStore.open(s3_settings)
    await store.ensure_bucket()
    yield store
    await store.close()


@pytest.fixture
def s3_service(pool, s3_settings, s3_store) -> uploads.Uploads:
    resumable = uploads.Resumable(pool, s3_store, s3_settings)
    return uploads.Uploads(pool, s3_store, s3_settings, TranscodeQueue(None, s3_settings.queue_name), resumable)


def begin_on_s3(service: uploads.Uploads, user_id: str, protocol: str, idempotency_key: str | None = None):
    request = uploads.BeginRequest("a.jpg", "image/jpeg", 1000, None, idempotency_key, "permanent", protocol)
    return service.begin(principal(user_id), request)


def multipart_uploads(moto: MotoServer, key: str) -> list[str]:
    """The ids of the multipart uploads S3 holds for key, as ListMultipartUploads tells."""
    client = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
    listed = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=key)
    return [upload["UploadId"] for upload in listed.get("Uploads", [])]


async def recorded_multipart_id(pool, upload_id: uuid.UUID) -> str | None:
    return await pool.fetchval("SELECT multipart_id FROM upload_progress WHERE upload_id = $1", upload_id)


async def test_begins_waiting_on_s3_hold_no_connection_in_a_transaction(pool, moto, s3_store, s3_service, monkeypatch):
    waiting, answer = asyncio.Event(), asyncio.Event()
    calls = 0
    create = s3_store.start_partial

    async def slow(key: str, *, content_type: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 3:
            waiting.set()
        await answer.wait()  # S3 browning out: CreateMultipartUpload takes its time
        return await create(key, content_type=content_type)

    monkeypatch.setattr(s3_store, "start_partial", slow)
    users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    begins = asyncio.gather(*(begin_on_s3(s3_service, user, "tus") for user in users))
    try:
        async with asyncio.timeout(10):
            await waiting.wait()
        # Behind PgBouncer each of these would be a server connection no other client can have.
        idle = await pool.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
        )
        assert [row["query"] for row in idle] == []
    finally:
        answer.set()
        begun = await begins
    for result in begun:
        multipart_id = await recorded_multipart_id(pool, result.upload.upload_id)
        assert multipart_uploads(moto, result.upload.object_key) == [multipart_id]


async def test_racing_starts_record_one_multipart_upload_and_abort_the_other(pool, moto, s3_store, s3_service, monkeypatch):
    made: list[str | None] = []
    both = asyncio.Event()
    create = s3_store.start_partial

    async def together(key: str, *, content_type: str) -> str | None:
        multipart_id = await create(key, content_type=content_type)
        made.append(multipart_id)
        if len(made) == 2:
            both.set()
        # Each start is answered once both have made theirs (or after a while, should one never come).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await both.wait()
        return multipart_id

    monkeypatch.setattr(s3_store, "start_partial", together)
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    # A client's retry with the same key while its first call is still on its way.
    first, second = await asyncio.gather(
        begin_on_s3(s3_service, user_id, "s3_multipart", "k"), begin_on_s3(s3_service, user_id, "s3_multipart", "k")
    )

    assert first.upload.upload_id == second.upload.upload_id
    assert len(made) == 2, "both starts made a multipart upload"
    multipart_id = await recorded_multipart_id(pool, first.upload.upload_id)
    assert multipart_id in made
    assert multipart_uploads(moto, first.upload.object_key) == [multipart_id]


def answer_held_back(s3_store, monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """(made, answer): S3 makes each multipart upload at once (made is set), and its answer comes
    back only once answer is set."""
    made, answer = asyncio.Event(), asyncio.Event()
    create = s3_store.start_partial

    async def slow_answer(key: str, *, content_type: str) -> str | None:
        multipart_id = await create(key, content_type=content_type)
        made.set()
        await answer.wait()
        return multipart_id

    monkeypatch.setattr(s3_store, "start_partial", slow_answer)
    return made, answer


@pytest.mark.parametrize("idempotency_key", [None, "k"])
async def test_a_begin_cancelled_while_s3_answers_leaves_no_multipart_upload_behind(
    pool, moto, s3_store, s3_service, monkeypatch, idempotency_key
):
    made, answer = answer_held_back(s3_store, monkeypatch)
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    beginning = asyncio.create_task(begin_on_s3(s3_service, user_id, "s3_multipart", idempotency_key))
    async with asyncio.timeout(10):
        await made.wait()
    beginning.cancel()  # the client gave up
    await asyncio.sleep(0.2)
    answer.set()
    await asyncio.wait([beginning])

    assert beginning.cancelled()
    upload_id, key, state = await pool.fetchrow("SELECT upload_id, object_key, state FROM uploads WHERE user_id = $1", user_id)
    if idempotency_key is None:
        # Released, since no retry could find it, and its multipart upload aborted with it.
        assert state == "failed"
        assert multipart_uploads(moto, key) == []
    else:
        # Kept for the retry with the key, which finds its multipart upload started.
        assert state == "pending"
        multipart_id = await recorded_multipart_id(pool, upload_id)
        assert multipart_uploads(moto, key) == [multipart_id]
        retried = await begin_on_s3(s3_service, user_id, "s3_multipart", idempotency_key)
        assert retried.upload.upload_id == upload_id
        assert multipart_uploads(moto, key) == [multipart_id]


async def test_a_begin_released_while_its_start_waits_on_s3_records_no_multipart_upload(pool, moto, s3_store, s3_service, monkeypatch):
    made, answer = answer_held_back(s3_store, monkeypatch)
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    beginning = asyncio.create_task(begin_on_s3(s3_service, user_id, "s3_multipart", None))
    async with asyncio.timeout(10):
        await made.wait()
    # Cancelled twice (the client, then a draining server): the begin releases the upload while
    # its start still waits for S3's answer.
    beginning.cancel()
    await asyncio.sleep(0.1)
    beginning.cancel()
    await asyncio.wait([beginning], timeout=10)
    upload_id, key, state = await pool.fetchrow("SELECT upload_id, object_key, state FROM uploads WHERE user_id = $1", user_id)
    assert state == "failed"
    answer.set()
    async with asyncio.timeout(10):
        while multipart_uploads(moto, key):
            await asyncio.sleep(0.05)
    assert await recorded_multipart_id(pool, upload_id) is None
