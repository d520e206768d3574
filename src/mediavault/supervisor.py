"""`mediavault serve --processes N`: N server processes sharing the gRPC and HTTP ports, kept running.

The parent binds nothing that serves. It reserves the ports (SO_REUSEPORT, never listening), so a
port 0 becomes one real port every child binds and no other program takes it while a child
restarts; starts each child as `mediavault serve --supervisor-pid PID --slot I` (I: its slot, 0 to
N-1, which labels its own pool's metrics and which its replacement takes over), which listens on
the same ports with SO_REUSEPORT (the kernel spreads new connections over the listeners); restarts
a child that exits, after a delay that doubles while children keep failing; and on SIGTERM or
SIGINT passes SIGTERM to every child, each of which drains as a lone server does, then exits.

Metrics: prometheus-client's multiprocess mode. Each child writes its samples into files in a
directory the parent makes for this run (the children's PROMETHEUS_MULTIPROC_DIR; removed at
exit, or when the parent is killed outright by the next supervisor to start: scratch.OwnedFolder),
and the parent alone serves METRICS_ADDR with the sum over every child, past ones included,
so counters never go back when a child restarts.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from mediavault import scratch
from mediavault.config import ListenAddress, Settings, listen_address
from mediavault.metrics import MetricsEndpoint

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
# A child that served this long before it exited failed on its own, not at start-up: its
# replacement starts after the shortest delay again.
STABLE_SECONDS = 60.0
# After the children's own pre-stop and grace periods, how long a child may take to close its
# pools and exit before it is killed.
STOP_MARGIN_SECONDS = 10.0
_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


def process_count(requested: int, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """--processes: 0 is one per core this process may run on, within its cgroup's CPU quota."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cpu_quota(cgroup_root: Path) -> float | None:
    """The CPUs' worth of time this process's cgroup may use (a container's CPU limit), None when
    unlimited: the cores the scheduler offers take no account of it, and a process per core would
    overrun the limit and be throttled. cgroup v2's cpu.max, else v1's cfs quota and period."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup_root / quota_file).read_text().split()
            if period_file is not None:
                fields += (cgroup_root / period_file).read_text().split()
        except OSError:
            continue
        if len(fields) != 2 or fields[0] in ("max", "-1"):
            return None
        return int(fields[0]) / int(fields[1])
    return None


def reserve_port(addr: str) -> tuple[str, socket.socket]:
    """Binds addr with SO_REUSEPORT without listening; returns addr with the bound port, and the socket.

    OSError (EADDRINUSE) when anything holds the port already: SO_REUSEPORT alone would share it
    with another supervisor's processes (a second deployment started by mistake), and the kernel
    would split the connections between the two. A first bind without it tells.
    """
    host = addr.rpartition(":")[0]
    address = listen_address(addr)
    with _bound(address, reuse_port=False) as probe:
        port = probe.getsockname()[1]
    sock = _bound(listen_address(f"{host}:{port}"), reuse_port=True)
    return f"{host}:{port}", sock


def _bound(address: ListenAddress, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            # Connections of an earlier run in TIME_WAIT hold the port for no one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.dual_stack:
            # grpc's [::] listener takes IPv4 too; so must the socket that holds its port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address.sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def follow_parent(supervisor_pid: int) -> None:
    """In a supervised child: SIGTERM (a drain) when the supervisor dies, even by SIGKILL."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor_pid:  # the supervisor died before the request above
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Slot:
    """One of the N places a child runs in, with its restart schedule."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        self._stopping = False
        self._reserved: list[socket.socket] = []
        self._env: dict[str, str] = {}
        self._metrics: MetricsEndpoint | None = None
        self._metrics_folder: scratch.OwnedFolder | None = None

    def run(self) -> int:
        """Runs the children until SIGTERM/SIGINT; 0 when every child drained and exited cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        try:
            self._prepare()
            slots = [_Slot(index) for index in range(self.processes)]
            pids = [self._start(slot).pid for slot in slots]
            log.info("server processes started", extra={"processes": self.processes, "pids": pids})
            while not self._stopping:
                for slot in slots:
                    self._watch(slot)
                time.sleep(_POLL_SECONDS)
            return self._stop_all(slots)
        finally:
            self._release()

    def _request_stop(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _prepare(self) -> None:
        settings = self.settings
        # Every backend serves HTTP: the tus endpoints, and on fs the signed blob URLs too.
        overrides = {
            "MEDIAVAULT_GRPC_ADDR": self._reserve(settings.grpc_addr),
            "MEDIAVAULT_HTTP_ADDR": self._reserve(settings.http_addr),
            "MEDIAVAULT_METRICS_ADDR": "",
        }
        if settings.metrics_addr:
            overrides[MULTIPROC_DIR_VARIABLE] = str(self._open_metrics())
        self._env = {**os.environ, **overrides}

    def _reserve(self, addr: str) -> str:
        try:
            reserved, sock = reserve_port(addr)
        except OSError as error:
            raise SystemExit(f"cannot take {addr}: {error.strerror}") from None
        self._reserved.append(sock)
        return reserved

    def _open_metrics(self) -> Path:
        self._metrics_folder = scratch.OwnedFolder(Path(tempfile.gettempdir()), "mediavault-metrics-")
        directory = self._metrics_folder.path
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))
        self._metrics = MetricsEndpoint(self.settings.metrics_addr, registry)
        return directory

    def _start(self, slot: _Slot) -> subprocess.Popen[bytes]:
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "mediavault.cli", "serve", "--supervisor-pid", str(os.getpid()), "--slot", str(slot.index)],
            env=self._env,
            stdin=subprocess.DEVNULL,
        )
        slot.started_at = time.monotonic()
        return slot.process

    def _watch(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.process is None:
            if now >= slot.restart_at:
                process = self._start(slot)
                log.info("server process restarted", extra={"slot": slot.index, "pid": process.pid})
            return
        code = slot.process.poll()
        if code is None:
            return
        self._forget(slot)
        if now - slot.started_at >= STABLE_SECONDS:
            slot.failures = 0
        slot.failures += 1
        delay = min(RESTART_DELAY_SECONDS * 2 ** (slot.failures - 1), RESTART_DELAY_MAX_SECONDS)
        slot.restart_at = now + delay
        log.warning("server process exited; restarting it", extra={"slot": slot.index, "exit_code": code, "restart_in_seconds": delay})

    def _forget(self, slot: _Slot) -> None:
        assert slot.process is not None
        if self._metrics_folder is not None:
            mark_process_dead(slot.process.pid, str(self._metrics_folder.path))
        slot.process = None

    def _stop_all(self, slots: list[_Slot]) -> int:
        running = [slot for slot in slots if slot.process is not None and slot.process.poll() is None]
        log.info("stopping server processes", extra={"pids": [slot.process.pid for slot in running if slot.process]})
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_prestop_seconds + self.settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        clean = True
        for slot in running:
            assert slot.process is not None
            try:
                code = slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("server process did not stop in time; killing it", extra={"pid": slot.process.pid})
                slot.process.kill()
                code = slot.process.wait()
            # A child still importing when the stop came dies of the signal: its handler, installed
            # before it binds, was not there yet, so it had served nothing.
            clean = clean and code in (0, -signal.SIGTERM)
            self._forget(slot)
        log.info("server processes stopped", extra={"clean": clean})
        return 0 if clean else 1

    def _release(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        for sock in self._reserved:
            sock.close()
        if self._metrics_folder is not None:
            self._metrics_folder.release()
