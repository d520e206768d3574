"""What the benchmarks run against, the harness of bench/ (bench/run.py does not run it).

bench_postgres() yields an admin URL: MEDIAVAULT_BENCH_DATABASE_URL, else
MEDIAVAULT_TEST_DATABASE_URL, else an embedded PostgreSQL's (mediavault.devservers);
bench_database(admin_url) a database of the run's own on it, DROPped at the end; bench_redis()
MEDIAVAULT_BENCH_REDIS_URL, else MEDIAVAULT_TEST_REDIS_URL, else an embedded Valkey's.

bench_stack() is one `mediavault serve` process on such a database:

    with bench_stack() as stack:
        ...  # drive the server at stack.target (HOST:PORT), sign tokens with stack.jwt_secret

The jobs the server enqueued (a queue of the run's own) are deleted at the end.
No worker runs unless with_worker=True. With pooler="pgbouncer" the server reaches its database
through a PgBouncer of the run's own in transaction mode (mediavault.devservers.pgbouncer, one
server connection per connection of the server's pool) and migrates it directly. Blobs go to a temp dir, the JWT secret is random, ports are free
ones. The server logs at MEDIAVAULT_BENCH_LOG_LEVEL (default WARNING, so that per-RPC log
lines do not distort the numbers) into a file whose tail is shown if the server fails.

`python bench/stack.py` starts a stack, prints its target, JWT secret and server pid, and
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
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mediavault import devservers

STARTUP_TIMEOUT_S = 60.0
# The server's default MEDIAVAULT_DB_POOL_MAX_SIZE: PgBouncer then adds its hop, not a smaller pool.
PGBOUNCER_POOL_SIZE = 10
STOP_TIMEOUT_S = 20.0


class Stack(NamedTuple):
    target: str
    jwt_secret: str
    database_url: str
    # The `mediavault serve` process: for benchmarks that read its memory from /proc.
    server_pid: int = 0


def _log(message: str) -> None:
    print(f"[bench stack] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def bench_postgres() -> Iterator[str]:
    """MEDIAVAULT_BENCH_DATABASE_URL, else MEDIAVAULT_TEST_DATABASE_URL, else an embedded server's."""
    configured = os.environ.get("MEDIAVAULT_BENCH_DATABASE_URL") or os.environ.get("MEDIAVAULT_TEST_DATABASE_URL", "")
    with devservers.postgres(configured) as url:
        yield url


@contextlib.contextmanager
def bench_redis() -> Iterator[str]:
    """MEDIAVAULT_BENCH_REDIS_URL, else MEDIAVAULT_TEST_REDIS_URL, else an embedded Valkey's."""
    configured = os.environ.get("MEDIAVAULT_BENCH_REDIS_URL") or os.environ.get("MEDIAVAULT_TEST_REDIS_URL", "")
    with devservers.redis(configured) as url:
        yield url


@contextlib.contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    """A database of the run's own on the admin URL's server, dropped at the end."""
    database_url = asyncio.run(devservers.create_database(admin_url, "mediavault_bench"))
    try:
        yield database_url
    finally:
        try:
            asyncio.run(devservers.drop_database(admin_url, database_url))
        except Exception as exc:  # noqa: BLE001 - report, never mask the benchmark's own outcome
            _log(f"could not drop database {database_url}: {exc!r}")


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
    pooler: str = "none",
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
        admin_url = cleanup.enter_context(bench_postgres())
        database_url = cleanup.enter_context(bench_database(admin_url))
        redis_url = cleanup.enter_context(bench_redis())

        grpc_port, http_port = _free_port(), _free_port()
        target = f"127.0.0.1:{grpc_port}"
        queue_name = f"mediavault-bench:{secrets.token_hex(6)}"
        # Registered before the server starts, so it runs after the server has stopped.
        cleanup.callback(_drop_queue, redis_url, queue_name)
        cleanup.callback(_drop_queue, redis_url, f"{queue_name}:video")
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
        if pooler == "pgbouncer":
            pgbouncer_url = cleanup.enter_context(devservers.pgbouncer(admin_url, pool_size=PGBOUNCER_POOL_SIZE))
            env.update(
                {
                    "MEDIAVAULT_DATABASE_URL": devservers.with_database(pgbouncer_url, urlsplit(database_url).path.lstrip("/")),
                    "MEDIAVAULT_DATABASE_POOLER": "pgbouncer",
                    "MEDIAVAULT_MIGRATE_DATABASE_URL": database_url,
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
        _log(f"server pid {process.pid} SERVING on {target} (log level {log_level}, pooler {pooler})")
        try:
            yield Stack(target, jwt_secret, database_url, process.pid)
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
