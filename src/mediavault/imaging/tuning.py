"""Process-wide settings that make a transcoding process faster; each process applies them once.

They trade idle memory for fewer page faults and copies, which pays in a process that
does nothing but transcode: runner.Transcoder's pool processes apply them when they
start (bench/transcode.py does the same). Importing the pipeline changes nothing, so a
server or a test that imports it keeps Pillow's and glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from PIL import Image, ImageFile

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_worker_process() -> None:
    # Pillow returns each freed 16 MB image block to the OS and page-faults it back in on
    # the next job; keeping up to eight (a 12 MP photo and its rotated copy use six) spares
    # those faults, at the price of that much resident memory while idle.
    Image.core.set_blocks_max(8)
    # tobytes() and the encoders hand out their output in chunks of MAXBLOCK bytes, and
    # Pillow's raw encoder slows down with many small chunks: an 8 MP luma plane is 128
    # of them at the default 64 KiB, two at 4 MiB.
    ImageFile.MAXBLOCK = 4 * 1024 * 1024
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    # The same for glibc's malloc, which holds the planes, encoded bytes and libjpeg's
    # buffers: by default it maps each large buffer afresh and unmaps it on free, so the
    # next job page-faults it all in again. Serving buffers up to 32 MB from the heap and
    # keeping 64 MB of freed heap removes three quarters of those faults. (Not glibc:
    # nothing to tune.)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
