"""A process's own temp folder, which outlives it only until the next process like it starts.

A process killed outright (SIGKILL, the OOM killer) removes none of its temporary files, and a
video worker's are a downloaded original of up to MAX_VIDEO_BYTES and its partial renditions: over
restarts they fill the disk. Each process works in a folder it holds an flock on for its lifetime.
The kernel releases the lock when the process dies, however it dies, so a folder whose lock can be
taken is an orphan, whichever process, container or host sharing the parent made it and whatever
its pid has become since (the pid in the name only tells an operator whose it was).

The lock is on a file beside the folder (its name and ".lock"), open for writing, rather than on
the folder: an NFS client passes an flock on a file opened so to the server (as a lock on the whole
file), where every host sees it, but keeps one on a directory to itself, where another host would
take a live folder for an orphan. A folder without its lock file is no folder of ours, and is left
alone.
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

_LOCK_SUFFIX = ".lock"


class OwnedFolder:
    """A new folder parent/<prefix><pid>-<random>, locked until release() removes it; the orphans
    of dead processes under parent/<prefix>* are removed first."""

    def __init__(self, parent: Path, prefix: str) -> None:
        _sweep_orphans(parent, prefix)
        # The lock file is made under a name no sweep matches and given its real one once locked,
        # and the folder made after: a sweep between the file's creation and the flock would take
        # it for an orphan's.
        self._fd, claiming = tempfile.mkstemp(prefix=f".{prefix}{os.getpid()}-", suffix=_LOCK_SUFFIX, dir=parent)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock = parent / os.path.basename(claiming).removeprefix(".")
            os.rename(claiming, lock)
            self.path = lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX))
            os.mkdir(self.path)
        except BaseException:
            os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(claiming)
            raise

    def release(self) -> None:
        """Removes the folder and what is in it; again, does nothing."""
        if self._fd >= 0:
            _remove(self.path, self._fd)
            self._fd = -1


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """An OwnedFolder, for as long as the block runs."""
    folder = OwnedFolder(parent, prefix)
    try:
        yield folder.path
    finally:
        folder.release()


def _sweep_orphans(parent: Path, prefix: str) -> None:
    """Removes every parent/<prefix>* folder whose owner has died."""
    for lock in parent.glob(f"{prefix}*{_LOCK_SUFFIX}"):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            # Removed by another process's sweep meanwhile, or not a lock of ours.
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        folder = lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX))
        _remove(folder, fd)
        log.info("removed the temp folder of a dead process", extra={"folder": str(folder)})


def _remove(folder: Path, lock_fd: int) -> None:
    """Removes a folder whose lock lock_fd holds, then its lock file, and closes lock_fd.

    The folder goes while the lock is held, so that another sweep meanwhile skips it; the lock
    file once closed, as NFS keeps a file removed while open under a hidden name. A sweep that
    takes the lock between the close and the unlink finds no folder and removes the file too."""
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock_fd)
    with contextlib.suppress(OSError):
        os.unlink(f"{folder}{_LOCK_SUFFIX}")


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
