"""The few facts of a photo's EXIF kept as data: when it was taken and with which camera.

Everything else in EXIF, XMP and the maker notes is dropped with the pixels' metadata;
GPS is never even read. Values are untrusted text: dates must parse exactly, camera
names are printable and bounded, read as UTF-8 when they are (else as Latin-1).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import datetime

from PIL import Image

from mediavault.imaging.decode import exif

_MAKE, _MODEL, _EXIF_IFD = 0x010F, 0x0110, 0x8769
_DATE_TIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x9003, 0x9011
_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")
# UTC-12:00 to UTC+14:00 are the offsets in use.
_MAX_OFFSET_MINUTES = 14 * 60
MAX_CAMERA_CHARS = 100


@dataclass(frozen=True)
class PhotoFacts:
    """taken_at is the camera's wall clock (EXIF DateTimeOriginal); utc_offset_minutes the
    offset it recorded beside it (OffsetTimeOriginal), None when it recorded none. camera
    is "Make Model", empty when unknown."""

    taken_at: datetime | None = None
    utc_offset_minutes: int | None = None
    camera: str = ""


def photo_facts(image: Image.Image) -> PhotoFacts:
    """The facts of an opened image: a JPEG, or any image once loaded (see decode.exif_orientation)."""
    try:
        tags = exif(image)
        details = tags.get_ifd(_EXIF_IFD)
    except Exception:
        # Unreadable EXIF is metadata we drop anyway.
        return PhotoFacts()
    taken_at = _datetime(details.get(_DATE_TIME_ORIGINAL))
    offset = _offset_minutes(details.get(_OFFSET_TIME_ORIGINAL)) if taken_at else None
    return PhotoFacts(taken_at, offset, _camera(tags.get(_MAKE), tags.get(_MODEL)))


def _text(value: object) -> str:
    if isinstance(value, str):
        with contextlib.suppress(UnicodeEncodeError):
            # Pillow reads ASCII values as Latin-1: this gives back the bytes the camera wrote.
            value = value.encode("latin-1")
    if isinstance(value, bytes):
        value = _decoded(value.split(b"\x00", 1)[0])
    if not isinstance(value, str):
        return ""
    words = value.split("\x00", 1)[0].split()
    return " ".join(filter(None, ("".join(c for c in word if c.isprintable()) for word in words)))


def _decoded(raw: bytes) -> str:
    # EXIF text is ASCII by the standard, but phones write UTF-8 ("小米"); what is not valid
    # UTF-8 is taken as Latin-1, as Pillow reads it.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _datetime(value: object) -> datetime | None:
    try:
        return datetime.strptime(_text(value), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        # Missing, blank ("    :  :     :  :  ") or zero ("0000:00:00 00:00:00") dates.
        return None


def _offset_minutes(value: object) -> int | None:
    match = _OFFSET.fullmatch(_text(value))
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or total > _MAX_OFFSET_MINUTES:
        return None
    return -total if sign == "-" else total


def _camera(make: object, model: object) -> str:
    make_text, model_text = _text(make), _text(model)
    # Many cameras repeat the make in the model ("Canon" / "Canon EOS 40D").
    if make_text and model_text.lower().startswith(make_text.lower()):
        make_text = ""
    return " ".join(part for part in (make_text, model_text) if part)[:MAX_CAMERA_CHARS].rstrip()
