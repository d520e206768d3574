"""`mediavault dev` as a developer runs it: a real process in a terminal's process group, on
embedded PostgreSQL and Valkey under a data dir of the test's own."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from mediavault import devservers
from tests.faults import free_port
from workers.worker import health_check_key


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "data"
    yield data_dir
    # What a failed test left running.
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if str(data_dir) in " ".join(process.info["cmdline"] or ()) or str(data_dir) in (process.info["cwd"] or ""):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def start_dev(data_dir: Path, log_dir: Path, **extra_env: str) -> subprocess.Popen[bytes]:
    """dev in a session of its own, as a shell starts it: its process group is the terminal's
    foreground group, which a Ctrl-C signals whole."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(MEDIAVAULT_GRPC_ADDR="127.0.0.1:0", MEDIAVAULT_HTTP_ADDR="127.0.0.1:0", MEDIAVAULT_TRANSCODE_WORKERS="1", **extra_env)
    with (log_dir / "dev.out").open("wb") as out, (log_dir / "dev.err").open("wb") as err:
        dev = subprocess.Popen(
            [sys.executable, "-m", "mediavault.cli", "dev", "--data-dir", str(data_dir)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
        )
    deadline = time.monotonic() + 120

    def waiting(what: str) -> None:
        if dev.poll() is not None or time.monotonic() > deadline:
            dev.kill()
            raise AssertionError(f"dev did not {what}:\n{(log_dir / 'dev.err').read_text(errors='replace')}")
        time.sleep(0.1)

    while not (welcome := re.search(r"^  redis +(\S+)$", (log_dir / "dev.out").read_text(), re.MULTILINE)):
        waiting("start")
    # Its three workers (photo, video, cron) have started, their transcoding processes with them,
    # once each has recorded its health.
    with Redis.from_url(welcome[1]) as redis:
        while len(redis.keys(health_check_key("*", dev.pid))) < 3:
            waiting("start its workers")
    return dev


def processes_of(dev: subprocess.Popen[bytes], data_dir: Path) -> list[psutil.Process]:
    """dev's session and the servers it started for data_dir, wherever they run."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            mine = os.getsid(process.pid) == dev.pid
        except ProcessLookupError:
            continue
        if mine or str(data_dir) in " ".join(process.info["cmdline"] or ()) or str(data_dir) in (process.info["cwd"] or ""):
            found.append(process)
    return found


def stop_dev(dev: subprocess.Popen[bytes], log_dir: Path, signum: int = signal.SIGINT) -> str:
    """Signals dev's process group, as a Ctrl-C (SIGINT) or a closed terminal (SIGHUP) does,
    expects exit 0 and answers dev's stderr."""
    try:
        os.killpg(dev.pid, signum)
        code = dev.wait(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
    stderr = (log_dir / "dev.err").read_text(errors="replace")
    assert code == 0, stderr
    return stderr


def assert_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, [process.cmdline() for process in alive]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
def test_a_signal_to_its_terminal_stops_dev_and_every_server_it_started(data_dir, tmp_path, signum):
    dev = start_dev(data_dir, tmp_path)
    started = processes_of(dev, data_dir)
    names = {process.name() for process in started}
    assert {"postgres", "valkey-server"} <= names, names
    stderr = stop_dev(dev, tmp_path, signum)
    if signum == signal.SIGINT:
        # A SIGHUP also ends multiprocessing's resource tracker, which ignores only SIGINT and
        # SIGTERM: its successor's complaints go to the closed terminal.
        assert "Traceback" not in stderr, stderr
    assert_gone(started)


def test_a_dev_run_after_one_that_was_killed_stops_the_servers_it_left(data_dir, tmp_path):
    killed = start_dev(data_dir, tmp_path)
    left = processes_of(killed, data_dir)
    killed.kill()
    killed.wait()

    dev = start_dev(data_dir, tmp_path)
    started = processes_of(dev, data_dir)
    stop_dev(dev, tmp_path)
    assert_gone(left + started)


def test_dev_exports_the_metrics_of_its_server_and_its_workers_on_metrics_addr(data_dir, tmp_path):
    metrics_addr = f"127.0.0.1:{free_port()}"
    dev = start_dev(data_dir, tmp_path, MEDIAVAULT_METRICS_ADDR=metrics_addr)
    try:
        with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as response:
            exported = {
                sample.name: sample.value
                for family in text_string_to_metric_families(response.read().decode())
                for sample in family.samples
            }
    finally:
        stop_dev(dev, tmp_path)
    assert exported["mediavault_database_up"] == 1, "the server's"
    assert exported["mediavault_worker_redis_up"] == 1, "the workers'"


def test_one_data_dir_has_one_embedded_valkey_at_a_time(tmp_path):
    refused = pytest.raises(RuntimeError, match="another process runs the embedded Valkey")
    with devservers.redis("", tmp_path), refused, devservers.redis("", tmp_path):
        pass


def test_the_embedded_valkey_keeps_its_data_in_its_data_dir(tmp_path):
    with devservers.redis("", tmp_path) as url, Redis.from_url(url) as redis:
        redis.zadd("arq:queue", {"a-job": 1})
    with devservers.redis("", tmp_path) as url, Redis.from_url(url) as redis:
        assert redis.zrange("arq:queue", 0, -1) == [b"a-job"]
