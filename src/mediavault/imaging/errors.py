"""Errors of the imaging pipeline. Messages are short and safe to show to the uploader."""

from __future__ import annotations


class ImagingError(Exception):
    """Processing failed for a reason that may not recur (a worker crashed, the pool was shut down)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermanentImagingError(ImagingError):
    """The input itself is at fault: retrying the same bytes gives the same answer."""


CORRUPT_IMAGE = "corrupt image"
CORRUPT_VIDEO = "corrupt video"
IMAGE_TOO_LARGE = "image too large"
VIDEO_TOO_LARGE = "video too large"
UNSUPPORTED_FORMAT = "unsupported format"
TIMED_OUT = "processing timed out"
