"""A GIF's frames as browsers show them, its blocks read from the bytes and each frame's pixels decoded by Pillow.

Pillow's GIF reader falls short of browsers in three ways, which `read` and `shown` make up for:

- It counts the frames (`n_frames`, and `is_animated` for the first two) by walking the whole
  file in Python, a read call for each sub-block of each frame's data, so that a GIF of
  millions of tiny frames, or of one frame split into 1-byte sub-blocks, held a transcoding
  process for a good part of its time limit each time the file was opened. `read` stops at the
  number of frames its caller can use, and at _MAX_BLOCKS blocks.
- It draws each frame over the last its own way, not the browsers' (Chromium's and Firefox's
  decoders, alike in this): a frame disposed of "to the background" leaves the background
  colour behind, opaque, unless that frame has a transparent colour, where browsers clear its
  area to transparent; a frame without a disposal method of its own takes the one before's;
  and the screen outside the first frame is its colour 0, where browsers start from a
  transparent screen. `shown` draws them as browsers do: each frame's own pixels (its
  transparent colour clear) over what the frames before left, and after it its area left as it
  is (disposal 0, 1 and 5 to 7), cleared (2), or put back as it was before the frame (3, and
  4, which Chromium takes for 3 as some writers set that bit for it).
- It reads a loop count only before the first frame and says nothing of what it means: `Gif.plays`
  is how many times browsers play the animation through (see there).

Pillow's `Image.open` reads every block before the first image itself, one read call for each
sub-block or stray byte, before any bound of ours applies, and gathers a comment by copying all it
has gathered at each sub-block: a comment of a few megabytes took seconds, one of 50 MB far longer.
`openable` hands Pillow the GIF without the comments before its first image, which browsers ignore,
and refuses one with more than _MAX_BLOCKS_BEFORE_IMAGE blocks there.

Between blocks a stray byte is skipped, as Pillow skips it; data cut short ends the walk, the
frame it cut counted (decoding it is what fails).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from mediavault.imaging import canvas

_EXTENSION = 0x21
_IMAGE = 0x2C
_TRAILER = 0x3B
_GRAPHIC_CONTROL = 0xF9
_COMMENT = 0xFE
_APPLICATION = 0xFF
# The application extensions whose data holds a loop count: Netscape's, and the same from AnimExts,
# which Chromium reads too.
_LOOPING = frozenset({b"NETSCAPE2.0", b"ANIMEXTS1.0"})
# The signature and the logical screen descriptor, whose last byte but two says whether a
# global colour table follows.
_SCREEN_END = 13
# The image descriptor: its introducer, position, size and the flags of a local colour table.
_DESCRIPTOR = 10
# The disposal methods after which browsers clear a frame's area, and put back what was there before it.
_DISPOSAL_CLEARING = 2
_DISPOSALS_PUTTING_BACK = frozenset({3, 4})
# Sub-blocks hold at most 255 bytes, which every encoder fills: a 50 MB GIF has about 200,000.
# Past this many, of any kind, the walk gives up.
_MAX_BLOCKS = 1_000_000
# Blocks (sub-blocks and stray bytes) before the first image: encoders write a few, an XMP packet
# (read as sub-blocks of its own bytes' lengths) some thousands. Pillow's open reads this many in
# a few hundredths of a second.
_MAX_BLOCKS_BEFORE_IMAGE = 100_000


@dataclass(frozen=True)
class Frame:
    """One image of a GIF: where it is on the logical screen, (left, top, right, bottom), and
    where its bytes are: its graphic control extension (empty without one), and its image
    descriptor up to the end of its data."""

    box: tuple[int, int, int, int]
    control: bytes
    start: int
    end: int

    @property
    def disposal(self) -> int:
        return (self.control[3] >> 2) & 7 if len(self.control) > 3 else 0

    @property
    def delay_ms(self) -> int:
        """The delay in centiseconds, as milliseconds; 0 without one."""
        return int.from_bytes(self.control[4:6], "little") * 10 if len(self.control) > 5 else 0


@dataclass(frozen=True)
class Gif:
    # The signature, the logical screen descriptor and the global colour table.
    header: bytes
    frames: tuple[Frame, ...]
    # The first loop count among the blocks read; None without one.
    loop: int | None

    @property
    def plays(self) -> int:
        """How many times browsers play the animation through, 0 for ever: once without a loop count,
        for ever with 0, and once more than any other count (Chromium's cc/paint/image_animation_count.h;
        Firefox's alike)."""
        if self.loop is None:
            return 1
        return 0 if self.loop == 0 else self.loop + 1

    @property
    def screen(self) -> tuple[int, int]:
        """The logical screen the frames are drawn on: as the header declares it, grown to cover the
        first frame, as Pillow's open and Chromium grow it (a writer that left the screen 0 by 0);
        the part of a later frame that lies off it is clipped, as browsers clip it."""
        width, height = struct.unpack_from("<HH", self.header, 6)
        if not self.frames:
            return width, height
        _, _, right, bottom = self.frames[0].box
        return max(width, right), max(height, bottom)

    @property
    def own_pixels(self) -> int:
        """The pixels of the frames' own pictures, each decoded whole, on the screen or off it."""
        return sum((right - left) * (bottom - top) for left, top, right, bottom in (frame.box for frame in self.frames))


class _TooManyBlocks(Exception):
    pass


class TooCostlyToOpen(Exception):
    """More than _MAX_BLOCKS_BEFORE_IMAGE blocks before the GIF's first image."""


def openable(data: bytes) -> bytes:
    """The GIF's bytes for Pillow to open: without the comment extensions before its first image (see
    above), the bytes themselves when there are none. Raises TooCostlyToOpen past
    _MAX_BLOCKS_BEFORE_IMAGE blocks before it; bytes too short for a screen descriptor as they are,
    for Pillow to refuse."""
    if len(data) < _SCREEN_END:
        return data
    walk = _Walk(data, _MAX_BLOCKS_BEFORE_IMAGE)
    position = _SCREEN_END + _colour_table(data[10])
    kept: list[bytes] = []
    start = 0
    try:
        while position < len(data) and data[position] not in (_IMAGE, _TRAILER):
            if data[position] == _EXTENSION:
                end = walk.past_sub_blocks(position + 2)
                if data[position + 1 : position + 2] == bytes([_COMMENT]):
                    kept.append(data[start:position])
                    start = end
                position = end
            else:
                walk.step()
                position += 1
    except _TooManyBlocks:
        raise TooCostlyToOpen from None
    return b"".join([*kept, data[start:]]) if kept else data


def read(data: bytes, most: int) -> Gif | None:
    """The first `most` frames of the GIF Pillow opened (so a whole screen descriptor comes first),
    fewer when it has fewer; None when reaching that far takes more than _MAX_BLOCKS blocks (a GIF
    no encoder writes, not worth animating)."""
    walk = _Walk(data, _MAX_BLOCKS)
    position = _SCREEN_END + _colour_table(data[10])
    frames: list[Frame] = []
    control = b""
    loop = None
    try:
        while len(frames) < most and position < len(data):
            kind = data[position]
            if kind == _TRAILER:
                break
            if kind == _EXTENSION:
                # Past the introducer and the label, the extension's sub-blocks.
                end = walk.past_sub_blocks(position + 2)
                label = data[position + 1 : position + 2]
                if label == bytes([_GRAPHIC_CONTROL]):
                    # The last before the image counts, as in Pillow and browsers.
                    control = data[position:end]
                elif label == bytes([_APPLICATION]) and loop is None:
                    loop = _loop_count(data[position + 2 : end])
                position = end
            elif kind == _IMAGE:
                descriptor = data[position + 1 : position + _DESCRIPTOR].ljust(_DESCRIPTOR - 1, b"\0")
                left, top, width, height, flags = struct.unpack("<4HB", descriptor)
                # Past the descriptor, its colour table and the LZW minimum code size, the pixels' sub-blocks.
                end = walk.past_sub_blocks(position + _DESCRIPTOR + _colour_table(flags) + 1)
                frames.append(Frame((left, top, left + width, top + height), control, position, end))
                control = b""
                position = end
            else:
                walk.step()
                position += 1
    except _TooManyBlocks:
        return None
    return Gif(data[: _SCREEN_END + _colour_table(data[10])], tuple(frames), loop)


def _loop_count(sub_blocks: bytes) -> int | None:
    """The loop count of an application extension's sub-blocks: an identifier of _LOOPING, then a
    sub-block of 1 and the count; None for any other."""
    if sub_blocks[:1] != b"\x0b" or sub_blocks[1:12] not in _LOOPING:
        return None
    data = sub_blocks[12:]
    if len(data) < 4 or data[0] < 3 or data[1] != 1:
        return None
    return int.from_bytes(data[2:4], "little")


def shown(data: bytes, gif: Gif, first: Image.Image | None = None) -> Iterator[tuple[Image.Image, int]]:
    """Each frame of the GIF read from `data`, on its logical screen (see Gif.screen), as browsers
    show it (see above and canvas), RGBA, with its delay in milliseconds; `first` is the first
    frame's own_picture where the caller has it already. The picture is the one the next frame is
    drawn on: use it before asking for the next."""
    placed = (
        (_placement(frame), first if index == 0 and first is not None else own_picture(data, gif, frame))
        for index, frame in enumerate(gif.frames)
    )
    return canvas.drawn(gif.screen, placed)


def _placement(frame: Frame) -> canvas.Placement:
    if frame.disposal == _DISPOSAL_CLEARING:
        disposal = canvas.Disposal.CLEAR
    elif frame.disposal in _DISPOSALS_PUTTING_BACK:
        disposal = canvas.Disposal.PUT_BACK
    else:
        disposal = canvas.Disposal.KEEP
    return canvas.Placement(frame.box, disposal, replaces=False, delay_ms=frame.delay_ms)


def own_picture(data: bytes, gif: Gif, frame: Frame) -> Image.Image | None:
    """The frame's pixels alone, RGBA, its transparent colour clear: decoded by Pillow as the one
    frame of a GIF of its size, its graphic control extension and colour tables; None for a frame
    of no pixels."""
    left, top, right, bottom = frame.box
    if right <= left or bottom <= top:
        return None
    alone = (
        gif.header[:6] + struct.pack("<HH", right - left, bottom - top) + gif.header[10:]
        + frame.control
        # The descriptor placed at the corner, its size, colour table and data as they are.
        + bytes([_IMAGE]) + struct.pack("<HH", 0, 0) + data[frame.start + 5 : frame.end]
        + bytes([_TRAILER])
    )
    with Image.open(io.BytesIO(alone), formats=["GIF"]) as picture:
        return picture.convert("RGBA")


class _Walk:
    """Block lengths read from `data`, at most `most` of them."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data = data
        self.left = most

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
