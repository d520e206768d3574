"""The local-filesystem backend: objects under MEDIAVAULT_BLOB_DIR, signed URLs served by blobs.http."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

from mediavault.blobs.base import (
    BlobStoreError,
    Digest,
    Inspection,
    ListedObject,
    MultipartUpload,
    ObjectExists,
    ObjectInfo,
    PartialState,
    SignedRequest,
    check_key,
    check_list_args,
    check_sha256,
    is_sha256_hex,
    is_valid_key,
)
from mediavault.blobs.signing import UrlSigner
from mediavault.offload import InOrder
from mediavault.scratch import OwnedFolder

# Files up to this size are read on the event loop; larger ones in a thread.
_INLINE_READ_LIMIT = 256 * 1024
_READ_CHUNK = 1024 * 1024
_DELETE_THREADS = 8
# An upload's bytes: the writer thread starts writing them to disk whenever this much is written
# and not yet on its way, and twice as much may wait for the writer (or a resumable upload's
# hasher) before the event loop waits for it.
_SYNC_EVERY = 2 * 1024 * 1024
_WRITE_AHEAD = 2 * _SYNC_EVERY
_SYNC_FILE_RANGE_WRITE = 2
# The SHA-256 of a signed PUT's body, which the listener computed as it wrote the bytes; S3 keeps
# a verified x-amz-checksum-sha256 the same way. A copy that drops extended attributes (plain
# cp) or a file system without them only costs a read: the object is hashed instead.
_SHA256_XATTR = "user.mediavault.sha256"
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA})


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) through ctypes (which releases the GIL), or None elsewhere."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class _Writeback:
    """Starts a file's bytes on their way to disk every _SYNC_EVERY bytes written (sync_file_range,
    which does not wait; fdatasync where there is none), so that the fdatasync that makes them
    durable at the end has little left to wait for."""

    def __init__(self, fd: int, offset: int = 0) -> None:
        self._fd = fd
        # Where the bytes not yet on their way to disk start, and how many there are.
        self._from = offset
        self._pending = 0

    def wrote(self, count: int) -> None:
        self._pending += count
        if self._pending < _SYNC_EVERY:
            return
        if _sync_file_range is None:
            os.fdatasync(self._fd)
        elif _sync_file_range(self._fd, self._from, self._pending, _SYNC_FILE_RANGE_WRITE) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        self.synced(self._from + self._pending)

    def synced(self, offset: int) -> None:
        """Every byte before offset is on disk (or on its way)."""
        self._from, self._pending = offset, 0


class FsBlobStore:
    # Any byte of a partial file can be synced: a resumable upload's checkpoints fall where the caller wants.
    partial_part_size: int | None = None

    def __init__(self, root: Path, signer: UrlSigner) -> None:
        self.root = root.resolve()
        self.signer = signer
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        # Objects are written in a folder of this store's until published: a process killed
        # mid-write (a signed PUT's body, up to the largest upload) leaves its partial file in it,
        # which the next store to start on root removes, every process sharing root alike.
        self._temp_folder = OwnedFolder(tmp, "store-")
        # The upload path (PUT, publish, inspect) joins str paths: building pathlib
        # objects there cost more than its system calls.
        self._root_prefix = f"{self.root}/"
        self._tmp_prefix = f"{self._temp_folder.path}/"
        self._deleters = ThreadPoolExecutor(max_workers=_DELETE_THREADS, thread_name_prefix="blob-delete")

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _file(self, key: str) -> str:
        return self._root_prefix + check_key(key)

    def new_temp_file(self) -> str:
        """A fresh name in the temp directory, where objects are written before they are published."""
        return self._tmp_prefix + uuid.uuid4().hex

    def exists(self, key: str) -> bool:
        return os.path.exists(self._file(key))

    async def presign_put(
        self, key: str, *, size_bytes: int, content_type: str, sha256: str | None, expires_in: int
    ) -> SignedRequest:
        url = self.signer.sign(
            "PUT",
            key,
            expires_in=expires_in,
            length=size_bytes,
            content_type=content_type,
            sha256=None if sha256 is None else check_sha256(sha256),
        )
        return SignedRequest(url, "PUT", {"Content-Type": content_type, "Content-Length": str(size_bytes)})

    async def presign_get(self, key: str, *, expires_in: int, content_type: str | None = None) -> str:
        return self.signer.sign("GET", key, expires_in=expires_in, content_type=content_type or "")

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._file(key)
        try:
            return ObjectInfo(size=os.stat(path).st_size, sha256=_recorded_sha256(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BlobStoreError(f"stat failed: {exc.strerror}") from exc

    async def inspect(self, key: str, head_length: int) -> Inspection | None:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                recorded = _recorded_sha256(f.fileno())
                if recorded is not None:
                    return Inspection(size, recorded, f.read(head_length))
                if size <= _INLINE_READ_LIMIT:
                    data = f.read()
                    return Inspection(len(data), hashlib.sha256(data).hexdigest(), data[:head_length])
            return await asyncio.to_thread(_inspect_file, path, head_length)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BlobStoreError(f"read failed: {exc.strerror}") from exc

    async def read(self, key: str) -> bytes:
        path = self.path(key)
        try:
            if path.stat().st_size <= _INLINE_READ_LIMIT:
                return path.read_bytes()
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise BlobStoreError(f"read failed: {exc.strerror}") from exc

    async def download(self, key: str, path: Path) -> int:
        source = self.path(key)
        try:
            await asyncio.to_thread(shutil.copyfile, source, path)
            return path.stat().st_size
        except OSError as exc:
            raise BlobStoreError(f"read failed: {exc.strerror}") from exc

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, content_type: str, create_only: bool = False) -> int:
        target = self.path(key)
        tmp = self.new_temp_file()
        size = 0
        try:
            try:
                with open(tmp, "wb") as f:
                    async for chunk in chunks:
                        f.write(chunk)
                        size += len(chunk)
                    f.flush()
                    await asyncio.to_thread(os.fsync, f.fileno())
                if not await asyncio.to_thread(_put_in_place, tmp, target, create_only=create_only):
                    raise ObjectExists(f"{key} already exists")
            except BaseException:
                remove_quietly(tmp)
                raise
        except OSError as exc:
            raise BlobStoreError(f"write failed: {exc.strerror}") from exc
        return size

    def publish_new(self, tmp: str, key: str, *, sha256: str) -> bool:
        """Links a fully written temp file in as the object unless it exists; False if it did.

        A presigned PUT creates the object once: after finalize has verified the bytes,
        a still-valid URL must not be able to swap them. The caller has synced the file's
        bytes and hashed them (sha256, recorded with the object); the name is synced here.
        The caller removes the temp file.
        """
        target = self._file(key)
        _record_sha256(tmp, sha256)
        try:
            try:
                os.link(tmp, target)
            except FileNotFoundError:
                # The first object under this prefix: make its directory, once.
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(tmp, target)
        except FileExistsError:
            return False
        sync_directory(os.path.dirname(target))
        return True

    async def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise BlobStoreError(f"delete failed: {exc.strerror}") from exc

    async def delete_many(self, keys: list[str]) -> list[str]:
        loop = asyncio.get_running_loop()
        # Most keys of a reclaim batch were never uploaded: one thread finds the files
        # that exist (an lstat is cheap, and threads would only trade the GIL back and
        # forth over it). Unlinks are metadata writes that wait on the file system: a
        # few threads, each with a share of the existing files, overlap those waits.
        present, failed = await loop.run_in_executor(self._deleters, self._present, keys)
        shares = [present[i::_DELETE_THREADS] for i in range(_DELETE_THREADS)]
        unlinked = await asyncio.gather(
            *(loop.run_in_executor(self._deleters, self._unlink_each, share) for share in shares if share)
        )
        return failed + [key for share in unlinked for key in share]

    def _present(self, keys: list[str]) -> tuple[list[str], list[str]]:
        """The keys whose files may exist (lstat found them, or could not tell), and the invalid keys."""
        base = f"{self.root}{os.sep}"
        present, invalid = [], []
        for key in keys:
            if not is_valid_key(key):
                invalid.append(key)
                continue
            try:
                os.lstat(base + key)
            except FileNotFoundError:
                continue
            except OSError:
                pass
            present.append(key)
        return present, invalid

    def _unlink_each(self, keys: list[str]) -> list[str]:
        base = f"{self.root}{os.sep}"
        failed = []
        for key in keys:
            try:
                os.unlink(base + key)
            except FileNotFoundError:
                pass
            except OSError:
                failed.append(key)
        return failed

    async def list_page(self, prefix: str, *, after: str | None, limit: int) -> list[ListedObject]:
        check_list_args(prefix, limit)
        # A page means up to limit stat calls plus a few directory scans: blocking I/O that
        # would stall every other request on the loop when the disk is cold.
        return await asyncio.to_thread(self._list_page, prefix, after, limit)

    def _list_page(self, prefix: str, after: str | None, limit: int) -> list[ListedObject]:
        try:
            return list(islice(_walk(self.root / prefix, prefix, after), limit))
        except OSError as exc:
            raise BlobStoreError(f"list failed: {exc.strerror}") from exc

    async def move(self, key: str, new_key: str) -> None:
        source = self.path(key)
        target = self.path(new_key)
        if source == target:
            # Harmless here, but on S3 the copy-then-delete would destroy the object.
            raise ValueError(f"cannot move {key!r} onto itself")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            # S3's copy gives the moved object a fresh LastModified; matching it means
            # modified_at of a quarantined object says when it was quarantined on both.
            os.utime(target)
        except OSError as exc:
            raise BlobStoreError(f"move failed: {exc.strerror}") from exc

    async def close(self) -> None:
        self._deleters.shutdown(wait=False)
        self._temp_folder.release()

    async def start_partial(self, key: str, *, content_type: str) -> str | None:
        check_key(key)
        return None

    async def open_partial(
        self, partial_key: str, key: str, multipart_id: str | None, state: PartialState, digest: Digest
    ) -> _FsPartialWriter:
        path = self._file(partial_key)
        try:
            try:
                fd = os.open(path, os.O_WRONLY)
            except FileNotFoundError:
                fd = await asyncio.to_thread(_create_durably, path)
            try:
                # A writer that died after its write and before its checkpoint left bytes
                # nobody vouches for: the file is what the checkpoint says, no more.
                os.ftruncate(fd, state.received)
                os.lseek(fd, state.received, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise BlobStoreError(f"open failed: {exc.strerror}") from exc
        return _FsPartialWriter(fd, state.received, digest)

    async def publish_partial(self, partial_key: str, key: str, multipart_id: str | None, state: PartialState) -> None:
        source = self._file(partial_key)
        target = self._file(key)
        try:
            try:
                os.truncate(source, state.received)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # os.replace keeps the object's bytes immutable once published: no signed PUT URL
                # exists for a resumable upload, and the partial file goes away with the rename.
                os.replace(source, target)
            except FileNotFoundError:
                # Published by an earlier or concurrent call; the object is there (or finalize finds it missing).
                return
            # The partial file's bytes were synced at its last checkpoint; its new name is synced here.
            sync_directory(os.path.dirname(target))
        except OSError as exc:
            raise BlobStoreError(f"publish failed: {exc.strerror}") from exc

    async def discard_partial(self, partial_key: str, key: str, multipart_id: str | None) -> None:
        await self.delete(partial_key)

    async def list_multipart_uploads(self, prefix: str, *, after: MultipartUpload | None, limit: int) -> list[MultipartUpload]:
        check_list_args(prefix, limit)
        return []

    async def abort_multipart_upload(self, key: str, multipart_id: str) -> None:
        raise ValueError("the fs backend has no multipart uploads")


def _walk(directory: Path, key_prefix: str, after: str | None) -> Iterator[ListedObject]:
    """Objects below directory with keys after `after`, in S3's order (ascending by key).

    Only one directory's entries per level are held at a time, and a directory whose keys
    all sort at or before `after` is never opened, so resuming deep into a large tree costs
    a few directory scans rather than a walk over everything already listed.
    """
    try:
        with os.scandir(directory) as scan:
            # No key segment starts with ".", so this skips the private .tmp dir and any
            # stray hidden file, neither of which could be addressed as an object.
            entries = [(_sort_name(entry), entry) for entry in scan if not entry.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        # A prefix nobody wrote under yet (or that is an object itself) holds nothing.
        return
    # Keys compare as whole strings: "a-b" sorts before "a/x" because "-" < "/", so a
    # directory sorts as its name plus "/", the common start of every key inside it.
    entries.sort(key=lambda pair: pair[0])
    for name, entry in entries:
        key = key_prefix + name
        if name.endswith("/"):
            # Every key inside starts with key, so when `after` sorts later without starting
            # with it, `after` differs from it at an earlier, greater character: all of them
            # sort before `after` and the directory need not be opened.
            if after is None or key > after or after.startswith(key):
                yield from _walk(Path(entry.path), key, after)
            continue
        if after is not None and key <= after:
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            # Deleted or moved since the scan; a listing is not a snapshot.
            continue
        yield ListedObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, tz=UTC))


def _sort_name(entry: os.DirEntry[str]) -> str:
    return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name


class FileWriter:
    """Appends the pieces written to an open file in a worker thread, in order, and passes them to
    digest in another, while the event loop takes the next ones; sync() makes them durable.

    A write to the page cache can stall (first touch of memory on a VM, dirty-page throttling):
    in the thread it stalls the upload, not the event loop every request of the process shares.
    The thread starts the bytes on their way to disk every _SYNC_EVERY bytes (sync_file_range,
    which does not wait; fdatasync where there is none), so the sync at the end has little left
    to wait for. SHA-256 costs more than writing to the page cache, and done one after the other
    in a single thread they were the slowest stage of a tus chunk (bench/README.md, resumable):
    each has its thread, and the slower one sets the pace. The caller closes the file after settle().
    """

    def __init__(self, fd: int, digest: Digest, offset: int = 0) -> None:
        self._fd = fd
        self._offset = offset
        # The writer thread's own.
        self._writeback = _Writeback(fd, offset)
        self._writes = InOrder(self._write_batch, max_waiting_bytes=_WRITE_AHEAD)
        self._digests = InOrder(digest, max_waiting_bytes=_WRITE_AHEAD)

    async def write(self, data: bytes) -> None:
        """Queues data after what was written before; raises BlobStoreError of an earlier write."""
        await self._writes.put(data)
        await self._digests.put(data)
        self._offset += len(data)

    async def digested(self) -> None:
        """Returns once the digest has been given every byte written."""
        await self._digests.drain()

    async def sync(self) -> int:
        """Waits until everything written is on disk (the file's data and its size, what reading
        it back needs) and digested; the file's length then, or BlobStoreError."""
        await self._digests.drain()
        await self._writes.drain()
        try:
            await asyncio.to_thread(os.fdatasync, self._fd)
        except OSError as exc:
            raise BlobStoreError(f"fdatasync failed: {exc.strerror}") from exc
        self._writeback.synced(self._offset)
        return self._offset

    async def settle(self) -> None:
        """Waits for the threads to be done with the file and the digest, dropping what waits."""
        await self._writes.settle()
        await self._digests.settle()

    def _write_batch(self, batch: list[bytes]) -> None:
        try:
            for data in batch:
                _write_all(self._fd, data)
                self._writeback.wrote(len(data))
        except OSError as exc:
            raise BlobStoreError(f"write failed: {exc.strerror}") from exc


class _FsPartialWriter:
    """Appends to the partial file (FileWriter); flush() syncs it, so the checkpoint after it is true."""

    def __init__(self, fd: int, received: int, digest: Digest) -> None:
        self._fd = fd
        self._file = FileWriter(fd, digest, received)

    async def write(self, data: bytes) -> None:
        await self._file.write(data)

    async def digested(self) -> None:
        await self._file.digested()

    async def flush(self, *, final: bool) -> PartialState:
        return PartialState(await self._file.sync())

    async def close(self) -> None:
        # The descriptor goes once the threads are done with it, also when this caller is
        # cancelled while it waits (a chunk's cleanup cancelled again): not before, or a thread
        # could write to whatever file reuses the number, and not never.
        settled = asyncio.ensure_future(self._file.settle())
        settled.add_done_callback(lambda _: os.close(self._fd))
        await asyncio.shield(settled)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _put_in_place(tmp: str, target: Path, *, create_only: bool) -> bool:
    """Makes the synced temp file the object at target, durably; False when create_only found one there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if create_only:
        # A link fails where a rename would replace, so the first object stays.
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            remove_quietly(tmp)
    else:
        os.replace(tmp, target)
    sync_directory(str(target.parent))
    return True


def sync_directory(directory: str) -> None:
    """Makes the names just linked, renamed or created in directory durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _create_durably(path: str) -> int:
    """Creates the file, its name synced into its directory (and any new directory into its parent).

    A checkpoint vouches for the bytes once they are synced; a crash must not then take the
    file's name away with them.
    """
    directory = os.path.dirname(path)
    created = []
    missing = directory
    while not os.path.isdir(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for changed in {directory, *(os.path.dirname(new) for new in created)}:
            sync_directory(changed)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_quietly(path: str) -> None:
    """Removes a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _record_sha256(path: str, sha256: str) -> None:
    try:
        os.setxattr(path, _SHA256_XATTR, sha256.encode())
    except OSError as exc:
        if exc.errno not in _NO_XATTRS:
            raise


def _recorded_sha256(file: str | int) -> str | None:
    """The SHA-256 recorded with the object (its path or open descriptor) on write; None when
    there is none (or the file system keeps no extended attributes)."""
    try:
        value = os.getxattr(file, _SHA256_XATTR).decode("ascii", "replace")
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return None
        raise
    return value if is_sha256_hex(value) else None


def _inspect_file(path: str, head_length: int) -> Inspection:
    digest = hashlib.sha256()
    head = b""
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            if size < head_length:
                head += chunk[: head_length - size]
            digest.update(chunk)
            size += len(chunk)
    return Inspection(size, digest.hexdigest(), head)
