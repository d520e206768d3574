"""The S3 backend: objects in one bucket, reached through a single long-lived aioboto3 client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterable, Iterator
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

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
    StoredPart,
    check_key,
    check_list_args,
    check_sha256,
    is_valid_key,
)
from mediavault.config import S3_PART_BYTES, Settings
from mediavault.offload import InOrder

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef, HeadObjectOutputTypeDef

# At most this many bytes of a resumable upload wait on the event loop for the digest's thread.
_DIGEST_AHEAD = 1024 * 1024
_READ_CHUNK = 1024 * 1024
# S3's DeleteObjects takes at most 1,000 keys.
_DELETE_BATCH = 1000
# S3 returns at most this many keys per ListObjectsV2 call, whatever MaxKeys asks for.
_MAX_LIST_KEYS = 1000
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
_S3_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError)


class S3BlobStore:
    def __init__(
        self, client: S3Client, bucket: str, exit_stack: contextlib.AsyncExitStack, *, partial_part_size: int = S3_PART_BYTES
    ) -> None:
        self._client = client
        self.bucket = bucket
        self._exit_stack = exit_stack
        # Resumable uploads send parts of this size whatever the tus chunk size: the writer holds
        # one part in memory, and each part sent is a durable point inside a longer chunk.
        self.partial_part_size = partial_part_size

    @classmethod
    async def open(cls, settings: Settings) -> S3BlobStore:
        endpoint_url = settings.s3_endpoint_url or None
        config = AioConfig(
            signature_version="s3v4",
            # Bounded, where botocore's defaults (60 s to connect, 60 s per read) keep a call on an
            # S3 that stopped answering waiting for minutes.
            connect_timeout=settings.s3_connect_timeout_seconds,
            read_timeout=settings.s3_read_timeout_seconds,
            # Jittered attempts (standard mode), three by default instead of the legacy mode's five: a
            # dead endpoint fails fast.
            retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
            # S3-compatible endpoints (moto, MinIO) rarely resolve bucket subdomains.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        exit_stack = contextlib.AsyncExitStack()
        client = await exit_stack.enter_async_context(
            aioboto3.Session().client(
                "s3", region_name=settings.s3_region, endpoint_url=endpoint_url, config=config
            )
        )
        return cls(client, settings.s3_bucket, exit_stack, partial_part_size=settings.s3_part_size)

    async def ensure_bucket(self) -> None:
        """Creates the bucket unless it exists; production buckets are provisioned outside mediavault."""
        with _translate_errors("create bucket"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_not_found(exc):
                    raise
            params: dict[str, Any] = {"Bucket": self.bucket}
            region = self._client.meta.region_name
            # us-east-1 is the one region S3 rejects as an explicit location constraint.
            if region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                await self._client.create_bucket(**params)
            except ClientError as exc:
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

    async def presign_put(
        self, key: str, *, size_bytes: int, content_type: str, sha256: str | None, expires_in: int
    ) -> SignedRequest:
        # Every header below is part of the signature, so S3 refuses a PUT that changes any of
        # them: another length, another type, a body not matching the checksum, or a second
        # PUT after the object exists (If-None-Match), which keeps finalized bytes immutable.
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": check_key(key),
            "ContentType": content_type,
            "ContentLength": size_bytes,
            "IfNoneMatch": "*",
        }
        headers = {"Content-Type": content_type, "Content-Length": str(size_bytes), "If-None-Match": "*"}
        if sha256 is not None:
            checksum = base64.b64encode(bytes.fromhex(check_sha256(sha256))).decode()
            params["ChecksumSHA256"] = checksum
            headers["x-amz-checksum-sha256"] = checksum
        with _translate_errors("presign"):
            url = await self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires_in)
        return SignedRequest(url, "PUT", headers)

    async def presign_get(self, key: str, *, expires_in: int, content_type: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": check_key(key)}
        if content_type:
            params["ResponseContentType"] = content_type
        with _translate_errors("presign"):
            return await self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    async def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        with _translate_errors("stat"):
            try:
                head = await self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            except ClientError as exc:
                if _is_not_found(exc):
                    return None
                raise
        return ObjectInfo(size=head["ContentLength"], sha256=_full_object_sha256(head))

    async def read(self, key: str) -> bytes:
        check_key(key)
        with _translate_errors("read"):
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            async with body:
                return await body.read()

    async def download(self, key: str, path: Path) -> int:
        check_key(key)
        size = 0
        with _translate_errors("read"), path.open("wb") as file:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            async with body:
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    await asyncio.to_thread(file.write, chunk)
                    size += len(chunk)
        return size

    async def inspect(self, key: str, head_length: int) -> Inspection | None:
        info = await self.stat(key)
        if info is None:
            return None
        if info.sha256 is not None:
            return Inspection(info.size, info.sha256, await self._read_prefix(key, head_length))
        digest = hashlib.sha256()
        head = b""
        size = 0
        with _translate_errors("read"):
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return None
                raise
            body = response["Body"]
            async with body:
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    if size < head_length:
                        head += chunk[: head_length - size]
                    digest.update(chunk)
                    size += len(chunk)
        return Inspection(size, digest.hexdigest(), head)

    async def _read_prefix(self, key: str, length: int) -> bytes:
        # "bytes=0--1" is not a valid range and S3 would answer with the whole object.
        if length < 1:
            return b""
        with _translate_errors("read"):
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{length - 1}")
            except ClientError as exc:
                # S3 refuses any range on an empty object; a shorter non-empty one is just returned whole.
                if _error_code(exc) == "InvalidRange":
                    return b""
                raise
            body = response["Body"]
            # Entering the body yields the raw aiohttp response; reads go through the
            # botocore wrapper, which checks the length and maps transport errors.
            async with body:
                return await body.read()

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, content_type: str, create_only: bool = False) -> int:
        check_key(key)
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        condition: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
        with _translate_errors("write", exists_as=key if create_only else None):
            try:
                async for chunk in chunks:
                    buffer += chunk
                    size += len(chunk)
                    # Flush only once more data is known to follow, so that whatever fits
                    # one buffer is stored with a single PUT instead of a multipart upload.
                    while len(buffer) > S3_PART_BYTES:
                        if upload_id is None:
                            created = await self._client.create_multipart_upload(
                                Bucket=self.bucket, Key=key, ContentType=content_type
                            )
                            upload_id = created["UploadId"]
                        part = bytes(buffer[:S3_PART_BYTES])
                        del buffer[:S3_PART_BYTES]
                        parts.append(await self._upload_part(key, upload_id, len(parts) + 1, part))
                if upload_id is None:
                    await self._client.put_object(
                        Bucket=self.bucket, Key=key, Body=bytes(buffer), ContentType=content_type, **condition
                    )
                else:
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    await self._client.complete_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **condition
                    )
            except BaseException:
                if upload_id is not None:
                    await self._abort_upload(key, upload_id)
                raise
        return size

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> CompletedPartTypeDef:
        part = await self._client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"ETag": part["ETag"], "PartNumber": number}

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        # Best effort: the original failure is what the caller needs to see; an upload that could
        # not be aborted here is aborted by the orphan sweep once older than its grace period.
        with contextlib.suppress(*_S3_ERRORS):
            await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    async def delete(self, key: str) -> None:
        check_key(key)
        with _translate_errors("delete"):
            await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def delete_many(self, keys: list[str]) -> list[str]:
        failed = [key for key in keys if not is_valid_key(key)]
        valid = [key for key in keys if is_valid_key(key)]
        for start in range(0, len(valid), _DELETE_BATCH):
            batch = valid[start : start + _DELETE_BATCH]
            try:
                response = await self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
                )
            except _S3_ERRORS:
                failed.extend(batch)
                continue
            failed.extend(error["Key"] for error in response.get("Errors", []))
        return failed

    async def list_page(self, prefix: str, *, after: str | None, limit: int) -> list[ListedObject]:
        check_list_args(prefix, limit)
        page: list[ListedObject] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after is not None:
            params["StartAfter"] = after
        with _translate_errors("list"):
            # One call returns at most 1000 keys, and a short page tells the caller the
            # listing is over, so larger limits are filled from further calls.
            while len(page) < limit:
                response = await self._client.list_objects_v2(
                    **params, MaxKeys=min(limit - len(page), _MAX_LIST_KEYS)
                )
                page.extend(
                    ListedObject(item["Key"], item["Size"], item["LastModified"].astimezone(UTC))
                    for item in response.get("Contents", [])
                )
                if not response["IsTruncated"]:
                    break
                params["StartAfter"] = page[-1].key
        return page

    async def move(self, key: str, new_key: str) -> None:
        if check_key(key) == check_key(new_key):
            # Deleting after copying onto itself would destroy the object.
            raise ValueError(f"cannot move {key!r} onto itself")
        with _translate_errors("move"):
            # CopyObject handles objects up to 5 GiB, ten times the default video size limit.
            # Not atomic: if the delete fails the object is in both places, and repeating the
            # move finishes it.
            await self._client.copy_object(
                Bucket=self.bucket, Key=new_key, CopySource={"Bucket": self.bucket, "Key": key}
            )
            await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def close(self) -> None:
        await self._exit_stack.aclose()

    async def start_partial(self, key: str, *, content_type: str) -> str | None:
        with _translate_errors("start multipart"):
            created = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=check_key(key), ContentType=content_type
            )
        return created["UploadId"]

    async def open_partial(
        self, partial_key: str, key: str, multipart_id: str | None, state: PartialState, digest: Digest
    ) -> _S3PartialWriter:
        if multipart_id is None:
            raise ValueError("an S3 resumable upload needs its multipart upload id")
        tail = b""
        if state.tail_bytes:
            # Only the bytes the checkpoint vouches for: a writer that died may have stored more.
            with _translate_errors("read tail"):
                response = await self._client.get_object(
                    Bucket=self.bucket,
                    Key=tail_key(partial_key, len(state.parts) + 1),
                    Range=f"bytes=0-{state.tail_bytes - 1}",
                )
                body = response["Body"]
                async with body:
                    tail = await body.read()
            if len(tail) != state.tail_bytes:
                raise BlobStoreError("read tail failed: shorter than its checkpoint")
        return _S3PartialWriter(self, partial_key, check_key(key), multipart_id, state, tail, digest)

    async def upload_partial_part(self, key: str, multipart_id: str, number: int, data: bytes) -> str:
        with _translate_errors("upload part"):
            part = await self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=multipart_id, PartNumber=number, Body=data
            )
        return part["ETag"]

    async def put_tail(self, partial_key: str, number: int, data: bytes) -> None:
        with _translate_errors("write tail"):
            await self._client.put_object(Bucket=self.bucket, Key=tail_key(partial_key, number), Body=data)

    async def publish_partial(self, partial_key: str, key: str, multipart_id: str | None, state: PartialState) -> None:
        if multipart_id is None:
            raise ValueError("an S3 resumable upload needs its multipart upload id")
        parts: list[CompletedPartTypeDef] = [
            {"ETag": etag, "PartNumber": number} for number, etag in enumerate(state.parts, 1)
        ]
        with _translate_errors("complete multipart"):
            try:
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=check_key(key), UploadId=multipart_id, MultipartUpload={"Parts": parts}
                )
            except ClientError as exc:
                # Completed by an earlier call whose commit did not follow: the object is there.
                if _error_code(exc) != "NoSuchUpload" or await self.stat(key) is None:
                    raise
        await self._delete_tails(partial_key)

    async def presign_upload_part(
        self, key: str, multipart_id: str, number: int, *, size_bytes: int, sha256: str | None, expires_in: int
    ) -> SignedRequest:
        # Signed in, so S3 refuses a part of any other length: the parts cannot hold more than the upload reserved.
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": check_key(key),
            "UploadId": multipart_id,
            "PartNumber": number,
            "ContentLength": size_bytes,
        }
        headers: dict[str, str] = {"Content-Length": str(size_bytes)}
        if sha256 is not None:
            # Signed in, so S3 refuses a part whose bytes do not have this digest.
            checksum = base64.b64encode(bytes.fromhex(check_sha256(sha256))).decode()
            params["ChecksumSHA256"] = checksum
            headers["x-amz-checksum-sha256"] = checksum
        with _translate_errors("presign"):
            url = await self._client.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires_in)
        return SignedRequest(url, "PUT", headers)

    async def list_parts(self, key: str, multipart_id: str) -> list[StoredPart]:
        parts: list[StoredPart] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": check_key(key), "UploadId": multipart_id}
        with _translate_errors("list parts"):
            while True:
                try:
                    response = await self._client.list_parts(**params)
                except ClientError as exc:
                    # Completed or aborted: it holds no parts any more.
                    if _error_code(exc) == "NoSuchUpload":
                        return []
                    raise
                parts.extend(StoredPart(p["PartNumber"], p["Size"], p["ETag"]) for p in response.get("Parts", []))
                if not response.get("IsTruncated"):
                    return parts
                params["PartNumberMarker"] = response["NextPartNumberMarker"]

    async def complete_parts(self, key: str, multipart_id: str, parts: list[StoredPart]) -> None:
        completed: list[CompletedPartTypeDef] = [{"ETag": p.etag, "PartNumber": p.number} for p in parts]
        with _translate_errors("complete multipart"):
            try:
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=check_key(key), UploadId=multipart_id, MultipartUpload={"Parts": completed}
                )
            except ClientError as exc:
                if _error_code(exc) != "NoSuchUpload" or await self.stat(key) is None:
                    raise

    async def discard_partial(self, partial_key: str, key: str, multipart_id: str | None) -> None:
        if multipart_id is not None:
            await self.abort_multipart_upload(key, multipart_id)
        await self._delete_tails(partial_key)

    async def list_multipart_uploads(self, prefix: str, *, after: MultipartUpload | None, limit: int) -> list[MultipartUpload]:
        check_list_args(prefix, limit)
        page: list[MultipartUpload] = []
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after is not None:
            params.update(KeyMarker=after.key, UploadIdMarker=after.multipart_id)
        with _translate_errors("list multipart uploads"):
            # Filled from further calls, as list_page's: one returns at most 1000 uploads.
            while len(page) < limit:
                response = await self._client.list_multipart_uploads(
                    **params, MaxUploads=min(limit - len(page), _MAX_LIST_KEYS)
                )
                page.extend(
                    MultipartUpload(item["Key"], item["UploadId"], item["Initiated"].astimezone(UTC))
                    for item in response.get("Uploads", [])
                )
                if not response.get("IsTruncated"):
                    break
                params.update(KeyMarker=response["NextKeyMarker"], UploadIdMarker=response["NextUploadIdMarker"])
        return page

    async def abort_multipart_upload(self, key: str, multipart_id: str) -> None:
        with _translate_errors("abort multipart"):
            try:
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=check_key(key), UploadId=multipart_id)
            except ClientError as exc:
                if _error_code(exc) != "NoSuchUpload":
                    raise

    async def _delete_tails(self, partial_key: str) -> None:
        with _translate_errors("list tails"):
            # An upload has at most one tail object per part: far fewer than one listing page.
            response = await self._client.list_objects_v2(Bucket=self.bucket, Prefix=check_key(partial_key) + "-")
        tails = [item["Key"] for item in response.get("Contents", [])]
        if tails and (failed := await self.delete_many(tails)):
            raise BlobStoreError(f"delete failed for {len(failed)} tail objects")


def tail_key(partial_key: str, part_number: int) -> str:
    """The object holding the bytes that will begin part part_number, until it can be sent whole."""
    return f"{partial_key}-{part_number}"


class _S3PartialWriter:
    """Sends whole parts as soon as they are buffered; flush() stores what is left in a tail object.

    Each part covers fixed offsets of the object, so a part sent again after a writer died
    replaces the same bytes. A tail object is named after the part it will begin, so writing
    one never overwrites the tail an older checkpoint still names. The digest runs in a worker
    thread while the parts are sent.
    """

    def __init__(
        self,
        store: S3BlobStore,
        partial_key: str,
        key: str,
        multipart_id: str,
        state: PartialState,
        tail: bytes,
        digest: Digest,
    ) -> None:
        self._store = store
        self._partial_key = partial_key
        self._key = key
        self._multipart_id = multipart_id
        self._parts = list(state.parts)
        self._buffer = bytearray(tail)
        self._received = state.received
        self._part_size = store.partial_part_size
        self._digests = InOrder(digest, max_waiting_bytes=_DIGEST_AHEAD)

    async def write(self, data: bytes) -> None:
        await self._digests.put(data)
        self._buffer += data
        self._received += len(data)
        while len(self._buffer) >= self._part_size:
            await self._send_part(bytes(self._buffer[: self._part_size]))
            del self._buffer[: self._part_size]

    async def _send_part(self, data: bytes) -> None:
        number = len(self._parts) + 1
        self._parts.append(await self._store.upload_partial_part(self._key, self._multipart_id, number, data))

    async def digested(self) -> None:
        await self._digests.drain()

    async def flush(self, *, final: bool) -> PartialState:
        if self._buffer:
            if final:
                await self._send_part(bytes(self._buffer))
                self._buffer.clear()
            else:
                await self._store.put_tail(self._partial_key, len(self._parts) + 1, bytes(self._buffer))
        # After the last part or tail: the digest catches up while they are sent.
        await self._digests.drain()
        return PartialState(self._received, tuple(self._parts), len(self._buffer))

    async def close(self) -> None:
        await self._digests.settle()
        self._buffer.clear()


@contextlib.contextmanager
def _translate_errors(action: str, *, exists_as: str | None = None) -> Iterator[None]:
    # The S3 error code or exception type is what a caller can act on; the chained
    # exception keeps the full detail for logs.
    try:
        yield
    except ClientError as exc:
        if exists_as is not None and _error_code(exc) == "PreconditionFailed":
            raise ObjectExists(f"{exists_as} already exists") from exc
        raise BlobStoreError(f"{action} failed: {_error_code(exc)}") from exc
    except _S3_ERRORS as exc:
        raise BlobStoreError(f"{action} failed: {type(exc).__name__}") from exc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND


def _full_object_sha256(head: HeadObjectOutputTypeDef) -> str | None:
    """The SHA-256 S3 verified on upload, if it covers the whole object.

    Multipart uploads record a checksum of the part checksums ("<base64>-<parts>"), which
    says nothing a caller could compare with a digest of the bytes.
    """
    checksum = head.get("ChecksumSHA256")
    if not checksum or head.get("ChecksumType") == "COMPOSITE" or "-" in checksum:
        return None
    # S3 only records checksums it verified, but S3-compatible stores (moto among them)
    # may keep whatever value a client sent.
    try:
        digest = base64.b64decode(checksum, validate=True)
    except ValueError:
        return None
    return digest.hex() if len(digest) == hashlib.sha256().digest_size else None
