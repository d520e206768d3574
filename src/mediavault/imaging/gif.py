"""What a GIF's blocks say, read from the bytes without decoding a pixel.

Pillow counts a GIF's frames (`n_frames`, and `is_animated` for the first two) by walking the
whole file in Python, a read call for each sub-block of each frame's data, so that a GIF of
millions of tiny frames, or of one frame split into 1-byte sub-blocks, held a transcoding
process for a good part of its time limit each time the file was opened. `count_frames` stops
at the number of frames its caller can use, and at _MAX_BLOCKS blocks.

Between blocks a stray byte is skipped, as Pillow skips it; data cut short ends the walk, the
frame it cut counted (decoding it is what fails).
"""

from __future__ import annotations

_EXTENSION = 0x21
_IMAGE = 0x2C
_TRAILER = 0x3B
# The signature and the logical screen descriptor, whose last byte but two says whether a
# global colour table follows.
_SCREEN_END = 13
# The image descriptor: its introducer, position, size and the flags of a local colour table.
_DESCRIPTOR = 10
# Sub-blocks hold at most 255 bytes, which every encoder fills: a 50 MB GIF has about 200,000.
# Past this many, of any kind, the walk gives up.
_MAX_BLOCKS = 1_000_000


class _TooManyBlocks(Exception):
    pass


def count_frames(data: bytes, most: int) -> int | None:
    """How many frames the GIF has, counted no further than `most`; None when reaching that
    far takes more than _MAX_BLOCKS blocks (a GIF no encoder writes, not worth animating)."""
    walk = _Walk(data)
    position = _SCREEN_END + _colour_table(data[10]) if len(data) > 10 else len(data)
    frames = 0
    try:
        while frames < most and position < len(data):
            kind = data[position]
            if kind == _TRAILER:
                break
            if kind == _EXTENSION:
                # Past the introducer and the label, the extension's sub-blocks.
                position = walk.past_sub_blocks(position + 2)
            elif kind == _IMAGE:
                flags = data[position + _DESCRIPTOR - 1] if position + _DESCRIPTOR <= len(data) else 0
                # Past the descriptor, its colour table and the LZW minimum code size, the pixels' sub-blocks.
                position = walk.past_sub_blocks(position + _DESCRIPTOR + _colour_table(flags) + 1)
                frames += 1
            else:
                walk.step()
                position += 1
    except _TooManyBlocks:
        return None
    return frames


class _Walk:
    """Block lengths read from `data`, at most _MAX_BLOCKS of them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.left = _MAX_BLOCKS

    def step(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooManyBlocks

    def past_sub_blocks(self, position: int) -> int:
        """Where the sub-blocks starting at `position` end, past their empty terminator (the end of
        the data when they are cut short)."""
        data, end, left = self.data, len(self.data), self.left
        while position < end and left >= 0:
            size = data[position]
            position += 1 + size
            left -= 1
            if not size:
                break
        self.left = left
        if left < 0:
            raise _TooManyBlocks
        return min(position, end)


def _colour_table(flags: int) -> int:
    """The bytes of the colour table that a screen or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0
