"""The upload allow-list and magic-byte sniffing: what the bytes are, never what the filename says."""

from __future__ import annotations

import functools

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/heic", "image/heif", "image/avif"})
VIDEO_TYPES = frozenset({"video/mp4", "video/quicktime", "video/webm"})
ALLOWED_TYPES = IMAGE_TYPES | VIDEO_TYPES
# What the renditions of videos and animations are written as.
MP4 = "video/mp4"

# Declared types that the same container legitimately carries: HEIC is HEIF with
# HEVC, and phones write MP4 and QuickTime files interchangeably.
_FAMILY = {
    "image/heic": "heif",
    "image/heif": "heif",
    "video/mp4": "isobmff-video",
    "video/quicktime": "isobmff-video",
}

SNIFF_BYTES = 1024

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_MP4_BRANDS = {
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"dash",
    b"M4V ", b"M4VH", b"M4VP", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"mmp4", b"MSNV", b"f4v ",
}


def kind_of(content_type: str) -> str:
    return "video" if content_type in VIDEO_TYPES else "image"


def normalize(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def sniff(head: bytes) -> str | None:
    """The MIME type the leading bytes show, or None when they are none of the allowed types."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        # EBML: WebM is a Matroska profile, and many encoders write the generic doctype.
        return "video/webm" if b"webm" in head[:64] or b"matroska" in head[:64] else None
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    return None


def _sniff_ftyp(head: bytes) -> str | None:
    box_size = int.from_bytes(head[:4], "big")
    end = min(max(box_size, 16), len(head))
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    # The major brand decides first; AVIF files list mif1 among their compatible brands.
    for brand in brands:
        if brand in _AVIF_BRANDS:
            return "image/avif"
        if brand in _HEIF_BRANDS:
            return "image/heif"
        if brand == b"qt  ":
            return "video/quicktime"
        if brand in _MP4_BRANDS:
            return "video/mp4"
    return None


def matches(declared: str, sniffed: str | None) -> bool:
    if sniffed is None:
        return False
    return _FAMILY.get(declared, declared) == _FAMILY.get(sniffed, sniffed)


@functools.cache
def declarable_as(sniffed: str | None) -> tuple[str, ...]:
    """Every allowed declared type that bytes sniffed as `sniffed` satisfy (see matches)."""
    return tuple(sorted(t for t in ALLOWED_TYPES if matches(t, sniffed)))
