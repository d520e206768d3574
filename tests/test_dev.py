"""`mediavault dev` as a developer runs it: a real process in a terminal's process group, on
embedded PostgreSQL and Valkey under a data dir of the test's own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from redis import Redis

from workers.worker import health_check_key


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def start_dev(data_dir: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    """dev in a session of its own, as a shell starts it: its process group is the terminal's
    foreground group, which a Ctrl-C signals whole."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(MEDIAVAULT_GRPC_ADDR="127.0.0.1:0", MEDIAVAULT_HTTP_ADDR="127.0.0.1:0", MEDIAVAULT_TRANSCODE_WORKERS="1")
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


def test_ctrl_c_stops_dev_and_every_server_it_started(data_dir, tmp_path):
    dev = start_dev(data_dir, tmp_path)
    started = processes_of(dev, data_dir)
    try:
        names = {process.name() for process in started}
        assert {"postgres", "valkey-server"} <= names, names
        os.killpg(dev.pid, signal.SIGINT)
        code = dev.wait(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
    stderr = (tmp_path / "dev.err").read_text(errors="replace")
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [process.cmdline() for process in alive]
