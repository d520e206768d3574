"""A process's own temp folder, which outlives it only until the next process like it starts.

A process killed outright (SIGKILL, the OOM killer) removes none of its temporary files, and a
video worker's are a downloaded original of up to MAX_VIDEO_BYTES and its partial renditions: over
restarts they fill the disk. Each process works in a folder it holds an flock on for its lifetime.
The kernel releases the lock when the process dies, however it dies, so a folder whose lock can be
taken is an orphan, whichever process, container or host sharing the parent made it and whatever
its pid has become since (the pid in the name only tells an operator whose it was).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder parent/<prefix><pid>-<random>, locked as long as the block runs and removed
    at its end; the orphans of dead processes under parent/<prefix>* are removed first."""
    _sweep_orphans(parent, prefix)
    # Made under a name no sweep matches, and given its real one once locked: a sweep between the
    # mkdir and the flock would take it for an orphan.
    claiming = Path(tempfile.mkdtemp(prefix=f".{prefix}", dir=parent))
    fd = os.open(claiming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = parent / f"{prefix}{os.getpid()}-{claiming.name.removeprefix(f'.{prefix}')}"
        os.rename(claiming, folder)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def _sweep_orphans(parent: Path, prefix: str) -> None:
    """Removes every parent/<prefix>* folder whose owner has died."""
    for folder in parent.glob(f"{prefix}*"):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            # Removed by another process's sweep meanwhile, or not a folder of ours.
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            # Held until removed: another sweep meanwhile skips it.
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the temp folder of a dead process", extra={"folder": str(folder)})
        finally:
            os.close(fd)


@contextlib.contextmanager
def process_temp_dir(prefix: str) -> Iterator[Path]:
    """An owned_folder under the temp dir (TMPDIR, else /tmp) made the temp dir of this process and
    of every process it starts meanwhile (TMPDIR): their temporary files go where it is swept."""
    parent = tempfile.gettempdir()
    with owned_folder(Path(parent), prefix) as folder:
        environ = os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
        try:
            yield folder
        finally:
            tempfile.tempdir = parent
            if environ is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = environ
