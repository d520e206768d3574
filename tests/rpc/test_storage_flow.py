"""Begin -> PUT -> Finalize over real gRPC, PostgreSQL and the fs blob listener, and every way it can fail."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mediavault.blobs import single_chunk
from mediavault.config import GiB
from mediavault.storage.v1 import storage_pb2 as pb
from tests.helpers import bad_request, begin, error_info, fake_jpeg, put, sha256_hex, upload

CORPUS_JPEG = "images/camera/DSCN0010.jpg"


# Run straight to PostgreSQL and through PgBouncer in transaction mode (tests/conftest.py: stack).
@pytest.fixture
def pool(stack):
    return stack.pool


@pytest.fixture
def server(stack):
    return stack.server


@pytest.fixture
def storage(stack):
    return stack.storage


async def summary(storage, md) -> pb.StorageSummary:
    return (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary


async def test_begin_put_finalize_commits_bytes_and_creates_media(storage, auth, user_id, server, pool):
    from tests.conftest import CORPUS

    data = (CORPUS / CORPUS_JPEG).read_bytes()
    md = auth(user_id)
    begun = await begin(storage, md, data, filename="DSCN0010.jpg")
    assert begun.upload_method == "PUT"
    assert begun.upload.state == pb.UPLOAD_STATE_PENDING
    assert dict(begun.upload_headers) == {"Content-Type": "image/jpeg", "Content-Length": str(len(data))}
    mid = await summary(storage, md)
    assert (mid.reserved_bytes, mid.used_bytes, mid.pending_uploads) == (len(data), 0, 1)

    assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
    done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert done.media_id
    assert done.upload.media_id == done.media_id

    after = await summary(storage, md)
    assert (after.reserved_bytes, after.used_bytes, after.media_count, after.pending_uploads) == (0, len(data), 1, 0)
    assert after.available_bytes == after.quota_bytes - len(data)
    media = await pool.fetchrow("SELECT * FROM media WHERE media_id = $1::uuid", done.media_id)
    # Created pending; the session's worker (when an earlier test started it) may have claimed it since.
    assert media["processing_status"] in ("pending", "processing", "complete")
    assert media["sha256"] == sha256_hex(data)
    assert media["kind"] == "image"
    stored = server.blobs.path(media["object_key"]).read_bytes()
    assert stored == data

    again = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert again.media_id == done.media_id
    assert (await summary(storage, md)).used_bytes == len(data)


async def test_finalize_without_declared_checksum_records_computed_one(storage, auth, user_id, pool):
    data = fake_jpeg(5000)
    done = await upload(storage, auth(user_id), data, with_sha=False)
    assert done.upload.sha256 == ""
    assert await pool.fetchval("SELECT sha256 FROM media WHERE media_id = $1::uuid", done.media_id) == sha256_hex(data)


@pytest.mark.parametrize(
    ("declared", "sent", "content_type", "reason"),
    [
        (fake_jpeg(4000), None, "image/jpeg", "OBJECT_MISSING"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 3000, b"\x89PNG\r\n\x1a\n" + b"\0" * 3000, "image/jpeg", "UNSUPPORTED_MEDIA_TYPE"),
        (b"<html>" + b"a" * 3000, b"<html>" + b"a" * 3000, "image/png", "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
async def test_verification_failure_fails_upload_and_releases(storage, auth, user_id, server, declared, sent, content_type, reason):
    md = auth(user_id)
    begun = await begin(storage, md, declared, content_type=content_type)
    if sent is not None:
        assert await put(begun.upload_url, dict(begun.upload_headers), sent) == 200
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == reason
    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_FAILED
    assert got.failure_reason == reason
    after = await summary(storage, md)
    assert (after.reserved_bytes, after.used_bytes, after.pending_uploads) == (0, 0, 0)
    object_key = f"originals/{begun.upload.upload_id.replace('-', '')[:2]}/{begun.upload.upload_id.replace('-', '')}"
    assert not server.blobs.path(object_key).exists(), "failed upload's object is deleted"

    with pytest.raises(grpc.aio.AioRpcError) as again:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert error_info(again.value).reason == "UPLOAD_NOT_PENDING"


async def test_a_put_of_other_bytes_than_declared_changes_nothing_and_finalize_still_checks(storage, auth, user_id, server):
    md = auth(user_id)
    declared, sent = fake_jpeg(4000), fake_jpeg(4000, b"\x01")
    begun = await begin(storage, md, declared)

    # Refused by the listener, as S3 refuses a body that differs from a signed checksum.
    assert await put(begun.upload_url, dict(begun.upload_headers), sent) == 400
    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_PENDING
    reserved = await summary(storage, md)
    assert (reserved.reserved_bytes, reserved.used_bytes, reserved.pending_uploads) == (len(declared), 0, 1)

    # Bytes that reached the store some other way (a store that verifies nothing, as moto) are
    # hashed at finalize.
    object_key = f"originals/{begun.upload.upload_id.replace('-', '')[:2]}/{begun.upload.upload_id.replace('-', '')}"
    await server.blobs.write(object_key, single_chunk(sent), content_type="image/jpeg")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert error_info(caught.value).reason == "CHECKSUM_MISMATCH"
    after = await summary(storage, md)
    assert (after.reserved_bytes, after.used_bytes, after.pending_uploads) == (0, 0, 0)
    assert not server.blobs.path(object_key).exists()


async def test_size_mismatch_via_upload_content(storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(6000)
    begun = await begin(storage, md, data, with_sha=False)

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        yield pb.UploadContentRequest(chunk=data[:4000])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(stream(), metadata=md)
    assert error_info(caught.value).reason == "SIZE_MISMATCH"
    assert (await summary(storage, md)).reserved_bytes == 0


async def test_upload_content_streams_and_finalizes(storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(3 * 1024 * 1024 + 17)
    begun = await begin(storage, md, data)

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        for offset in range(0, len(data), 1 << 20):
            yield pb.UploadContentRequest(chunk=data[offset : offset + (1 << 20)])

    response = await storage.UploadContent(stream(), metadata=md)
    assert response.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert (await summary(storage, md)).used_bytes == len(data)


async def test_a_stream_ending_after_finalize_cannot_replace_the_object(storage, auth, user_id, server, pool):
    md = auth(user_id)
    data = fake_jpeg(4096)
    begun = await begin(storage, md, data)
    other = b"<html><script>alert(1)</script>" + b" " * 100
    sent_part, finalized = asyncio.Event(), asyncio.Event()

    async def slow_stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        yield pb.UploadContentRequest(chunk=other[:10])
        sent_part.set()
        await finalized.wait()
        yield pb.UploadContentRequest(chunk=other[10:])

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        yield pb.UploadContentRequest(chunk=data)

    slow = asyncio.ensure_future(storage.UploadContent(slow_stream(), metadata=md))
    await sent_part.wait()
    first = await storage.UploadContent(stream(), metadata=md)
    assert first.upload.state == pb.UPLOAD_STATE_FINALIZED
    finalized.set()
    second = await slow
    assert second.upload == first.upload
    media = await pool.fetchrow("SELECT object_key, sha256 FROM media WHERE media_id = $1::uuid", first.upload.media_id)
    assert media["sha256"] == sha256_hex(data)
    assert await server.blobs.read(media["object_key"]) == data


async def test_upload_content_rejects_bytes_past_declared_size(storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1000)
    begun = await begin(storage, md, data)

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        yield pb.UploadContentRequest(chunk=data + b"extra")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(stream(), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_PENDING, "a bad stream leaves the upload retryable"


async def test_fail_upload_releases_reservation(storage, auth, user_id):
    md = auth(user_id)
    begun = await begin(storage, md, fake_jpeg(2048))
    failed = await storage.FailUpload(pb.FailUploadRequest(upload_id=begun.upload.upload_id, reason="user cancelled"), metadata=md)
    assert failed.upload.state == pb.UPLOAD_STATE_FAILED
    assert failed.upload.failure_reason == "CLIENT_FAILED"
    assert (await summary(storage, md)).reserved_bytes == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FailUpload(pb.FailUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert error_info(caught.value).reason == "UPLOAD_NOT_PENDING"


@pytest.mark.parametrize("trial", range(15))
async def test_concurrent_finalize_and_fail_end_in_exactly_one_outcome(storage, auth, user_id, pool, trial):
    md = auth(user_id)
    data = fake_jpeg(10_000)
    begun = await begin(storage, md, data)
    assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
    upload_id = begun.upload.upload_id

    results = await asyncio.gather(
        storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md),
        storage.FailUpload(pb.FailUploadRequest(upload_id=upload_id, reason="race"), metadata=md),
        storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md),
        return_exceptions=True,
    )
    final = (await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)).upload
    figures = await summary(storage, md)
    ledger = await pool.fetch("SELECT kind FROM ledger_entries WHERE upload_id = $1::uuid ORDER BY entry_id", upload_id)
    kinds = [r["kind"] for r in ledger]
    assert figures.reserved_bytes == 0
    if final.state == pb.UPLOAD_STATE_FINALIZED:
        assert kinds == ["reserve", "commit"]
        assert figures.used_bytes == len(data)
        assert isinstance(results[1], grpc.aio.AioRpcError)
        assert error_info(results[1]).reason == "UPLOAD_NOT_PENDING"
        assert results[0].media_id == results[2].media_id == final.media_id
    else:
        assert final.state == pb.UPLOAD_STATE_FAILED
        assert kinds == ["reserve", "release"]
        assert figures.used_bytes == 0
        assert await pool.fetchval("SELECT count(*) FROM media WHERE upload_id = $1::uuid", upload_id) == 0
        for outcome in (results[0], results[2]):
            assert isinstance(outcome, grpc.aio.AioRpcError)
            assert error_info(outcome).reason in ("UPLOAD_NOT_PENDING", "OBJECT_MISSING")


async def test_other_users_upload_is_not_found(storage, auth, user_id):
    begun = await begin(storage, auth(user_id), fake_jpeg(1000))
    intruder = auth("someone-else")
    for call, request in (
        (storage.GetUpload, pb.GetUploadRequest(upload_id=begun.upload.upload_id)),
        (storage.FinalizeUpload, pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id)),
        (storage.FailUpload, pb.FailUploadRequest(upload_id=begun.upload.upload_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request, metadata=intruder)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "NOT_FOUND"
    owner_view = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=auth(user_id))).upload
    assert owner_view.state == pb.UPLOAD_STATE_PENDING


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer not-a-jwt"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
    ],
)
async def test_missing_or_bad_token_is_unauthenticated(storage, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "UNAUTHORIZED"


async def test_token_signed_with_another_secret_or_expired_is_unauthenticated(storage, user_id):
    from mediavault.auth import Authenticator
    from tests.conftest import JWT_SECRET

    forged = Authenticator("some-other-secret-of-32-bytes-or-more").issue(user_id, ["admin"])
    expired = Authenticator(JWT_SECRET).issue(user_id, ["user"], ttl_seconds=-3600)
    for token in (forged, expired):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("authorization", f"Bearer {token}"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"content_type": "application/pdf"}, "content_type"),
        ({"content_type": "image/x-eps"}, "content_type"),
        ({"size_bytes": 0}, "size_bytes"),
        ({"size_bytes": 50 * 1024 * 1024 + 1}, "size_bytes"),
        ({"filename": ""}, "filename"),
        ({"sha256": "ABC"}, "sha256"),
        ({"retention": 7}, "retention"),
    ],
)
async def test_invalid_begin_is_invalid_argument_with_field_violation(storage, auth, user_id, fields, field):
    request = pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=100)
    for key, value in fields.items():
        setattr(request, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.BeginUpload(request, metadata=auth(user_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert [v.field for v in bad_request(caught.value).field_violations] == [field]


async def test_video_size_bound_is_larger(storage, auth, user_id):
    request = pb.BeginUploadRequest(filename="clip.mp4", content_type="video/mp4", size_bytes=400 * 1024 * 1024)
    begun = await storage.BeginUpload(request, metadata=auth(user_id, "user"))
    assert begun.upload.size_bytes == 400 * 1024 * 1024


async def test_idempotency_key_returns_same_upload_or_conflicts(storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1500)
    first = await begin(storage, md, data, idempotency_key="retry-1")
    again = await asyncio.gather(*(begin(storage, md, data, idempotency_key="retry-1") for _ in range(10)))
    assert {r.upload.upload_id for r in again} == {first.upload.upload_id}
    assert (await summary(storage, md)).reserved_bytes == len(data)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await begin(storage, md, fake_jpeg(1501), idempotency_key="retry-1")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).reason == "IDEMPOTENCY_CONFLICT"
    other_user = await begin(storage, auth(user_id + "-b"), data, idempotency_key="retry-1")
    assert other_user.upload.upload_id != first.upload.upload_id


@pytest.mark.parametrize("protocol", [pb.UPLOAD_PROTOCOL_SINGLE, pb.UPLOAD_PROTOCOL_TUS])
async def test_a_replayed_key_of_a_failed_upload_gives_no_url_to_store_bytes_at(storage, auth, user_id, protocol):
    md = auth(user_id)
    data = fake_jpeg(2000)
    first = await begin(storage, md, data, idempotency_key="then-failed", protocol=protocol)
    await storage.FailUpload(pb.FailUploadRequest(upload_id=first.upload.upload_id, reason="cancelled"), metadata=md)
    replayed = await begin(storage, md, data, idempotency_key="then-failed", protocol=protocol)
    assert replayed.upload.upload_id == first.upload.upload_id
    assert replayed.upload.state == pb.UPLOAD_STATE_FAILED
    assert (replayed.upload_url, replayed.upload_method, dict(replayed.upload_headers)) == ("", "", {})
    standing = await summary(storage, md)
    assert (standing.used_bytes, standing.reserved_bytes) == (0, 0)


async def test_concurrent_first_uses_of_one_idempotency_key_reserve_once(storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1500)
    results = await asyncio.gather(*(begin(storage, md, data, idempotency_key="k") for _ in range(20)))
    assert len({r.upload.upload_id for r in results}) == 1
    assert (await summary(storage, md)).reserved_bytes == len(data)


async def test_second_upload_that_does_not_fit_fails_at_begin(storage, auth, user_id, pool):
    md = auth(user_id)
    quota = (await summary(storage, md)).quota_bytes
    await pool.execute("UPDATE accounts SET quota_bytes = 10000 WHERE user_id = $1", user_id)
    await pool.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ($1, 'grant', $2)", user_id, 10000 - quota)
    await begin(storage, md, fake_jpeg(6000))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await begin(storage, md, fake_jpeg(6000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert info.reason == "STORAGE_LIMIT_REACHED"
    assert info.domain == "mediavault"
    assert info.metadata["available_bytes"] == "4000"


async def test_frozen_account_cannot_begin(storage, auth, user_id):
    admin = auth("ops", "admin")
    frozen = await storage.FreezeAccount(pb.FreezeAccountRequest(user_id=user_id, reason="chargeback"), metadata=admin)
    assert frozen.account.frozen
    assert frozen.account.frozen_reason == "chargeback"
    assert frozen.account.frozen_at.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await begin(storage, auth(user_id), fake_jpeg(100))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "ACCOUNT_FROZEN"
    assert (await summary(storage, auth(user_id))).frozen

    thawed = await storage.UnfreezeAccount(pb.UnfreezeAccountRequest(user_id=user_id), metadata=admin)
    assert not thawed.account.frozen
    assert not thawed.account.HasField("frozen_at")
    await begin(storage, auth(user_id), fake_jpeg(100))


async def test_freeze_needs_admin(storage, auth, user_id):
    for roles in (("user",), ("billing",), ("service",)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage.FreezeAccount(pb.FreezeAccountRequest(user_id=user_id, reason="x"), metadata=auth("op", *roles))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "FORBIDDEN"


async def test_reading_another_users_summary_needs_admin_or_service(storage, auth, user_id):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(user_id=user_id), metadata=auth("nosy"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for role in ("admin", "service"):
        seen = await storage.GetStorageSummary(pb.GetStorageSummaryRequest(user_id=user_id), metadata=auth("svc", role))
        assert seen.summary.user_id == user_id


async def test_reading_the_summary_of_a_user_without_an_account_makes_none(storage, auth, user_id, pool):
    accounts_before = await pool.fetchval("SELECT count(*) FROM accounts")
    entries_before = await pool.fetchval("SELECT count(*) FROM ledger_entries")
    for role in ("admin", "service"):
        seen = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(user_id=user_id), metadata=auth("svc", role))).summary
        assert (seen.user_id, seen.quota_bytes, seen.used_bytes, seen.reserved_bytes, seen.frozen) == (user_id, GiB, 0, 0, False)
        assert seen.available_bytes == GiB
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM accounts") == accounts_before
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries") == entries_before
    # The user's own first read is the account's first use.
    own = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert own.quota_bytes == GiB
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user_id) == 1


async def test_internal_errors_reveal_nothing(storage, auth, user_id, server, pool):
    data = fake_jpeg(3000)
    md = auth(user_id)
    begun = await begin(storage, md, data)
    await put(begun.upload_url, dict(begun.upload_headers), data)
    await pool.execute("ALTER TABLE media RENAME TO media_moved")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    finally:
        await pool.execute("ALTER TABLE media_moved RENAME TO media")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error"
    assert error_info(caught.value).reason == "INTERNAL_ERROR"
    done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED, "a failed commit left the upload pending and retryable"
