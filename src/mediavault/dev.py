"""`mediavault dev`: API server and worker in one process, on embedded PostgreSQL and Valkey
unless MEDIAVAULT_DATABASE_URL / MEDIAVAULT_REDIS_URL point elsewhere. Data stays under ./.mediavault/."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from mediavault import devservers
from mediavault.auth import Authenticator
from mediavault.config import Settings

log = logging.getLogger(__name__)

DEV_DIR = Path(".mediavault")


def jwt_secret(settings: Settings, data_dir: Path = DEV_DIR, *, create: bool = True) -> str:
    """MEDIAVAULT_JWT_SECRET, else the secret of the dev stack of data_dir, made on first use
    when create; FileNotFoundError when there is none."""
    configured = settings.jwt_secret.get_secret_value()
    if configured:
        return configured
    path = data_dir / "dev-jwt-secret"
    if create and not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


async def run_dev(data_dir: str | Path = DEV_DIR) -> None:
    from mediavault.db import migrate
    from mediavault.server import Server
    from workers.worker import queue_workers

    data_dir = Path(data_dir).resolve()
    env = Settings()
    overrides: dict[str, Any] = {"jwt_secret": jwt_secret(env, data_dir)}
    with contextlib.ExitStack() as cleanup:
        overrides["database_url"] = cleanup.enter_context(devservers.postgres(env.database_url, data_dir / "pg"))
        overrides["redis_url"] = cleanup.enter_context(devservers.redis(env.redis_url, data_dir / "redis"))
        if "MEDIAVAULT_BLOB_DIR" not in os.environ:
            overrides["blob_dir"] = data_dir / "blobs"
        settings = Settings(**overrides)

        await migrate(settings.database_url)
        server = Server(settings)
        # The server's endpoint on METRICS_ADDR exports this process's registry, which holds the
        # workers' metrics too; a second endpoint would find the address taken and stop the photo
        # worker's start.
        workers = queue_workers(settings.model_copy(update={"metrics_addr": ""}))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP: the terminal closed. Left to its default, dev would end at once and leave
        # PostgreSQL and Valkey running.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await server.startup()
        worker_tasks = [asyncio.create_task(worker.async_run()) for worker in workers]
        _print_welcome(settings, server, data_dir)
        try:
            await stop.wait()
        finally:
            await server.shutdown(settings.shutdown_grace_seconds)
            # Every worker closes (its on_shutdown too) whatever another's close meets.
            closed = await asyncio.gather(*(worker.close() for worker in workers), return_exceptions=True)
            for task in worker_tasks:
                task.cancel()
            ended = await asyncio.gather(*worker_tasks, return_exceptions=True)
            for worker, close, run in zip(workers, closed, ended, strict=True):
                for result in (close, run):
                    if isinstance(result, Exception):
                        log.error("worker stopped with an error", exc_info=result, extra={"queue": worker.queue_name})


def _print_welcome(settings: Settings, server, data_dir: Path) -> None:
    authenticator = Authenticator(settings.jwt_secret.get_secret_value())
    token = authenticator.issue("dev-user", ["user"], ttl_seconds=24 * 3600)
    admin = authenticator.issue("dev-admin", ["admin", "billing"], ttl_seconds=24 * 3600)
    addr = f"127.0.0.1:{server.grpc_port}"
    print(
        f"""
mediavault dev stack is up
  gRPC      {addr}  (health + reflection)
  blobs     {settings.public_url if settings.blob_backend == 's3' else f'http://127.0.0.1:{server.http_port}'}
  database  {settings.database_url}
  redis     {settings.redis_url}

  export TOKEN={token}
  export ADMIN={admin}

  grpcurl -plaintext {addr} list
  grpcurl -plaintext {addr} grpc.health.v1.Health/Check
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" {addr} mediavault.storage.v1.StorageService/GetStorageSummary
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"filename":"a.jpg","content_type":"image/jpeg","size_bytes":1024}}' \\
      {addr} mediavault.storage.v1.StorageService/BeginUpload
  grpcurl -plaintext -H "authorization: Bearer $ADMIN" -d '{{"user_id":"dev-user","provider":"PAYMENT_PROVIDER_MANUAL","payment_reference":"gift-1","credit_bytes":1073741824,"currency":"USD"}}' \\
      {addr} mediavault.storage.v1.StorageService/AddStorageCredits

Ctrl-C stops everything; data stays in {data_dir}/.
""",
        flush=True,
    )
