"""A JPEG's own coefficients as its display variant: no decode, no quantisation, no metadata.

When a JPEG already fits the display's box and byte budget, re-encoding it only loses
quality and, at the display's quality, usually adds bytes. Its display variant is instead
made in the DCT domain: the original's frame, quantisation tables and coefficients, read
and written again by libjpeg's transcoding API (the _jpegtran extension, what `jpegtran
-copy none -optimize` does) with optimised Huffman tables and none of its APPn and COM
segments (EXIF, XMP, ICC, IPTC, maker notes, MPF and the gain map or depth image appended
after the first picture). The tables are optimal for the symbols counted, which for a large
upright picture are its AC symbols in every eighth MCU row only (_jpegtran.c says why and
what it costs); a flipped one is counted whole. The coefficients are the original's, so it decodes to exactly
the original's pixels. It is written sequential when the original is, progressive (libjpeg's
simple progression) when the original is: a sequential original written progressive is
smaller still but several times slower to write, and a progressive original written
sequential grows (bench/README.md, lossless_display). When optimised tables would not make
it smaller (an original already optimised), the display is the original's segments less
the metadata, as they are (`strip`): the display is never larger than the original less
its metadata.

A progressive original whose scans leave a coefficient unfinished is refused: libjpeg
smooths such blocks as it decodes them, and would not smooth the complete re-encode.

The smaller variants need the pixels all the same, at the smallest DCT scale that covers
them. display_and_picture decodes them in the same libjpeg decompression that reads the
coefficients (buffered-image mode: the scans are absorbed once into the coefficient arrays,
the scaled picture is output from them, then jpeg_read_coefficients hands the same arrays
to the re-encode), with the settings and the scale Pillow's draft decode uses, so the
picture is the one decode.decode_with_pillow would give, pixel for pixel (the tests compare
them), and the JPEG is entropy-decoded once instead of twice. At 1/8, libjpeg's sequential
decoder keeps no AC coefficient, so a sequential original scaled that far is decoded twice;
the default variants never scale a display-sized photo below 1/4.

Orientation is applied in the DCT domain only where the decoded pixels come out exactly
the decoded original's, turned as Pillow's ImageOps.exif_transpose turns them. Measured
with jpegtran -perfect on the corpus orientation set and on 150 crops of corpus photos per
sampling (made by cjpeg, qualities 60-100, a third of them progressive), decoded by Pillow
(libjpeg-turbo 2.1, islow IDCT, fancy upsampling):

  4 (upside down, mirrored: a top-to-bottom flip)  exact on all 150 crops of 4:4:4, 4:2:2,
      4:2:0 (and 4:1:1) whenever the height is a whole number of MCU rows (else there is no
      perfect flip); exact on 1 of 150 of 4:4:0, whose vertical chroma upsampling rounds the
      upper and lower rows it makes with different biases (1 and 2), so mirrored rows round
      differently. Landscape_4.jpg of the corpus is flipped here; Portrait_4.jpg (1800 rows,
      not whole 16-row MCUs) is not.
  2, 3 (left-right mirror, half turn)  not a rule: exact on 120 of 150 of the 4:4:4 crops,
      1 and 5 of 150 of the 4:2:0 and 4:2:2 ones. The column pass of the IDCT rounds a
      negated value up where it rounded the value itself down, and the horizontal fancy
      upsampling of 4:2:x rounds its left and right outputs with different biases.
  5-8 (quarter turns and transposes)  never (0 of 965): the IDCT runs its two passes
      in the other order on a transposed block, and they round in between.

So a JPEG with EXIF orientation 4, 4:4:4, 4:2:2 or 4:2:0 and a height a multiple of its MCU
height is flipped here (the coefficients' block rows reversed and their odd vertical
frequencies negated); any other turn goes through the planes instead (strategies.choose).
"""

from __future__ import annotations

import re

from PIL import Image

from mediavault.imaging import _jpegtran, colour, turbojpeg
from mediavault.imaging.spec import fit

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Huffman-coded frames every browser decodes: baseline and progressive. Extended
# sequential (16-bit quantisation tables), arithmetic coding (SOF9-11), lossless and
# hierarchical frames are re-encoded through the planes or Pillow.
_BASELINE, _PROGRESSIVE = 0xC0, 0xC2
_FRAMES = frozenset({_BASELINE, _PROGRESSIVE})
# Segments a decoder needs: quantisation and Huffman tables, restart interval, frame, scans.
_KEPT = frozenset({0xDB, 0xC4, 0xDD, *_FRAMES, _SOS})
# An 0xFF in a scan followed by neither a stuffed 0x00, a restart marker (RST0-7) nor another
# 0xFF (a fill byte before the marker): the first such ends the scan. One regular expression
# search, not a Python loop over every stuffed byte of a megabyte of data.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Every frame marker (SOF0-15 less DHT, JPG and DAC), and the progressive ones among them.
_ALL_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length: SOI, RST0-7, TEM.
_STANDALONE = frozenset({_SOI, *range(0xD0, 0xD8), 0x01})
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
    return _strip(data)[0]


def _strip(data: bytes) -> tuple[bytes, bool]:
    """strip(data), and whether its frame is progressive."""
    if data[:2] != b"\xff\xd8":
        raise NotLossless("no SOI marker")
    kept = [b"\xff\xd8"]
    position = 2
    frame = None
    while True:
        marker, position = _next_marker(data, position)
        if marker == _EOI:
            break
        end = _segment_end(data, marker, position)
        if marker in _FRAMES:
            if frame is not None or data[position + 2] != 8:
                raise NotLossless("not one 8-bit frame")
            frame = marker
        if marker in _KEPT:
            if marker == _SOS:
                if frame is None:
                    raise NotLossless("scan before frame")
                end = _scan_end(data, end)
            kept.append(data[position - 2 : end])
        position = end
    if frame is None:
        raise NotLossless("no frame")
    kept.append(b"\xff\xd9")
    return b"".join(kept), frame == _PROGRESSIVE


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
    end = _MARKER_AFTER_SCAN.search(data, position)
    if end is None:
        raise NotLossless("scan runs past the end")
    return end.start()


def more_scans_than(data: bytes, limit: int) -> bool:
    """Whether the JPEG's first picture is progressive and holds more than limit scans, counted
    up to where its structure ends or breaks (the decoder judges the rest). Each scan of a
    progressive picture is one more pass over all of it; a sequential one has a scan per
    component at most, and libjpeg refuses a scan that repeats one. So a sequential picture,
    what phones write, costs a walk of its header segments and no search of its data."""
    scans, position, progressive = 0, 2, False
    while position + 4 <= len(data) and data[position] == 0xFF:
        while position < len(data) and data[position] == 0xFF:
            position += 1
        if position >= len(data) or data[position] == _EOI:
            break
        marker, position = data[position], position + 1
        if marker in _STANDALONE:
            continue
        position += int.from_bytes(data[position : position + 2], "big")
        if marker == _SOS:
            if scans == 0 and not progressive:
                return False
            scans += 1
            if scans > limit:
                return True
            end = _MARKER_AFTER_SCAN.search(data, position)
            if end is None:
                break
            position = end.start()
        elif marker in _ALL_FRAMES:
            progressive = marker in _PROGRESSIVE_FRAMES
    return False


# EXIF orientations applied here: 4 is the top-to-bottom flip (see the module's docstring).
_FLIP_TOP_BOTTOM = 4
_UPRIGHT = frozenset({0, 1})
_FLIP_EXACT_SUBSAMPLING = {turbojpeg.SAMP_444: 8, turbojpeg.SAMP_422: 8, turbojpeg.SAMP_420: 16}


def orients_exactly(header: turbojpeg.Header, orientation: int) -> bool:
    """Whether the display made here decodes to exactly the upright pixels of a JPEG with this
    header and EXIF orientation: upright already, or flipped top to bottom in a sampling whose
    flip is exact, with a height of whole MCU rows."""
    if orientation in _UPRIGHT:
        return True
    mcu_height = _FLIP_EXACT_SUBSAMPLING.get(header.subsampling)
    return orientation == _FLIP_TOP_BOTTOM and mcu_height is not None and header.height % mcu_height == 0


def display(data: bytes, header: turbojpeg.Header, max_bytes: int, icc: bytes | None = None, orientation: int = 1) -> bytes:
    """The original as its own display, upright, or NotLossless when it cannot be.

    `header` is the original's; the display must read back the same, in YCbCr, and fit in
    max_bytes. `icc`, when given, is embedded as the one profile (colour.DISPLAY_P3 for a
    wide-colour original). `orientation` is the original's EXIF orientation; the display
    carries none, so it is applied here (orients_exactly says when it can be).
    """
    return _display(data, header, max_bytes, icc, orientation, None)


def display_and_picture(
    data: bytes, header: turbojpeg.Header, max_bytes: int, box: int, icc: bytes | None = None, orientation: int = 1
) -> tuple[bytes, Image.Image]:
    """display(), and the upright picture the smaller variants, none larger than `box`, are
    made from: pixel for pixel the one decode.decode_with_pillow gives (Pillow's draft decode
    at the DCT scale that covers `box`, flipped as display() flips), decoded from the
    coefficients the display is made of, so the JPEG is entropy-decoded once for both.
    """
    scale = draft_scale(header.width, header.height, box)
    size = (-(-header.width // scale), -(-header.height // scale))
    # Within the pixels open_image admitted: at most three bytes for each of them.
    pixels = bytearray(size[0] * size[1] * 3)
    shown = _display(data, header, max_bytes, icc, orientation, (scale, pixels))
    picture = Image.frombytes("RGB", size, pixels)
    # As decode_with_pillow's: no metadata to write back out, but the wide-colour profile.
    picture.info = {"icc_profile": icc} if icc is not None else {}
    return shown, picture


def draft_scale(width: int, height: int, box: int) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) Pillow's JpegImageFile.draft picks for a picture
    that must still cover fit(width, height, box): the largest that does."""
    fitted_width, fitted_height = fit(width, height, box)
    ratio = min(width // fitted_width, height // fitted_height)
    return next(scale for scale in (8, 4, 2, 1) if ratio >= scale)


def _display(
    data: bytes,
    header: turbojpeg.Header,
    max_bytes: int,
    icc: bytes | None,
    orientation: int,
    decoded: tuple[int, bytearray] | None,
) -> bytes:
    """display(); when `decoded` (a scale and a buffer) is given, the picture decoded into the buffer too."""
    if not orients_exactly(header, orientation):
        raise NotLossless(f"EXIF orientation {orientation} does not turn exactly in the DCT domain")
    stripped, progressive = _strip(data)
    flip = orientation == _FLIP_TOP_BOTTOM
    # The header the pipeline admitted bounds the pixels: the same picture has no more.
    max_pixels = header.width * header.height
    try:
        if decoded is None:
            optimised = _jpegtran.optimize(stripped, max_pixels, flip, progressive)
        else:
            optimised = _jpegtran.optimize_and_decode(stripped, max_pixels, flip, progressive, *decoded)
    except _jpegtran.JpegError as exc:
        raise NotLossless(f"libjpeg cannot transcode it: {exc}") from None
    if len(optimised) > len(stripped):
        if flip:
            raise NotLossless("flipped, it is larger than the original less its metadata")
        optimised = stripped
    if icc is not None:
        optimised = optimised[:2] + colour.jpeg_icc_segment(icc) + optimised[2:]
    if len(optimised) > max_bytes:
        raise NotLossless("larger than the display's byte budget")
    try:
        again = turbojpeg.read_header(optimised)
    except turbojpeg.TurboJPEGError as exc:
        raise NotLossless(f"libjpeg-turbo cannot read it without its metadata: {exc}") from None
    if again != header or again.colorspace != turbojpeg.COLORSPACE_YCBCR:
        raise NotLossless("it reads differently without its metadata")
    return optimised
