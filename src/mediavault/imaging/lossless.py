"""A JPEG's own entropy-coded data as its display variant: no decode, no re-encode, no metadata.

When a JPEG already fits the display's box and byte budget, re-encoding it only loses
quality and, at the display's quality, usually adds bytes. Its display variant is instead
the original's tables, frame and scans with every APPn and COM segment (EXIF, XMP, ICC,
IPTC, maker notes, MPF and the gain map or depth image appended after the first picture)
left out: the coefficients are the original's, so it decodes to exactly the original's
pixels, and it is the original less its metadata.

Turns are not made here. libjpeg-turbo turns the coefficients losslessly (tjTransform),
but its integer IDCT rounds a turned block differently from the block it came from: on
the corpus photos a turned display decodes up to one level away from the turned original
in the planes, three to four in RGB. A JPEG whose EXIF orientation asks for a turn goes
through the planes instead (strategies.choose). Huffman tables are the original's: the
TurboJPEG API of libjpeg-turbo 2.1 optimises them only as a progressive re-encode, which
costs several times the whole pipeline (bench/README.md, transcode).
"""

from __future__ import annotations

from mediavault.imaging import colour, turbojpeg

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Huffman-coded frames every browser decodes: baseline and progressive. Extended
# sequential (16-bit quantisation tables), arithmetic coding (SOF9-11), lossless and
# hierarchical frames are re-encoded through the planes or Pillow.
_FRAMES = frozenset({0xC0, 0xC2})
# Segments a decoder needs: quantisation and Huffman tables, restart interval, frame, scans.
_KEPT = frozenset({0xDB, 0xC4, 0xDD, *_FRAMES, _SOS})
_RESTARTS = frozenset(range(0xD0, 0xD8))
_APP_ADOBE = 0xEE
_APPS = frozenset(range(0xE0, 0xF0))
_COMMENT = 0xFE


class NotLossless(Exception):
    """The JPEG cannot be its own display; the message says why."""


def strip(data: bytes) -> bytes:
    """The JPEG's first picture with only the segments a decoder needs, ending at its EOI.

    Raises NotLossless for anything but a well-formed 8-bit Huffman-coded JPEG without
    an Adobe colour-transform segment (whose absence would change how its colours decode).
    """
    if data[:2] != b"\xff\xd8":
        raise NotLossless("no SOI marker")
    kept = [b"\xff\xd8"]
    position = 2
    frame_seen = False
    while True:
        marker, position = _next_marker(data, position)
        if marker == _EOI:
            break
        end = _segment_end(data, marker, position)
        if marker in _FRAMES:
            if frame_seen or data[position + 2] != 8:
                raise NotLossless("not one 8-bit frame")
            frame_seen = True
        if marker in _KEPT:
            if marker == _SOS:
                if not frame_seen:
                    raise NotLossless("scan before frame")
                end = _scan_end(data, end)
            kept.append(data[position - 2 : end])
        position = end
    if not frame_seen:
        raise NotLossless("no frame")
    kept.append(b"\xff\xd9")
    return b"".join(kept)


def _segment_end(data: bytes, marker: int, position: int) -> int:
    """Where the segment whose length starts at `position` ends; NotLossless for a segment
    a Huffman-coded 8-bit JPEG in YCbCr does not have."""
    if marker == _APP_ADOBE:
        raise NotLossless("an Adobe segment sets its colour transform")
    if marker not in _KEPT and marker not in _APPS and marker != _COMMENT:
        raise NotLossless(f"segment 0x{marker:02X} is not a Huffman-coded 8-bit JPEG's")
    length = int.from_bytes(data[position : position + 2], "big")
    if length < 3 or position + length > len(data):
        raise NotLossless("segment runs past the end")
    return position + length


def _next_marker(data: bytes, position: int) -> tuple[int, int]:
    """The marker at `position` (fill bytes allowed) and where its segment's length starts."""
    if position >= len(data) or data[position] != 0xFF:
        raise NotLossless("expected a marker")
    while position < len(data) and data[position] == 0xFF:
        position += 1
    if position >= len(data):
        raise NotLossless("truncated marker")
    return data[position], position + 1


def _scan_end(data: bytes, position: int) -> int:
    """Where the entropy-coded data that starts at `position` ends: at the next marker
    that is neither a stuffed 0xFF (FF 00) nor a restart marker."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            raise NotLossless("scan runs past the end")
        following = data[position + 1]
        if following == 0 or following in _RESTARTS or following == 0xFF:
            position += 1 if following == 0xFF else 2
            continue
        return position


def display(data: bytes, header: turbojpeg.Header, max_bytes: int, icc: bytes | None = None) -> bytes:
    """The original as its own display, or NotLossless when it cannot be.

    `header` is the original's; the stripped file must read back the same, in YCbCr, and fit
    in max_bytes. `icc`, when given, is embedded as the one profile (colour.DISPLAY_P3 for a
    wide-colour original).
    """
    stripped = strip(data)
    if icc is not None:
        stripped = stripped[:2] + colour.jpeg_icc_segment(icc) + stripped[2:]
    if len(stripped) > max_bytes:
        raise NotLossless("larger than the display's byte budget")
    try:
        again = turbojpeg.read_header(stripped)
    except turbojpeg.TurboJPEGError as exc:
        raise NotLossless(f"libjpeg-turbo cannot read it without its metadata: {exc}") from None
    if again != header or again.colorspace != turbojpeg.COLORSPACE_YCBCR:
        raise NotLossless("it reads differently without its metadata")
    return stripped
