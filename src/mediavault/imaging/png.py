"""What a PNG's chunks say that Pillow's PNG reader gets wrong, read from the bytes as browsers read them.

A 16-bit RGB PNG may name one colour transparent (tRNS). Pillow reads its samples to their top
bytes and compares those with the colour's low bytes, so the colour's own pixels stayed opaque
and others went transparent; browsers compare all 16 bits of each sample.
`Chunks.transparent_colour` is that colour, for decode to match against both bytes of every
sample.

Only the chunks before the first IDAT count (libpng ignores these after it), and of each kind the
first, as libpng keeps it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

_SIGNATURE_BYTES = 8
# IHDR's colour type for RGB without alpha.
_TRUECOLOUR = 2
# The kinds read; each is a few bytes (a palette's tRNS at most 256).
_READ = frozenset({b"IHDR", b"tRNS"})


@dataclass(frozen=True)
class Chunks:
    """The first chunk of each kind `_READ` names before the pixels, by kind."""

    payloads: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def bit_depth(self) -> int:
        return self.payloads.get(b"IHDR", bytes(13))[8]

    @property
    def colour_type(self) -> int:
        return self.payloads.get(b"IHDR", bytes(13))[9]

    @property
    def transparent_colour(self) -> tuple[int, int, int] | None:
        """The 16-bit samples of the colour a 16-bit RGB PNG's tRNS makes transparent."""
        trns = self.payloads.get(b"tRNS")
        if self.bit_depth != 16 or self.colour_type != _TRUECOLOUR or trns is None or len(trns) != 6:
            return None
        red, green, blue = struct.unpack(">3H", trns)
        return red, green, blue


def read(data: bytes) -> Chunks:
    """The chunks of a PNG Pillow opened (so its signature and a whole IHDR come first), as far as its first IDAT."""
    payloads: dict[bytes, bytes] = {}
    position = _SIGNATURE_BYTES
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        start = position + 8
        if kind == b"IDAT" or start + length > len(data):
            break
        if kind in _READ and kind not in payloads:
            payloads[kind] = data[start : start + length]
        # Past the payload and its CRC.
        position = start + length + 4
    if len(payloads.get(b"IHDR", b"")) != 13:
        payloads.pop(b"IHDR", None)
    return Chunks(payloads)
