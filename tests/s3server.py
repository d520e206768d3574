"""A real moto S3 server on loopback, run as a subprocess so tests talk HTTP to it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

_START_TIMEOUT = 30.0

# moto accepts any credentials but botocore refuses to sign without some.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


class MotoServer:
    """One moto server pinned to a port, so it can be stopped and restarted at the same endpoint.

    moto keeps everything in memory: a restarted server has no buckets or objects.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("moto server already running")
        # A file, not a pipe: moto logs every request and a full pipe would stall it.
        with tempfile.TemporaryFile() as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                await self._wait_until_listening(log)
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _wait_until_listening(self, log: IO[bytes]) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited on start:\n{log.read().decode(errors='replace')}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not listening on port {self.port}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


@asynccontextmanager
async def moto_server() -> AsyncIterator[MotoServer]:
    """A started server; use .endpoint_url, and .stop()/.start()/.restart() to simulate an outage."""
    server = MotoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
