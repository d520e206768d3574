from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from arq import Worker, cron
from arq.connections import RedisSettings
from opentelemetry.sdk.trace import TracerProvider

from mediavault import logs
from mediavault.config import Settings
from mediavault.storage.v1 import storage_pb2 as pb
from workers.maintenance import observe_queue

TEXT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")


@pytest.fixture
def root_logging():
    """Puts back what logs.configure changes in this process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logs.CHATTY_LOGGERS}
    arq_filters = logging.getLogger("arq.worker").filters[:]
    yield
    root.handlers[:], root.level = handlers, level
    for name, chatty_level in levels.items():
        logging.getLogger(name).setLevel(chatty_level)
    logging.getLogger("arq.worker").filters[:] = arq_filters
    logging.captureWarnings(False)


def _read_until(fd: int, done, timeout: float) -> str:
    """What a pty master or pipe gives until done(text_so_far) or end of output."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not done(b"".join(chunks).decode(errors="replace")) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side has closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _one_line_from(stream_fd: int, read_fd: int, log_format: str) -> str:
    with open(stream_fd, "w", closefd=False) as stream:
        logs.configure("INFO", log_format, stream)
        logging.getLogger("mediavault.server").info("server started", extra={"grpc_port": 50051})
        # Nothing may write to the stream once it is closed, before root_logging puts the handlers back.
        logging.getLogger().handlers.clear()
    return _read_until(read_fd, lambda text: text.endswith("\n"), timeout=5).strip()


def test_json_line_carries_request_id_and_extras():
    token = logs.request_id.set("req-42")
    try:
        record = logging.LogRecord("mediavault.rpc", logging.INFO, __file__, 1, "rpc", None, None)
        record.outcome = "OK"
        line = logs.JsonFormatter().format(record)
    finally:
        logs.request_id.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "req-42"
    assert entry["outcome"] == "OK"
    assert entry["msg"] == "rpc"
    assert "trace_id" not in entry
    assert "span_id" not in entry


def test_json_line_in_a_span_carries_its_trace_and_span_ids():
    provider = TracerProvider()
    record = logging.LogRecord("mediavault.rpc", logging.INFO, __file__, 1, "rpc", None, None)
    with provider.get_tracer("test").start_as_current_span("call") as span:
        entry = json.loads(logs.JsonFormatter().format(record))
    context = span.get_span_context()
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"
    provider.shutdown()


async def test_request_id_is_echoed_in_trailers(storage, auth, user_id):
    call = storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(*auth(user_id), ("x-request-id", "abc-123")))
    await call
    assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("x-request-id", "def-456"),))
    assert ("x-request-id", "def-456") in tuple(caught.value.trailing_metadata())


async def test_a_call_without_request_id_gets_a_new_one(storage, auth, user_id):
    seen = set()
    for _ in range(3):
        call = storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
        await call
        ids = [value for key, value in await call.trailing_metadata() if key == "x-request-id"]
        assert len(ids) == 1
        assert len(ids[0]) == 32
        seen.add(ids[0])
    assert len(seen) == 3


async def test_tokens_never_reach_the_logs(storage, auth, user_id, caplog):
    import logging

    md = auth(user_id)
    token = md[0][1].split(" ", 1)[1]
    with caplog.at_level(logging.DEBUG):
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError):
            await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("authorization", f"Bearer {token}x"),))
    lines = [logs.JsonFormatter().format(record) for record in caplog.records]
    assert any('"rpc": "StorageService/GetStorageSummary"' in line for line in lines)
    assert not any(token in line for line in lines)


def test_text_line_shows_the_fields_worth_seeing():
    token = logs.request_id.set("req-42")
    try:
        record = logging.LogRecord("workers.maintenance", logging.INFO, __file__, 1, "job run", None, None)
        record.__dict__.update(
            job="expire_ephemeral_media", dry_run=False, scanned=0, changed=3, errors=0, details={},
            duration_ms=21.4, reason="no such key", peer="ipv4:127.0.0.1:5000",
        )
        line = logs.TextFormatter().format(record)
    finally:
        logs.request_id.reset(token)
    assert TEXT_LINE.match(line), line
    assert line.split(" ", 1)[1] == (
        'INFO    workers.maintenance: job run job=expire_ephemeral_media changed=3 duration_ms=21.4 reason="no such key"'
    )


def test_text_line_of_an_error_carries_its_traceback():
    try:
        raise ValueError("bad pixels")
    except ValueError:
        record = logging.LogRecord("workers.transcode", logging.ERROR, __file__, 1, "transcode failed", None, sys.exc_info())
    first, *rest = logs.TextFormatter().format(record).splitlines()
    assert first.endswith(" ERROR   workers.transcode: transcode failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad pixels"


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    ("log_format", "terminal", "text"),
    [("auto", True, True), ("auto", False, False), ("json", True, False), ("text", False, True)],
)
def test_text_in_a_terminal_json_elsewhere(log_format, terminal, text):
    read_fd, write_fd = pty.openpty() if terminal else os.pipe()
    try:
        line = _one_line_from(write_fd, read_fd, log_format)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    if text:
        assert TEXT_LINE.match(line), line
        assert line.endswith(" INFO    mediavault.server: server started grpc_port=50051"), line
    else:
        entry = json.loads(line)
        assert (entry["logger"], entry["msg"], entry["grpc_port"]) == ("mediavault.server", "server started", 50051)


def test_log_format_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDIAVAULT_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("MEDIAVAULT_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()


@pytest.mark.usefixtures("root_logging")
async def test_routine_cron_lines_are_debug(make_settings, redis_url):
    async def console(level: str) -> str:
        stream = io.StringIO()
        logs.configure(level, "text", stream)
        settings = make_settings(queue_name=f"mediavault-test:{uuid.uuid4().hex}")
        probe = cron(observe_queue, name="cron:observe_queue", second=set(range(60)), run_at_startup=True, unique=False)
        worker = Worker(
            functions=[], cron_jobs=[probe], redis_settings=RedisSettings.from_dsn(redis_url), queue_name=settings.queue_name,
            poll_delay=0.05, ctx={"settings": settings}, handle_signals=False,
        )
        task = asyncio.create_task(worker.async_run())
        try:
            async with asyncio.timeout(20):
                while worker.jobs_complete < 1:
                    await asyncio.sleep(0.05)
        finally:
            await worker.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return stream.getvalue()

    info = await console("INFO")
    assert "INFO    arq.worker: Starting worker" in info
    assert "→ cron:observe_queue" not in info, info
    assert "← cron:observe_queue" not in info, info
    debug = await console("DEBUG")
    assert re.search(r"DEBUG   arq\.worker: +[\d.]+s → cron:observe_queue\(\)", debug), debug
    assert re.search(r"DEBUG   arq\.worker: +[\d.]+s ← cron:observe_queue ● \d+$", debug, re.MULTILINE), debug


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    # Not under tmp_path: pgserver opens the data dir's parents to its own user, and every
    # pytest session that starts closes /tmp/pytest-of-<user> again.
    path = Path(tempfile.mkdtemp(prefix="mediavault-dev-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_dev_in_a_terminal_prints_one_short_line_per_log(dev_dir):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDIAVAULT_")}
    env.update(MEDIAVAULT_GRPC_ADDR="127.0.0.1:0", MEDIAVAULT_HTTP_ADDR="127.0.0.1:0")
    master, terminal = pty.openpty()
    dev = subprocess.Popen(
        [sys.executable, "-m", "mediavault.cli", "dev", "--data-dir", str(dev_dir / "data")],
        stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=dev_dir, start_new_session=True,
    )
    os.close(terminal)
    try:
        # The photo, video and cron queues each have their worker, as under `mediavault worker`.
        started = _read_until(
            master,
            lambda text: all(name in text for name in ("transcode_media", "transcode_video", "cron:reclaim_stale_uploads")),
            timeout=90,
        )
        dev.send_signal(signal.SIGINT)
        dev.wait(timeout=60)
        stopping = _read_until(master, lambda _text: False, timeout=2)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        os.close(master)
    assert dev.returncode == 0, started + stopping
    assert "mediavault dev stack is up" in started, started
    workers = [line for line in started.splitlines() if "arq.worker: Starting worker" in line]
    assert len(workers) == 3, started
    assert any("transcode_video" in line for line in workers), "videos are transcoded in dev too"
    log_lines = [line for line in started.splitlines() if TEXT_LINE.match(line)]
    assert any(" INFO    mediavault.server: server started grpc_port=" in line for line in log_lines), started
    assert any(line.endswith(" INFO    mediavault.db.migrate: migration applied migration=0001_init") for line in log_lines), started
    assert not any(line.lstrip().startswith("{") for line in started.splitlines()), "no JSON in a terminal"
    assert "pgserver" not in started, "the embedded PostgreSQL's routine stays below WARNING"
