"""Uploads: concurrent BeginUploads reserved together, and finalize's guarded commit, batched or alone."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from mediavault.auth import Principal
from mediavault.blobs import single_chunk
from mediavault.blobs.s3 import S3BlobStore
from mediavault.domain import accounts, ledger, uploads
from mediavault.errors import (
    AccountFrozen,
    BlobStoreUnavailable,
    NotFound,
    StorageLimitReached,
    UploadNotPending,
    VerificationFailed,
)
from mediavault.jobs import TranscodeQueue
from tests.helpers import put
from tests.s3server import MotoServer, moto_server

SIZE = 1000


# Run straight to PostgreSQL and through PgBouncer in transaction mode (tests/conftest.py: stack).
@pytest.fixture
def pool(stack):
    return stack.pool


@pytest.fixture
def settings(stack):
    return stack.settings.model_copy(update={"free_quota_bytes": 10 * SIZE})


@pytest.fixture
def service(pool, blobs, settings) -> uploads.Uploads:
    return uploads.Uploads(pool, blobs, settings, TranscodeQueue(None, settings.queue_name), uploads.Resumable(pool, blobs, settings))


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def principal(user_id: str) -> Principal:
    return Principal(user_id, frozenset({"user"}))


def begin(service: uploads.Uploads, user_id: str, size: int = SIZE, content_type: str = "image/jpeg",
          sha256: str | None = None, protocol: str = "single", idempotency_key: str | None = None):
    request = uploads.BeginRequest(
        filename="a.jpg", content_type=content_type, size_bytes=size, sha256=sha256, idempotency_key=idempotency_key,
        retention="permanent", protocol=protocol,
    )
    return service.begin(principal(user_id), request)


async def reserved_bytes(pool, user_id: str) -> int | None:
    return await pool.fetchval("SELECT reserved_bytes FROM accounts WHERE user_id = $1", user_id)


async def test_concurrent_begins_of_many_accounts_are_all_reserved(pool, blobs, settings, service):
    users = [new_user() for _ in range(20)]
    for user in users:
        await accounts.ensure(pool, user, settings.free_quota_bytes)

    results = await asyncio.gather(*(begin(service, u) for u in users for _ in range(3)))

    assert len({r.upload.upload_id for r in results}) == 60
    assert all(r.upload.state == "pending" and r.upload_url for r in results)
    for user in users:
        assert await reserved_bytes(pool, user) == 3 * SIZE
        assert await pool.fetchval(
            "SELECT count(*) FROM uploads WHERE user_id = $1 AND state = 'pending'", user
        ) == 3
    assert await ledger.audit(pool) == []


async def test_a_batch_gives_each_call_the_answer_it_would_get_alone(pool, blobs, settings, service):
    roomy, frozen, newcomer, nearly_full = new_user(), new_user(), new_user(), new_user()
    for user in (roomy, frozen, nearly_full):
        await accounts.ensure(pool, user, settings.free_quota_bytes)
    await accounts.Accounts(pool, settings.free_quota_bytes).freeze(frozen, "abuse")
    # Room for one more upload of SIZE: the two below do not fit together, one of them does.
    await pool.execute("UPDATE accounts SET quota_bytes = $2 WHERE user_id = $1", nearly_full, SIZE)
    await pool.execute(
        "INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ($1, 'grant', $2)",
        nearly_full, SIZE - settings.free_quota_bytes,
    )

    calls = [
        begin(service, roomy),
        begin(service, frozen),
        begin(service, newcomer),
        begin(service, nearly_full),
        begin(service, nearly_full),
    ]
    roomy_result, frozen_result, newcomer_result, *nearly_full_results = await asyncio.gather(
        *calls, return_exceptions=True
    )

    assert roomy_result.upload.user_id == roomy
    assert isinstance(frozen_result, AccountFrozen)
    assert newcomer_result.upload.user_id == newcomer
    assert await reserved_bytes(pool, newcomer) == SIZE
    placed = [r for r in nearly_full_results if isinstance(r, uploads.BeginResult)]
    refused = [r for r in nearly_full_results if isinstance(r, StorageLimitReached)]
    assert len(placed) == 1
    assert len(refused) == 1
    assert await reserved_bytes(pool, nearly_full) == SIZE
    assert await reserved_bytes(pool, frozen) == 0
    assert await ledger.audit(pool) == []


async def test_an_account_locked_elsewhere_does_not_hold_up_the_batch(pool, blobs, settings, service):
    busy, others = new_user(), [new_user() for _ in range(3)]
    for user in (busy, *others):
        await accounts.ensure(pool, user, settings.free_quota_bytes)

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", busy)
        waiting = asyncio.create_task(begin(service, busy))
        await asyncio.sleep(0.2)  # alone in its batch, then left to wait for the lock on its own
        done = await asyncio.wait_for(
            asyncio.gather(*(begin(service, u) for u in others)), timeout=10
        )
        assert [r.upload.user_id for r in done] == others
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the locked account's upload cannot be reserved while the lock is held"

    result = await asyncio.wait_for(waiting, timeout=10)
    assert result.upload.user_id == busy
    assert await reserved_bytes(pool, busy) == SIZE
    assert await ledger.audit(pool) == []


async def test_a_failed_statement_fails_every_call_in_its_batch(pool, blobs, settings, service):
    users = [new_user() for _ in range(3)]
    for user in users:
        await accounts.ensure(pool, user, settings.free_quota_bytes)
    # A reservation TTL past what an interval can hold makes the statement itself fail.
    broken = settings.model_copy(update={"reservation_ttl_seconds": 10**300})
    broken_service = uploads.Uploads(pool, blobs, broken, TranscodeQueue(None, broken.queue_name), uploads.Resumable(pool, blobs, broken))

    results = await asyncio.gather(
        *(begin(broken_service, u) for u in users), return_exceptions=True
    )

    assert all(isinstance(r, Exception) for r in results)
    for user in users:
        assert await reserved_bytes(pool, user) == 0
    later = await begin(service, users[0])
    assert later.upload.user_id == users[0]


async def test_a_begin_the_blob_store_cannot_start_releases_what_no_retry_could_find(pool, settings, monkeypatch):
    user_id = new_user()
    async with moto_server() as moto:
        s3 = settings.model_copy(
            update={"blob_backend": "s3", "s3_endpoint_url": moto.endpoint_url, "s3_bucket": f"begin-{uuid.uuid4().hex[:12]}"}
        )
        store = await S3BlobStore.open(s3)
        try:
            await store.ensure_bucket()
            service = uploads.Uploads(pool, store, s3, TranscodeQueue(None, s3.queue_name), uploads.Resumable(pool, store, s3))
            await moto.stop()
            sent = s3_requests(store, monkeypatch)

            keyless, keyed = await asyncio.gather(
                begin(service, user_id, protocol="s3_multipart"),
                begin(service, user_id, protocol="s3_multipart", idempotency_key="k"),
                return_exceptions=True,
            )

            assert isinstance(keyless, BlobStoreUnavailable)
            assert isinstance(keyed, BlobStoreUnavailable)
            # No retry could find the upload without a key again; the one with a key waits for its retry.
            assert await reserved_bytes(pool, user_id) == SIZE
            rows = await pool.fetch("SELECT * FROM uploads WHERE user_id = $1", user_id)
            assert {row["idempotency_key"]: (row["state"], row["failure_reason"]) for row in rows} == {
                None: ("failed", "BEGIN_FAILED"),
                "k": ("pending", None),
            }
            assert await ledger.audit(pool) == []
            # The answer waited on the failing store for the start alone: nothing else was stored to undo.
            assert sent == ["CreateMultipartUpload"] * 2

            await moto.start()
            await store.ensure_bucket()
            retried = await begin(service, user_id, protocol="s3_multipart", idempotency_key="k")
            assert retried.upload.upload_id == next(row["upload_id"] for row in rows if row["idempotency_key"] == "k")
            assert await pool.fetchval("SELECT multipart_id FROM upload_progress WHERE upload_id = $1", retried.upload.upload_id)
            assert await reserved_bytes(pool, user_id) == SIZE
        finally:
            await store.close()


async def test_a_begin_cancelled_while_its_upload_starts_keeps_nothing_reserved(pool, service):
    user_id = new_user()
    async with pool.acquire() as conn, conn.transaction():
        # Holds every resumable upload's start (its progress row) after its reservation.
        await conn.execute("LOCK TABLE upload_progress IN SHARE MODE")
        beginning = asyncio.create_task(begin(service, user_id, protocol="tus"))
        async with asyncio.timeout(10):
            while not await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert not beginning.done(), "the start waits for the lock"
        beginning.cancel()
        await asyncio.wait([beginning])

        assert beginning.cancelled()
        assert await reserved_bytes(pool, user_id) == 0
        ended = await pool.fetchrow("SELECT state, failure_reason FROM uploads WHERE user_id = $1", user_id)
        assert tuple(ended) == ("failed", "BEGIN_FAILED")
    assert await ledger.audit(pool) == []


async def test_a_begin_cancelled_while_its_reservation_is_written_keeps_nothing_reserved(pool, service):
    user_id = new_user()
    await accounts.ensure(pool, user_id, 10 * SIZE)
    async with pool.acquire() as conn, conn.transaction():
        # Holds every reservation's statement at its upload row, after the account's figures.
        await conn.execute("LOCK TABLE uploads IN SHARE MODE")
        beginning = asyncio.create_task(begin(service, user_id))
        await asyncio.sleep(0.3)
        assert not beginning.done(), "the reservation waits for the lock"
        # The client's deadline passes, or a draining server sheds the call: no answer names the upload.
        beginning.cancel()
    # The statement goes on without the call, and may commit: what it reserved no retry could find again.
    await asyncio.wait([beginning], timeout=10)
    assert beginning.cancelled()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ended = await pool.fetchrow("SELECT state, failure_reason FROM uploads WHERE user_id = $1", user_id)
        if ended is not None and ended["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert ended is not None
    assert tuple(ended) == ("failed", "BEGIN_FAILED")
    assert await reserved_bytes(pool, user_id) == 0
    assert await ledger.audit(pool) == []


async def test_a_replayed_key_of_a_lapsed_upload_expires_it_and_gets_no_url(pool, service):
    user_id = new_user()
    first = await begin(service, user_id, idempotency_key="k")
    # Past its reservation, before the expiry run came by.
    await pool.execute("UPDATE uploads SET expires_at = now() - interval '1 second' WHERE upload_id = $1", first.upload.upload_id)

    replay = await begin(service, user_id, idempotency_key="k")

    assert (replay.upload.upload_id, replay.upload.state, replay.upload.failure_reason) == (
        first.upload.upload_id, "expired", "EXPIRED"
    )
    assert (replay.upload_url, replay.upload_method, replay.upload_headers) == ("", "", {})
    assert (await service.get(principal(user_id), first.upload.upload_id)).state == "expired"
    assert await reserved_bytes(pool, user_id) == 0
    assert await ledger.audit(pool) == []


async def test_a_replayed_url_expires_with_the_reservation(pool, stack, settings):
    # The server's store signs URLs its listener takes.
    blobs = stack.server.blobs
    service = uploads.Uploads(pool, blobs, settings, TranscodeQueue(None, settings.queue_name), uploads.Resumable(pool, blobs, settings))
    user_id = new_user()
    sha256 = hashlib.sha256(JPEG_BYTES).hexdigest()
    first = await begin(service, user_id, sha256=sha256, idempotency_key="k")
    await pool.execute("UPDATE uploads SET expires_at = now() + interval '2 seconds' WHERE upload_id = $1", first.upload.upload_id)

    replay = await begin(service, user_id, sha256=sha256, idempotency_key="k")
    assert replay.upload.state == "pending"
    # The listener's expiry is in whole seconds.
    await asyncio.sleep(replay.upload.expires_at.timestamp() + 1.1 - time.time())

    assert await put(replay.upload_url, replay.upload_headers, JPEG_BYTES) == 403
    assert await blobs.stat(first.upload.object_key) is None


# ftyp boxes: major brand, minor version, compatible brands.
HEIF_BYTES = (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic" + b"\0" * SIZE)[:SIZE]
QUICKTIME_BYTES = (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\0" * SIZE)[:SIZE]
JPEG_BYTES = (b"\xff\xd8\xff\xe0" + b"\x5a" * SIZE)[:SIZE]


@pytest.mark.parametrize(
    ("declared", "data", "kind"),
    [("image/jpeg", JPEG_BYTES, "image"), ("image/heic", HEIF_BYTES, "image"), ("video/mp4", QUICKTIME_BYTES, "video")],
)
async def test_finalize_commits_an_object_of_the_declared_family_in_one_statement(pool, blobs, settings, service, declared, data, kind):
    user_id = new_user()
    begun = await begin(service, user_id, content_type=declared, sha256=hashlib.sha256(data).hexdigest())
    await blobs.write(begun.upload.object_key, single_chunk(data), content_type=declared)

    done = await service.finalize(principal(user_id), begun.upload.upload_id)
    assert done.state == "finalized"
    media = await pool.fetchrow("SELECT kind, content_type, sha256 FROM media WHERE media_id = $1", done.media_id)
    assert tuple(media) == (kind, declared, hashlib.sha256(data).hexdigest())
    assert await pool.fetchrow("SELECT used_bytes, reserved_bytes FROM accounts WHERE user_id = $1", user_id) == (SIZE, 0)
    assert await ledger.audit(pool) == []
    again = await service.finalize(principal(user_id), begun.upload.upload_id)
    assert again == done
    assert await pool.fetchval("SELECT count(*) FROM media WHERE upload_id = $1", done.upload_id) == 1


async def test_an_uploaded_object_of_another_user_is_not_committed_by_the_intruder(pool, blobs, settings, service):
    owner = new_user()
    begun = await begin(service, owner)
    await blobs.write(begun.upload.object_key, single_chunk(JPEG_BYTES), content_type="image/jpeg")

    with pytest.raises(NotFound):
        await service.finalize(principal(new_user()), begun.upload.upload_id)
    assert (await service.get(principal(owner), begun.upload.upload_id)).state == "pending"
    assert (await service.finalize(principal(owner), begun.upload.upload_id)).state == "finalized"


@pytest.mark.parametrize(
    ("declared_sha256", "data", "reason"),
    [
        (hashlib.sha256(JPEG_BYTES).hexdigest(), JPEG_BYTES[:-1] + b"\x00", "CHECKSUM_MISMATCH"),
        (None, HEIF_BYTES, "UNSUPPORTED_MEDIA_TYPE"),
        (None, JPEG_BYTES[: SIZE // 2], "SIZE_MISMATCH"),
    ],
)
async def test_an_object_that_is_not_what_was_declared_fails_with_its_reason(pool, blobs, settings, service, declared_sha256, data, reason):
    user_id = new_user()
    begun = await begin(service, user_id, sha256=declared_sha256)
    await blobs.write(begun.upload.object_key, single_chunk(data), content_type="image/jpeg")

    with pytest.raises(VerificationFailed) as caught:
        await service.finalize(principal(user_id), begun.upload.upload_id)
    assert caught.value.reason == reason
    failed = await service.get(principal(user_id), begun.upload.upload_id)
    assert (failed.state, failed.failure_reason) == ("failed", reason)
    assert await reserved_bytes(pool, user_id) == 0
    assert await blobs.stat(begun.upload.object_key) is None
    assert await pool.fetchval("SELECT count(*) FROM media WHERE upload_id = $1", begun.upload.upload_id) == 0


async def test_concurrent_finalizes_commit_together_and_each_gets_its_own_answer(pool, blobs, settings, service):
    # Many users, some with several uploads; a fifth of the objects are not what was declared.
    users = [new_user() for _ in range(12)]
    begun = await asyncio.gather(
        *(begin(service, users[i % len(users)], sha256=hashlib.sha256(JPEG_BYTES).hexdigest())
          for i in range(40))
    )
    for i, b in enumerate(begun):
        data = JPEG_BYTES if i % 5 else JPEG_BYTES[:-1] + b"\x00"
        await blobs.write(b.upload.object_key, single_chunk(data), content_type="image/jpeg")

    async def finalize(b):
        try:
            return await service.finalize(principal(b.upload.user_id), b.upload.upload_id)
        except VerificationFailed as failure:
            return failure.reason

    outcomes = await asyncio.gather(*(finalize(b) for b in begun))
    for i, outcome in enumerate(outcomes):
        if i % 5:
            assert outcome.state == "finalized"
            assert outcome.media_id is not None
        else:
            assert outcome == "CHECKSUM_MISMATCH"
    expected_used = {u: 0 for u in users}
    for i, b in enumerate(begun):
        if i % 5:
            expected_used[b.upload.user_id] += SIZE
    rows = await pool.fetch("SELECT user_id, used_bytes, reserved_bytes FROM accounts WHERE user_id = ANY($1)", users)
    assert {r["user_id"]: (r["used_bytes"], r["reserved_bytes"]) for r in rows} == {u: (n, 0) for u, n in expected_used.items()}
    assert await pool.fetchval("SELECT count(*) FROM media WHERE owner_id = ANY($1)", users) == 32
    assert await ledger.audit(pool) == []


async def test_one_upload_finalized_twice_in_one_batch_commits_once_and_an_intruder_in_it_gets_nothing(
    pool, blobs, settings, service
):
    owner, intruder = new_user(), new_user()
    begun = [await begin(service, owner) for _ in range(2)]
    for b in begun:
        await blobs.write(b.upload.object_key, single_chunk(JPEG_BYTES), content_type="image/jpeg")
    twice, other = begun[0].upload.upload_id, begun[1].upload.upload_id

    async def finalize(user_id: str, upload_id: uuid.UUID):
        try:
            return await service.finalize(principal(user_id), upload_id)
        except NotFound:
            return "NOT_FOUND"

    # The owner's two calls and the intruder's arrive together: one batch.
    first, intruding, second, alone = await asyncio.gather(
        finalize(owner, twice), finalize(intruder, twice), finalize(owner, twice), finalize(owner, other)
    )
    assert first.state == second.state == alone.state == "finalized"
    assert first.media_id == second.media_id is not None
    assert intruding == "NOT_FOUND"
    assert await pool.fetchval("SELECT count(*) FROM media WHERE upload_id = $1", twice) == 1
    assert await pool.fetchrow("SELECT used_bytes, reserved_bytes FROM accounts WHERE user_id = $1", owner) == (2 * SIZE, 0)
    assert await ledger.audit(pool) == []


async def test_an_upload_row_locked_elsewhere_does_not_hold_up_the_batch(pool, blobs, settings, service):
    user_id = new_user()
    begun = [await begin(service, user_id) for _ in range(3)]
    for b in begun:
        await blobs.write(b.upload.object_key, single_chunk(JPEG_BYTES), content_type="image/jpeg")
    held = begun[0].upload.upload_id
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM uploads WHERE upload_id = $1 FOR UPDATE", held)
        blocked = asyncio.create_task(service.finalize(principal(user_id), held))
        others = await asyncio.wait_for(
            asyncio.gather(*(service.finalize(principal(user_id), b.upload.upload_id)
                             for b in begun[1:])),
            timeout=10,
        )
        assert [o.state for o in others] == ["finalized", "finalized"]
        assert not blocked.done()
    assert (await asyncio.wait_for(blocked, timeout=10)).state == "finalized"
    assert await pool.fetchrow("SELECT used_bytes, reserved_bytes FROM accounts WHERE user_id = $1", user_id) == (3 * SIZE, 0)
    assert await ledger.audit(pool) == []


@pytest.fixture(scope="module")
async def moto() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


@pytest.fixture
async def s3_store(settings, moto) -> AsyncIterator[S3BlobStore]:
    """An S3 store of the test's own on the module's moto server, the bucket made."""
    store = await S3BlobStore.open(s3_settings(settings, moto))
    await store.ensure_bucket()
    yield store
    await store.close()


def s3_settings(settings, moto: MotoServer):
    return settings.model_copy(update={"blob_backend": "s3", "s3_endpoint_url": moto.endpoint_url, "s3_bucket": "uploads-test"})


@pytest.fixture
def s3_service(pool, settings, moto, s3_store) -> uploads.Uploads:
    s3 = s3_settings(settings, moto)
    return uploads.Uploads(pool, s3_store, s3, TranscodeQueue(None, s3.queue_name), uploads.Resumable(pool, s3_store, s3))


def s3_requests(store: S3BlobStore, monkeypatch) -> list[str]:
    """The names of the S3 operations the store sends from now on (HeadObject, GetObject, ...), as it sends them."""
    sent: list[str] = []
    client = store._client
    send = client._make_api_call

    async def recorded(operation_name, api_params):
        sent.append(operation_name)
        return await send(operation_name, api_params)

    monkeypatch.setattr(client, "_make_api_call", recorded)
    return sent


async def test_a_finalize_that_commits_nothing_answers_from_the_row_without_looking_at_the_object(
    pool, s3_store, s3_service, monkeypatch
):
    owner = new_user()
    # No declared SHA-256, so S3 records no full-object checksum: looking at the object reads all of it.
    begun = await begin(s3_service, owner)
    await s3_store.write(begun.upload.object_key, single_chunk(JPEG_BYTES), content_type="image/jpeg")
    given_up = await begin(s3_service, owner)
    await s3_store.write(given_up.upload.object_key, single_chunk(JPEG_BYTES), content_type="image/jpeg")
    await s3_service.fail(principal(owner), given_up.upload.upload_id, "changed my mind")
    sent = s3_requests(s3_store, monkeypatch)

    with pytest.raises(NotFound):
        await s3_service.finalize(principal(new_user()), begun.upload.upload_id)
    assert sent == [], "someone else's finalize"
    with pytest.raises(UploadNotPending):
        await s3_service.finalize(principal(owner), given_up.upload.upload_id)
    assert sent == [], "a failed upload's finalize"

    done = await s3_service.finalize(principal(owner), begun.upload.upload_id)
    assert done.state == "finalized"
    assert sent.count("GetObject") == 1
    sent.clear()
    assert await s3_service.finalize(principal(owner), begun.upload.upload_id) == done
    assert sent == [], "a repeat of a finalized upload's finalize"


@pytest.mark.parametrize(("protocol", "completion"), [("s3_multipart", "complete_parts"), ("tus", "publish_partial")])
async def test_a_fail_landing_while_finalize_completes_the_parts_is_what_finalize_answers(
    pool, s3_store, s3_service, monkeypatch, protocol, completion
):
    owner = new_user()
    upload_id = (await begin(s3_service, owner, protocol=protocol)).upload.upload_id
    reached, go = asyncio.Event(), asyncio.Event()
    complete = getattr(s3_store, completion)

    async def held(*args):
        reached.set()
        await go.wait()
        return await complete(*args)

    monkeypatch.setattr(s3_store, completion, held)
    if protocol == "s3_multipart":
        [part] = await s3_service.presign_parts(principal(owner), upload_id, [uploads.PartRequest(1, None)])
        assert await put(part.url, part.headers, JPEG_BYTES) == 200
        finalizing = asyncio.create_task(s3_service.finalize(principal(owner), upload_id))
    else:
        # The stream's last byte finalizes the upload.
        finalizing = asyncio.create_task(s3_service.upload_content(principal(owner), upload_id, single_chunk(JPEG_BYTES)))
    async with asyncio.timeout(10):
        await reached.wait()
    # The abort lands between the look at the parts and their completion.
    failed = await s3_service.fail(principal(owner), upload_id, "gave up")
    go.set()

    with pytest.raises(UploadNotPending) as caught:
        await finalizing
    assert caught.value.metadata == {"state": "failed"}
    assert (failed.state, (await s3_service.get(principal(owner), upload_id)).state) == ("failed", "failed")
    assert await reserved_bytes(pool, owner) == 0
    assert await ledger.audit(pool) == []
