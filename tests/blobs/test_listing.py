"""Paged listing and moves, the two operations the orphan sweep needs, and create-only writes
(an original, once stored, is never replaced), on both backends.

The fs store runs in a temp dir and the S3 store against a real moto server over HTTP;
every test gets an empty store (a fresh bucket on S3).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mediavault.blobs import BlobStore, BlobStoreError, ObjectExists, check_key, open_blob_store, single_chunk
from mediavault.blobs.base import ListedObject
from mediavault.blobs.fs import FsBlobStore
from mediavault.blobs.s3 import S3BlobStore
from mediavault.blobs.signing import UrlSigner
from mediavault.config import Settings
from tests.s3server import MotoServer, moto_server

# S3 LastModified has whole-second precision and moto's clock is this machine's.
CLOCK_SLACK = timedelta(seconds=2)
# Enough writes in flight to keep moto busy without exhausting botocore's connection pool.
WRITE_CONCURRENCY = 10


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


@pytest.fixture(params=["fs", "s3"])
async def store(request: pytest.FixtureRequest, server: MotoServer, tmp_path) -> AsyncIterator[BlobStore]:
    if request.param == "fs":
        # The signer is never used: listing and moving hand out no URLs.
        yield FsBlobStore(tmp_path / "blobs", UrlSigner(b"k" * 32, "http://127.0.0.1:1"))
        return
    settings = Settings(
        blob_backend="s3", s3_bucket=f"listing-{uuid.uuid4().hex}", s3_endpoint_url=server.endpoint_url, jwt_secret="x"
    )
    s3 = await open_blob_store(settings)
    assert isinstance(s3, S3BlobStore)
    await s3.ensure_bucket()
    yield s3
    await s3.close()


def original_key() -> str:
    hex_id = uuid.uuid4().hex
    return f"originals/{hex_id[:2]}/{hex_id}"


def variant_key(name: str = "thumbnail.jpg") -> str:
    hex_id = uuid.uuid4().hex
    return f"variants/{hex_id[:2]}/{hex_id}/v0/{name}"


async def put_all(store: BlobStore, objects: dict[str, bytes]) -> None:
    limit = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def put(key: str, data: bytes) -> None:
        async with limit:
            await store.write(key, single_chunk(data), content_type="application/octet-stream")

    await asyncio.gather(*(put(key, data) for key, data in objects.items()))


async def list_all(store: BlobStore, prefix: str, limit: int) -> list[ListedObject]:
    """Pages through prefix the way the sweep does: resume after the last key until a page is short."""
    listed: list[ListedObject] = []
    after = None
    while True:
        page = await store.list_page(prefix, after=after, limit=limit)
        assert len(page) <= limit
        listed += page
        if len(page) < limit:
            return listed
        after = page[-1].key


async def keys_under(store: BlobStore, prefix: str) -> list[str]:
    return [item.key for item in await list_all(store, prefix, 100)]


async def test_paging_returns_every_key_once_in_order(store: BlobStore) -> None:
    keys = (
        [original_key() for _ in range(1500)]
        + [variant_key("thumbnail.jpg") for _ in range(500)]
        + [variant_key("preview.webp") for _ in range(300)]
        + [f"quarantine/{original_key()}" for _ in range(200)]
    )
    await put_all(store, {key: key.encode()[: len(key) % 7] for key in keys})

    for limit in (100, 1500):
        listed = await list_all(store, "", limit)
        assert [item.key for item in listed] == sorted(keys)
        assert [item.size for item in listed] == [len(item.key) % 7 for item in listed]

    assert await keys_under(store, "originals/") == sorted(k for k in keys if k.startswith("originals/"))
    assert await keys_under(store, "variants/") == sorted(k for k in keys if k.startswith("variants/"))
    assert await keys_under(store, "quarantine/originals/") == sorted(k for k in keys if k.startswith("quarantine/"))
    shard = keys[0][:13]
    assert await keys_under(store, shard) == sorted(k for k in keys if k.startswith(shard))


async def test_order_is_by_whole_key_as_on_s3(store: BlobStore) -> None:
    # "-" and "." sort before "/", so a file "a-b" precedes the contents of directory "a".
    keys = ["t/a-b", "t/a.b/c", "t/a/x", "t/a/x-y", "t/a/x.y", "t/a/x_y/z", "t/a0", "t/a_b", "t/ab/c/d", "u/a"]
    await put_all(store, {key: b"x" for key in keys})
    expected = sorted(keys)

    assert [item.key for item in await list_all(store, "", 1)] == expected
    assert [item.key for item in await list_all(store, "", 3)] == expected


@pytest.mark.parametrize(
    "after",
    [None, "", "s", "t", "t/", "t/a", "t/a-b", "t/a.", "t/a/", "t/a/x", "t/a/x-", "t/a/x/", "t/a/x_y", "t/a/x_y/z",
     "t/a/z", "t/a0", "t/ab/c", "t/ab/c/e", "t/b", "u/", "v"],
)
async def test_after_is_exclusive_and_need_not_be_a_key(store: BlobStore, after: str | None) -> None:
    keys = ["t/a-b", "t/a.b/c", "t/a/x", "t/a/x-y", "t/a/x.y", "t/a/x_y/z", "t/a0", "t/a_b", "t/ab/c/d", "u/a"]
    await put_all(store, {key: b"x" for key in keys})

    everything = await store.list_page("", after=after, limit=100)
    under_t = await store.list_page("t/", after=after, limit=100)

    assert [item.key for item in everything] == [k for k in sorted(keys) if after is None or k > after]
    assert [item.key for item in under_t] == [
        k for k in sorted(keys) if k.startswith("t/") and (after is None or k > after)
    ]


async def test_prefixes_that_match_nothing(store: BlobStore) -> None:
    key = original_key()
    await put_all(store, {key: b"data"})

    assert await store.list_page("variants/", after=None, limit=10) == []
    # An object's own key as a directory, which fs has as a file.
    assert await store.list_page(key + "/", after=None, limit=10) == []
    assert await store.list_page("originals/", after=key, limit=10) == []


async def test_invalid_arguments_are_refused(store: BlobStore) -> None:
    for prefix in ("originals", "/", "originals//", ".tmp/", "../", "Originals/"):
        with pytest.raises(ValueError, match="invalid listing prefix"):
            await store.list_page(prefix, after=None, limit=10)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        await store.list_page("", after=None, limit=0)


async def test_sizes_and_modification_times(store: BlobStore) -> None:
    before = datetime.now(UTC)
    objects = {original_key(): os.urandom(size) for size in (0, 1, 1000, 300_000)}
    await put_all(store, objects)
    after = datetime.now(UTC)

    listed = await store.list_page("originals/", after=None, limit=10)

    assert {item.key: item.size for item in listed} == {key: len(data) for key, data in objects.items()}
    for item in listed:
        assert item.modified_at.utcoffset() == timedelta(0)
        assert before - CLOCK_SLACK <= item.modified_at <= after + CLOCK_SLACK


async def test_move_to_quarantine(store: BlobStore) -> None:
    kept, orphan = original_key(), original_key()
    await put_all(store, {kept: b"kept", orphan: b"orphaned bytes"})
    quarantined = check_key(f"quarantine/{orphan}")
    moved_at = datetime.now(UTC)

    await store.move(orphan, quarantined)

    assert [item.key for item in await store.list_page("", after=None, limit=10)] == sorted([kept, quarantined])
    assert await store.stat(orphan) is None
    assert await store.read(quarantined) == b"orphaned bytes"
    [listed] = await store.list_page("quarantine/", after=None, limit=10)
    # The sweep deletes quarantined objects by age, which must count from the move.
    assert listed.modified_at >= moved_at - CLOCK_SLACK

    await store.move(quarantined, orphan)
    assert await store.read(orphan) == b"orphaned bytes"
    assert await store.list_page("quarantine/", after=None, limit=10) == []


async def test_move_replaces_an_existing_target(store: BlobStore) -> None:
    source, target = original_key(), f"quarantine/{original_key()}"
    await put_all(store, {source: b"new", target: b"old contents"})

    await store.move(source, target)

    assert await store.read(target) == b"new"
    assert [item.key for item in await store.list_page("", after=None, limit=10)] == [target]


async def test_move_of_a_missing_object_fails(store: BlobStore) -> None:
    missing = original_key()

    with pytest.raises(BlobStoreError):
        await store.move(missing, f"quarantine/{missing}")

    assert await store.list_page("", after=None, limit=10) == []


async def test_move_onto_itself_or_to_an_invalid_key_is_refused(store: BlobStore) -> None:
    key = variant_key()
    await put_all(store, {key: b"bytes"})

    for new_key in (key, "quarantine/../" + key, ".tmp/x", "Quarantine/x"):
        with pytest.raises(ValueError, match="invalid object key|onto itself"):
            await store.move(key, new_key)
    with pytest.raises(ValueError, match="invalid object key"):
        await store.move("../outside", "quarantine/x")

    assert await store.read(key) == b"bytes"
    assert [item.key for item in await store.list_page("", after=None, limit=10)] == [key]


def test_keys_the_sweep_uses_are_valid() -> None:
    for key in (original_key(), variant_key(), f"quarantine/{original_key()}", f"quarantine/{variant_key()}"):
        assert check_key(key) == key
    for key in ("quarantine//originals/ab/cd", "quarantine/.tmp/x", "quarantine/originals/../x", "/quarantine/x"):
        with pytest.raises(ValueError, match="invalid object key"):
            check_key(key)


async def test_fs_never_lists_temp_files(tmp_path) -> None:
    store = FsBlobStore(tmp_path, UrlSigner(b"k" * 32, "http://127.0.0.1:1"))
    key = original_key()
    await put_all(store, {key: b"done"})
    # What an unfinished write or presigned PUT leaves behind while it runs.
    Path(store.new_temp_file()).write_bytes(b"in flight")

    assert [item.key for item in await list_all(store, "", 1)] == [key]


async def test_fs_paging_cost_does_not_grow_with_the_position(tmp_path) -> None:
    store = FsBlobStore(tmp_path, UrlSigner(b"k" * 32, "http://127.0.0.1:1"))
    keys = sorted(original_key() for _ in range(20_000))
    for shard in {key[:12] for key in keys}:
        (tmp_path / shard).mkdir(parents=True)
    for key in keys:
        with open(tmp_path / key, "wb") as f:
            f.write(b"x")

    timings = []
    listed: list[str] = []
    after = None
    while True:
        started = time.perf_counter()
        page = await store.list_page("originals/", after=after, limit=1000)
        timings.append(time.perf_counter() - started)
        listed += [item.key for item in page]
        if len(page) < 1000:
            break
        after = page[-1].key

    assert listed == keys
    assert len(timings) == 21
    print(f"20k-file paging: total {sum(timings):.3f}s, pages {min(timings):.4f}..{max(timings):.4f}s")
    assert sum(timings) < 3

    # Resuming walks only the shards at and after `after`, so the last full page costs about
    # what the first does; a walk from the beginning would make it some 20 times dearer.
    # Best of several runs, so that a stall on a busy machine does not decide the outcome.
    async def best_of_five(after: str | None) -> float:
        durations = []
        for _ in range(5):
            started = time.perf_counter()
            assert len(await store.list_page("originals/", after=after, limit=1000)) == 1000
            durations.append(time.perf_counter() - started)
        return min(durations)

    first, last = await best_of_five(None), await best_of_five(keys[-1001])
    print(f"20k-file paging: best first page {first:.4f}s, best last page {last:.4f}s")
    assert last < 3 * first


async def test_delete_many_removes_what_it_can_and_names_the_rest(store: BlobStore) -> None:
    keys = [f"originals/dd/{i:032x}" for i in range(1205)]
    await asyncio.gather(*(store.write(key, single_chunk(b"x"), content_type="image/jpeg") for key in keys[:40]))
    failed = await store.delete_many([*keys, "originals/../escape"])
    assert failed == ["originals/../escape"]
    assert await store.list_page("originals/dd/", after=None, limit=100) == []


# One PUT, and a multipart upload on S3 (more than its 8 MiB part).
@pytest.mark.parametrize("size", [1000, 9 * 1024 * 1024])
async def test_a_create_only_write_never_replaces_an_object(store: BlobStore, size: int) -> None:
    key = original_key()
    first = os.urandom(size)
    assert await store.write(key, single_chunk(first), content_type="image/jpeg", create_only=True) == size
    with pytest.raises(ObjectExists):
        await store.write(key, single_chunk(b"x" * size), content_type="image/jpeg", create_only=True)
    assert await store.read(key) == first

    # A stream that began before the object existed and ends after it was stored.
    later = original_key()
    started, stored = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"y" * (size // 2)
        started.set()
        await stored.wait()
        yield b"y" * (size - size // 2)

    writing = asyncio.create_task(store.write(later, slow(), content_type="image/jpeg", create_only=True))
    await started.wait()
    await store.write(later, single_chunk(first), content_type="image/jpeg", create_only=True)
    stored.set()
    with pytest.raises(ObjectExists):
        await writing
    assert await store.read(later) == first
    assert await keys_under(store, "originals/") == sorted([key, later])

    # Without create_only a write replaces, as variants' reruns need.
    await store.write(key, single_chunk(b"z"), content_type="image/jpeg")
    assert await store.read(key) == b"z"
