"""Small helpers shared by tests: PUT to a signed URL, read rich error details."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from mediavault import logs
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import JWT_SECRET

JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def fake_jpeg(size: int, fill: bytes = b"\x5a") -> bytes:
    """Bytes that sniff as JPEG; enough for quota and verification tests that never decode pixels."""
    return (JPEG_HEAD + fill * size)[:size]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def exported_by(metrics_port: int, name: str, by: str, **labels: str) -> dict[str, float]:
    """The values of the /metrics endpoint's samples called `name` that carry `labels`, by their label `by`."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
        text = await response.text()
    return {
        sample.labels[by]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    }


async def http_answers_counted(metrics_port: int, route: str, method: str) -> dict[str, float]:
    """The /metrics endpoint's mediavault_http_requests_total of the listener's route and method, by status."""
    return await exported_by(metrics_port, "mediavault_http_requests_total", "status", route=route, method=method)


async def http_answers_counted_since(metrics_port: int, route: str, method: str, before: dict[str, float], answers: int) -> dict[str, float]:
    """The answers of the listener's route and method counted since http_answers_counted gave
    `before`, by status, once they are `answers` or more, or else as they are after 10 seconds: an
    answer is counted as it starts, which may be after the client that asked for it is gone."""
    counted: dict[str, float] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while sum(counted.values()) < answers:
                await asyncio.sleep(0.05)
                after = await http_answers_counted(metrics_port, route, method)
                counted = {status: value - before.get(status, 0.0) for status, value in after.items() if value != before.get(status)}
    return counted


# The service's own loggers and the HTTP server's, not the workers' (`workers.*`): the session's
# worker in the test process logs its own jobs' failures meanwhile.
_SERVICE_LOGGERS = ("mediavault", "aiohttp")


@contextlib.contextmanager
def logged_lines(level: int = logging.WARNING) -> Iterator[list[dict]]:
    """The lines the service's loggers log at `level` or above meanwhile, as logs.JsonFormatter
    writes them: formatted as each is logged, in the context that gives it its request id and span."""
    lines: list[dict] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(logs.JsonFormatter().format(record)))

    handler = Lines(level)
    for name in _SERVICE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield lines
    finally:
        for name in _SERVICE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)


async def put(url: str, headers: dict[str, str], body: bytes) -> int:
    async with aiohttp.ClientSession() as session, session.put(url, data=body, headers=headers) as response:
        await response.read()
        return response.status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    infos = [d for d in rich_status(error).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, "exactly one ErrorInfo"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad
    raise AssertionError("no BadRequest detail")


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


async def begin(storage, auth_md, data: bytes, *, content_type: str = "image/jpeg", with_sha: bool = True, **fields):
    request = pb.BeginUploadRequest(
        filename=fields.pop("filename", "photo.jpg"),
        content_type=content_type,
        size_bytes=fields.pop("size_bytes", len(data)),
        sha256=sha256_hex(data) if with_sha else "",
        **fields,
    )
    return await storage.BeginUpload(request, metadata=auth_md)


async def upload(storage, auth_md, data: bytes, **fields) -> pb.FinalizeUploadResponse:
    """The whole URL path: Begin, PUT, Finalize."""
    begun = await begin(storage, auth_md, data, **fields)
    status = await put(begun.upload_url, dict(begun.upload_headers), data)
    assert status == 200, status
    return await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=auth_md)


TERMINAL = (mpb.PROCESSING_STATUS_COMPLETE, mpb.PROCESSING_STATUS_FAILED)


async def settled(media, md, media_id: str, timeout: float = 60.0) -> mpb.Media:
    """Polls GetMedia until processing ends."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        item = (await media.GetMedia(mpb.GetMediaRequest(media_id=media_id), metadata=md)).media
        if item.processing_status in TERMINAL:
            return item
        assert asyncio.get_running_loop().time() < deadline, f"media {media_id} still {item.processing_status}"
        await asyncio.sleep(0.05)


async def retry_scheduled(pool: asyncpg.Pool, media_id: str, timeout: float = 30.0) -> bool:
    """Whether the media's run is seen waiting for its next attempt after a temporary error
    (the worker's retry_later) within timeout seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        row = await pool.fetchrow("SELECT processing_error, next_attempt_at FROM media WHERE media_id = $1::uuid", media_id)
        if row["next_attempt_at"] is not None and row["processing_error"] == "temporary error, retrying":
            return True
        await asyncio.sleep(0.01)
    return False


async def until_waiting_for_lock(pool: asyncpg.Pool, call: asyncio.Future, statement: str, timeout: float = 30.0) -> None:
    """Returns once a session of this test's database waits for a lock in a statement LIKE
    statement: the call's, which ending first fails at once, and not waiting by timeout fails.
    Other databases' sessions are other tests' (or another run's) and may run the same statements."""
    waiting = ("SELECT count(*) FROM pg_stat_activity "
               "WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1")
    async with asyncio.timeout(timeout):
        while not await pool.fetchval(waiting, statement):
            assert not call.done(), call
            await asyncio.sleep(0.02)


async def fetch(url: str, headers: dict | None = None):
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status, await response.read(), response.headers.copy()


@contextlib.asynccontextmanager
async def serve_environment(database_url: str, redis_url: str, blob_dir: Path, **extra: str) -> AsyncIterator[dict[str, str]]:
    """The environment of a `mediavault serve` subprocess on a queue of its own, without the caller's MEDIAVAULT_*."""
    queue_name = f"mediavault-test-serve:{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(
        MEDIAVAULT_DATABASE_URL=database_url,
        MEDIAVAULT_REDIS_URL=redis_url,
        MEDIAVAULT_QUEUE_NAME=queue_name,
        MEDIAVAULT_HTTP_ADDR="127.0.0.1:0",
        MEDIAVAULT_BLOB_DIR=str(blob_dir),
        MEDIAVAULT_JWT_SECRET=JWT_SECRET,
        MEDIAVAULT_RATE_LIMITS="off",
        MEDIAVAULT_LOG_LEVEL="WARNING",
        **extra,
    )
    yield env
    # Nobody works this queue: its transcode jobs would otherwise stay in Redis for a day.
    redis = Redis.from_url(redis_url)
    try:
        job_ids = await redis.zrange(queue_name, 0, -1)
        await redis.delete(queue_name, *(b"arq:job:" + job_id for job_id in job_ids))
    finally:
        await redis.aclose()


PARTITION_BOUNDS = """
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz AS lower,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz AS upper
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_events'::regclass
ORDER BY lower
"""


# Zones east of UTC whose abbreviation, which the SQL DateStyle prints, PostgreSQL reads as
# another zone's (CST as US Central, IST as Israel's): a timestamp put through text comes back
# hours off.
MISREAD_ZONES = ("Asia/Shanghai", "Asia/Kolkata")


async def set_session_defaults(admin_url: str, dsn: str, zone: str) -> None:
    """Makes zone and the SQL DateStyle, day first, the defaults of the database's sessions."""
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = '{zone}'")
        await admin.execute(f"ALTER DATABASE \"{name}\" SET datestyle = 'SQL, DMY'")
    finally:
        await admin.close()


# partition_days reads bounds as text, as the session prints them: where a database defaults to
# MISREAD_ZONES, read them on a connection with these.
UTC_SESSION = {"timezone": "UTC", "datestyle": "ISO, YMD"}


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def partition_days(conn: asyncpg.Connection | asyncpg.Pool) -> dict[date, str]:
    """Each partition's UTC day, after checking that it spans exactly that day."""
    days = {}
    for row in await conn.fetch(PARTITION_BOUNDS):
        day = row["lower"].astimezone(UTC).date()
        assert (row["lower"], row["upper"]) == (midnight(day), midnight(day + timedelta(days=1))), row["name"]
        days[day] = row["name"]
    return days


def other_uuid_spellings(written: str) -> dict[str, str]:
    """By name, spellings of the UUID `written` (8-4-4-4-12 hex digits) that uuid.UUID reads and
    the API does not; the last three put another character in place of one of its digits."""
    compact = written.replace("-", "")
    return {
        "braces": "{" + written + "}",
        "urn": "urn:uuid:" + written,
        "no-hyphens": compact,
        "hyphens-elsewhere": f"{compact[:4]}-{compact[4:]}",
        "arabic-indic-digits": written.translate(str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")),
        "underscore": written[:7] + "_" + written[8:],
        "plus-sign": "+" + written[1:],
        "leading-space": " " + written[1:],
    }
