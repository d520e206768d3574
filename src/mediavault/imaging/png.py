"""What a PNG's chunks say that Pillow's PNG reader gets wrong or leaves out, read from the bytes as browsers read them.

A 16-bit RGB PNG may name one colour transparent (tRNS). Pillow reads its samples to their top
bytes and compares those with the colour's low bytes, so the colour's own pixels stayed opaque
and others went transparent; browsers compare all 16 bits of each sample.
`Chunks.transparent_colour` is that colour, for decode to match against both bytes of every
sample. A grey PNG of 1, 2 or 4 bits may name one level transparent: Pillow scales the pixels'
levels to 8 bits but not that one, so no pixel matched it unless it was 0;
`Chunks.transparent_grey` is the level scaled as the pixels' are.

A PNG's cICP chunk names its colours by H.273 codes, before all else (PNG's 3rd edition), as
Chrome, Safari and Firefox read it: `Chunks.coded_colours`, read as a HEIF's or AVIF's nclx box is
(colour.coded_colours). Browsers ignore one whose matrix is not 0 (RGB as it is) or whose range is
not full, as Chrome's does, and so is one of codes colour does not read: the PNG goes by its other
chunks then.

A PNG with no sRGB, iCCP or cICP chunk may describe its colours with gAMA (the exponent of a
plain power-law tone curve, as 100000 / exponent) and cHRM (its primaries and white). Pillow
reports them and applies nothing; browsers build a profile of them (Chrome's and Firefox's
PNG decoders, by the PNG spec's precedence: cICP, then iCCP, then sRGB, then gAMA/cHRM), and
`Chunks.colours` reads them as the browsers do:
- An iCCP counts only where libpng keeps it: one it cannot inflate or read, or of other colours
  than the pixels' (a grey profile in an RGB PNG), it drops, and browsers go by the gAMA and cHRM.
  Pillow inflates the iCCP and decode judges it, so `colours` leaves it out: decode asks for
  them only where it finds no profile it can use.
- cHRM without gAMA says nothing: without a tone curve the primaries cannot be applied.
- A gAMA outside libpng's bounds (16 to 625,000,000: exponents from 6250 down to 1/6250) is
  ignored, as libpng ignores it; 0, which some writers put there, among them (Chrome ignores
  only 0, and shows the rest black or white).
- A gAMA within 5% of 1/2.2 with no cHRM is sRGB as it is, as Chrome and libpng take it
  (kPngGammaThreshold, PNG_GAMMA_THRESHOLD_FIXED): writers put 45455 there meaning sRGB.
- A cHRM that describes no colour space (a coordinate off the chromaticity diagram, or a white
  outside its primaries' triangle) is ignored, as libpng ignores it; the gAMA still counts
  (Chrome ignores both then).

Only the chunks before the first IDAT count (libpng ignores these after it, where Pillow reads
them too), and of each kind the first, as libpng keeps it: of two iCCP chunks, Pillow keeps the
last profile, libpng (and so browsers) the first, which `Chunks.profile` is.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import PngImagePlugin

from mediavault.imaging.colour import D65, SRGB_PRIMARIES, Chromaticity, CodedColours, Primaries, coded_colours, srgb_tones

_SIGNATURE_BYTES = 8
# IHDR's colour types of grey and of RGB without alpha, and the bit set in those with colour
# (RGB with or without alpha, a palette) but not in grey's.
_GREY = 0
_TRUECOLOUR = 2
_COLOUR_BIT = 2
# The bit depths below 8 a grey PNG may have.
_FEW_BITS = frozenset({1, 2, 4})
# The kinds read; each is a few bytes (a palette's tRNS at most 256), but an iCCP, whose deflated
# profile Pillow has inflated already (within PngImagePlugin.MAX_TEXT_CHUNK, or refused the PNG).
_READ = frozenset({b"IHDR", b"tRNS", b"gAMA", b"cHRM", b"iCCP", b"cICP"})
# The chunk that names the colours sRGB outright, overriding gAMA and cHRM; only whether it is
# there is kept. An iCCP does too, where its profile can be used: decode decides; and a cICP,
# where its codes are read.
_SRGB = b"sRGB"
# A cICP's matrix of RGB as it is, and its flag of full-range levels.
_CICP_RGB = 0
_CICP_FULL_RANGE = 1
# gAMA and cHRM hold their values times this; gAMA's is 1 / the exponent.
_SCALE = 100_000
_GAMMA_BOUNDS = (16, 625_000_000)
_SRGB_GAMMA = 1 / 2.2
_NEUTRAL_WITHIN = 0.05
# sRGB's primaries and white as writers round them into a cHRM come out within this of them.
_SAME_CHROMATICITY_WITHIN = 0.001


@dataclass(frozen=True)
class Colours:
    """How a PNG's gAMA and cHRM say its levels are to be shown: each level's light is
    (level / max) ** exponent, of these primaries and white (sRGB's when None)."""

    exponent: float
    primaries: Primaries | None = None
    white: Chromaticity = D65

    def tones(self, largest: int) -> tuple[int, ...]:
        """For each level, 0 to `largest`, the 8-bit level in sRGB's tone curve that shows its light (see srgb_tones)."""
        return srgb_tones(lambda level: level**self.exponent, largest)


@dataclass(frozen=True)
class Chunks:
    """The first chunk of each kind `_READ` names before the pixels, by kind, and whether an sRGB
    chunk came before them."""

    payloads: dict[bytes, bytes] = field(default_factory=dict)
    srgb: bool = False

    @property
    def bit_depth(self) -> int:
        return self.payloads.get(b"IHDR", bytes(13))[8]

    @property
    def colour_type(self) -> int:
        return self.payloads.get(b"IHDR", bytes(13))[9]

    @property
    def in_colour(self) -> bool:
        """Whether the pixels are colours (RGB, with alpha or without, or a palette's), not grey levels."""
        return bool(self.colour_type & _COLOUR_BIT)

    @property
    def transparent_colour(self) -> tuple[int, int, int] | None:
        """The 16-bit samples of the colour a 16-bit RGB PNG's tRNS makes transparent."""
        trns = self.payloads.get(b"tRNS")
        if self.bit_depth != 16 or self.colour_type != _TRUECOLOUR or trns is None or len(trns) != 6:
            return None
        red, green, blue = struct.unpack(">3H", trns)
        return red, green, blue

    @property
    def transparent_grey(self) -> int | None:
        """The level a grey PNG of 1, 2 or 4 bits' tRNS makes transparent, scaled to 8 bits as
        Pillow scales the pixels (0, 85, 170 and 255 at 2 bits); a level past the bit depth is
        masked to it, as libpng masks it."""
        trns = self.payloads.get(b"tRNS")
        if self.colour_type != _GREY or self.bit_depth not in _FEW_BITS or trns is None or len(trns) != 2:
            return None
        largest = (1 << self.bit_depth) - 1
        (level,) = struct.unpack(">H", trns)
        return (level & largest) * 255 // largest

    @property
    def coded_colours(self) -> CodedColours | None:
        """The colours the cICP names, where browsers read it and its codes are read here (see above)."""
        cicp = self.payloads.get(b"cICP")
        if cicp is None or len(cicp) != 4 or (cicp[2], cicp[3]) != (_CICP_RGB, _CICP_FULL_RANGE):
            return None
        return coded_colours(cicp[0], cicp[1])

    @property
    def profile(self) -> bytes | None:
        """The ICC profile of the first iCCP, None where there is none or it does not inflate
        (Pillow leaves None for that too); whether lcms can use it is decode's to judge."""
        iccp = self.payloads.get(b"iCCP")
        if iccp is None:
            return None
        # A name of 1 to 79 bytes, its NUL, the compression method (0: Pillow refuses others), the profile.
        deflated = iccp[iccp.find(b"\0") + 2 :]
        try:
            return zlib.decompressobj().decompress(deflated, PngImagePlugin.MAX_TEXT_CHUNK)
        except zlib.error:
            return None

    @property
    def colours(self) -> Colours | None:
        """What the gAMA and cHRM say, where they count and say more than sRGB (see above), an
        iCCP left out."""
        gama = self.payloads.get(b"gAMA")
        if self.srgb or self.coded_colours is not None or gama is None or len(gama) != 4:
            return None
        (gamma,) = struct.unpack(">I", gama)
        if not _GAMMA_BOUNDS[0] <= gamma <= _GAMMA_BOUNDS[1]:
            return None
        exponent = _SCALE / gamma
        chromaticities = _chromaticities(self.payloads.get(b"cHRM", b""))
        if chromaticities is None:
            if abs(exponent * _SRGB_GAMMA - 1) < _NEUTRAL_WITHIN:
                return None
            return Colours(exponent)
        primaries, white = chromaticities
        if not self.in_colour or (_same(primaries, SRGB_PRIMARIES) and _same((white,), (D65,))):
            # Nothing to convert: sRGB's own primaries, or a grey image's, whose levels (R = G = B)
            # are its white however the primaries lie.
            return Colours(exponent)
        return Colours(exponent, primaries, white)


def _chromaticities(chrm: bytes) -> tuple[Primaries, Chromaticity] | None:
    """A cHRM's primaries and white, or None when it describes no colour space."""
    if len(chrm) != 32:
        return None
    values = [value / _SCALE for value in struct.unpack(">8I", chrm)]
    white, red, green, blue = ((values[i], values[i + 1]) for i in range(0, 8, 2))
    if any(y <= 0 or x + y > 1 for x, y in (white, red, green, blue)):
        return None
    # The white inside the triangle: on the same side of each edge as the opposite corner.
    for a, b, c in ((red, green, blue), (green, blue, red), (blue, red, green)):
        if _side(a, b, white) * _side(a, b, c) <= 0:
            return None
    return (red, green, blue), white


def _side(a: Chromaticity, b: Chromaticity, point: Chromaticity) -> float:
    """Positive on one side of the line through a and b, negative on the other, 0 on it."""
    return (b[0] - a[0]) * (point[1] - a[1]) - (b[1] - a[1]) * (point[0] - a[0])


def _same(these: tuple[Chromaticity, ...], those: tuple[Chromaticity, ...]) -> bool:
    return all(
        abs(p - q) <= _SAME_CHROMATICITY_WITHIN
        for xy, other in zip(these, those, strict=True)
        for p, q in zip(xy, other, strict=True)
    )


def read(data: bytes) -> Chunks:
    """The chunks of a PNG Pillow opened (so its signature and a whole IHDR come first), as far as its first IDAT."""
    payloads: dict[bytes, bytes] = {}
    srgb = False
    position = _SIGNATURE_BYTES
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        start = position + 8
        if kind == b"IDAT" or start + length > len(data):
            break
        if kind in _READ and kind not in payloads:
            payloads[kind] = data[start : start + length]
        srgb = srgb or kind == _SRGB
        # Past the payload and its CRC.
        position = start + length + 4
    if len(payloads.get(b"IHDR", b"")) != 13:
        payloads.pop(b"IHDR", None)
    return Chunks(payloads, srgb)


@dataclass(frozen=True)
class ApngFrame:
    """One frame of an APNG, as its fcTL describes it: its box on the canvas, (left, top, right,
    bottom), its delay, its dispose_op and blend_op, and where its compressed pixels lie in the
    file (the payloads of its IDAT chunks, or of its fdAT chunks past their sequence numbers)."""

    box: tuple[int, int, int, int]
    delay_ms: int
    dispose_op: int
    blend_op: int
    pixels: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Apng:
    """An APNG's IHDR payload, the chunks each frame's pixels need (_FRAME_CHUNKS, whole), and its frames."""

    header: bytes
    frame_chunks: bytes
    frames: tuple[ApngFrame, ...]

    @property
    def size(self) -> tuple[int, int]:
        width, height = struct.unpack_from(">II", self.header)
        return width, height

    def alone(self, data: bytes, frame: ApngFrame) -> bytes:
        """The frame as a PNG of its own, of the APNG's bytes `data`: its size, the APNG's palette and
        tRNS, its pixels in one IDAT."""
        left, top, right, bottom = frame.box
        pixels = b"".join(data[start:end] for start, end in frame.pixels)
        return (
            data[:_SIGNATURE_BYTES]
            + _chunk(b"IHDR", struct.pack(">II", right - left, bottom - top) + self.header[8:])
            + self.frame_chunks
            + _chunk(b"IDAT", pixels)
            + _chunk(b"IEND", b"")
        )


# The chunks before the pixels that decoding a frame's pixels needs: the colours are read once, from
# the APNG's own chunks.
_FRAME_CHUNKS = frozenset({b"PLTE", b"tRNS"})
_IHDR_BYTES = 13
# An fcTL's payload: sequence number, width, height, x and y offsets, delay numerator and
# denominator, dispose_op, blend_op.
_FCTL = struct.Struct(">IIIIIHHBB")
# A delay's denominator of 0 means hundredths of a second.
_DEFAULT_DELAY_DENOMINATOR = 100


def apng(data: bytes, most: int) -> Apng:
    """The first `most` frames of the APNG Pillow opened, read as Pillow's reader reads them, and
    refused where it refuses them (ValueError): an fcTL or fdAT out of sequence or cut short, a frame
    off the canvas, of no pixels, or missing."""
    # Pillow opened it, so a whole IHDR comes first, past its length and kind.
    header = data[_SIGNATURE_BYTES + 8 : _SIGNATURE_BYTES + 8 + _IHDR_BYTES]
    frame_chunks: list[bytes] = []
    frames: list[ApngFrame] = []
    control: tuple[tuple[int, int, int, int], int, int, int] | None = None
    pixels: list[tuple[int, int]] = []
    sequence = -1
    pixels_seen = False
    for kind, start, end in _chunks(data):
        if kind == b"fcTL":
            if control is not None:
                frames.append(_frame(control, pixels))
                pixels = []
            if len(frames) == most:
                break
            sequence = _next_in_sequence(data[start:end], sequence, _FCTL.size)
            control = _frame_control(data[start : start + _FCTL.size], header)
        elif kind == b"IDAT":
            # Before any fcTL, the default image, left out of the animation.
            if control is not None and not frames:
                pixels.append((start, end))
            pixels_seen = True
        elif kind == b"fdAT":
            if control is None:
                raise ValueError("APNG contains frame sequence errors")
            sequence = _next_in_sequence(data[start:end], sequence, 4)
            pixels.append((start + 4, end))
        elif kind in _FRAME_CHUNKS and not pixels_seen:
            # The whole chunk: its length and kind before, its CRC after.
            frame_chunks.append(data[start - 8 : end + 4])
    if len(frames) < most:
        frames.append(_frame(control, pixels))
    if len(frames) < most:
        raise ValueError("No more images in APNG file")
    return Apng(header, b"".join(frame_chunks), tuple(frames))


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Each chunk's kind and where its payload starts and ends, as far as the IEND or a chunk cut short."""
    position = _SIGNATURE_BYTES
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        start = position + 8
        end = start + length
        if end > len(data) or kind == b"IEND":
            return
        yield kind, start, end
        # Past the payload and its CRC.
        position = end + 4


def _frame(control: tuple[tuple[int, int, int, int], int, int, int] | None, pixels: list[tuple[int, int]]) -> ApngFrame:
    if control is None or not pixels:
        raise ValueError("APNG missing frame data")
    return ApngFrame(*control, tuple(pixels))


def _next_in_sequence(payload: bytes, sequence: int, least: int) -> int:
    """The sequence number an fcTL's or fdAT's payload, of at least `least` bytes, starts with,
    which must follow `sequence`."""
    if len(payload) < least:
        raise ValueError("APNG contains a truncated fcTL or fdAT chunk")
    (number,) = struct.unpack_from(">I", payload)
    if number != sequence + 1:
        raise ValueError("APNG contains frame sequence errors")
    return int(number)


def _frame_control(fctl: bytes, header: bytes) -> tuple[tuple[int, int, int, int], int, int, int]:
    """An fcTL's box, delay in milliseconds (as Pillow works it out), dispose_op and blend_op; a
    frame of no pixels or off the canvas IHDR's `header` gives is refused."""
    _, width, height, left, top, numerator, denominator, dispose_op, blend_op = _FCTL.unpack(fctl)
    canvas_width, canvas_height = struct.unpack_from(">II", header)
    if left + width > canvas_width or top + height > canvas_height or not width or not height:
        raise ValueError("APNG contains invalid frames")
    delay_ms = int(numerator / (denominator or _DEFAULT_DELAY_DENOMINATOR) * 1000)
    return (left, top, left + width, top + height), delay_ms, dispose_op, blend_op


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
