"""Derived bytes (variants, renditions) as figures: kept by every write, audited, and counted
against the quota only when settings.quota_counts_derived_bytes says so."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from mediavault.domain import ledger
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import CORPUS, running
from tests.helpers import begin, error_info, fake_jpeg, settled, upload

MiB = 1024 * 1024
PHOTO = (CORPUS / "images" / "camera" / "DSCN0010.jpg").read_bytes()
QUOTA = 2 * MiB


@contextlib.asynccontextmanager
async def _small_tier(make_settings, counts_derived: bool):
    """A server with a small free tier that counts derived bytes or not; the session worker makes its variants."""
    settings = make_settings(quota_counts_derived_bytes=counts_derived, free_quota_bytes=QUOTA)
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield storage_pb2_grpc.StorageServiceStub(channel), media_pb2_grpc.MediaServiceStub(channel)


@pytest.fixture(scope="module")
async def counting(make_settings):
    async with _small_tier(make_settings, counts_derived=True) as stubs:
        yield stubs


@pytest.fixture(scope="module")
async def not_counting(make_settings):
    async with _small_tier(make_settings, counts_derived=False) as stubs:
        yield stubs


async def _summary(storage, md) -> pb.StorageSummary:
    return (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary


def _variant_bytes(item: mpb.Media) -> int:
    return sum(v.size_bytes + sum(a.size_bytes for a in v.alternatives) for v in item.variants)


async def _processed_photo(storage, media, md) -> tuple[pb.FinalizeUploadResponse, mpb.Media]:
    done = await upload(storage, md, PHOTO, filename="DSCN0010.jpg")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    return done, item


async def _books_add_up(pool, user_id: str) -> None:
    assert [m for m in await ledger.audit(pool) if m.user_id == user_id] == []


async def test_counted_derived_bytes_refuse_an_upload_that_fits_beside_the_original_alone(counting, auth, user_id, worker, pool):
    storage, media = counting
    md = auth(user_id)
    done, item = await _processed_photo(storage, media, md)
    derived = _variant_bytes(item)
    assert derived > 0

    summary = await _summary(storage, md)
    assert (summary.used_bytes, summary.derived_bytes) == (len(PHOTO), derived)
    assert summary.available_bytes == QUOTA - len(PHOTO) - derived

    # Fits beside the original, not beside the original and its variants.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await begin(storage, md, fake_jpeg(QUOTA - len(PHOTO)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    info = error_info(caught.value)
    assert info.reason == "STORAGE_LIMIT_REACHED"
    assert info.metadata["available_bytes"] == str(QUOTA - len(PHOTO) - derived)
    assert (await _summary(storage, md)).reserved_bytes == 0, "a refusal reserves nothing"

    fitting = await begin(storage, md, fake_jpeg(summary.available_bytes))
    assert (await _summary(storage, md)).available_bytes == 0
    await storage.FailUpload(pb.FailUploadRequest(upload_id=fitting.upload.upload_id), metadata=md)

    # Deleting the media frees its original and its variants alike.
    await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=md)
    after = await _summary(storage, md)
    assert (after.used_bytes, after.derived_bytes, after.available_bytes) == (0, 0, QUOTA)
    await _books_add_up(pool, user_id)


async def test_derived_bytes_not_counted_are_reported_and_leave_the_quota_to_originals(not_counting, auth, user_id, worker, pool):
    storage, media = not_counting
    md = auth(user_id)
    done, item = await _processed_photo(storage, media, md)
    summary = await _summary(storage, md)
    assert summary.derived_bytes == _variant_bytes(item) > 0
    assert summary.available_bytes == QUOTA - len(PHOTO)

    # The whole rest of the quota can still be reserved.
    whole_rest = await begin(storage, md, fake_jpeg(QUOTA - len(PHOTO)))
    assert (await _summary(storage, md)).available_bytes == 0
    await storage.FailUpload(pb.FailUploadRequest(upload_id=whole_rest.upload.upload_id), metadata=md)
    await _books_add_up(pool, user_id)


async def test_a_reprocessed_media_moves_the_figures_by_the_difference(storage, media, auth, user_id, worker, pool):
    md = auth(user_id)
    done, first = await _processed_photo(storage, media, md)
    # As if the first run had written bigger variants: the next run's figure replaces the old one.
    await pool.execute("UPDATE media_variants SET size_bytes = size_bytes + 1000 WHERE media_id = $1", first.media_id)
    await pool.execute("UPDATE media SET derived_bytes = derived_bytes + 1000 * (SELECT count(*) FROM media_variants WHERE media_id = $1) WHERE media_id = $1", first.media_id)
    await pool.execute("UPDATE accounts SET derived_bytes = (SELECT derived_bytes FROM media WHERE media_id = $2) WHERE user_id = $1", user_id, first.media_id)
    await _books_add_up(pool, user_id)

    await media.ReprocessMedia(mpb.ReprocessMediaRequest(media_id=done.media_id), metadata=md)
    again = await settled(media, md, done.media_id)
    assert again.processing_status == mpb.PROCESSING_STATUS_COMPLETE, again.processing_error
    assert (await _summary(storage, md)).derived_bytes == _variant_bytes(again) > 0
    await _books_add_up(pool, user_id)


async def test_the_audit_reports_derived_figures_that_disagree_with_the_variants(storage, media, auth, user_id, worker, pool):
    md = auth(user_id)
    done, _ = await _processed_photo(storage, media, md)
    await pool.execute("UPDATE media SET derived_bytes = derived_bytes + 7 WHERE media_id = $1", done.media_id)
    try:
        found = {(m.figure, m.account_value - m.expected_value) for m in await ledger.audit(pool) if m.user_id == user_id}
        assert found == {(f"media_derived_bytes_vs_variants:{done.media_id}", 7)}
        await pool.execute("UPDATE accounts SET derived_bytes = derived_bytes - 5 WHERE user_id = $1", user_id)
        found = {(m.figure, m.account_value - m.expected_value) for m in await ledger.audit(pool) if m.user_id == user_id}
        assert found == {(f"media_derived_bytes_vs_variants:{done.media_id}", 7), ("derived_bytes_vs_variants", -5)}
    finally:
        await pool.execute("UPDATE media SET derived_bytes = derived_bytes - 7 WHERE media_id = $1", done.media_id)
        await pool.execute("UPDATE accounts SET derived_bytes = derived_bytes + 5 WHERE user_id = $1", user_id)
    await _books_add_up(pool, user_id)
