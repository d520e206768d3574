"""An animation's frames drawn one over another as browsers draw them, a GIF's and an APNG's alike.

The canvas starts fully transparent. Each frame's own pixels (RGBA, straight alpha) are drawn at
their place, over what the frames before left (GIF; APNG's blend_op OVER) or in place of it, alpha
and all (APNG's blend_op SOURCE); after the frame is shown its area is left as it is, cleared to
transparent black, or put back as it was before the frame (GIF's disposal methods, APNG's dispose_op).
Memory holds the canvas, one frame's own pixels and, for a frame put back, its area as it was.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

TRANSPARENT = (0, 0, 0, 0)


class Disposal(enum.Enum):
    """What becomes of a frame's area once it has been shown."""

    KEEP = enum.auto()
    CLEAR = enum.auto()
    PUT_BACK = enum.auto()


@dataclass(frozen=True)
class Placement:
    """Where a frame is drawn on the canvas, (left, top, right, bottom), how, and for how long."""

    box: tuple[int, int, int, int]
    disposal: Disposal
    # The frame's pixels replace the canvas's, transparent ones too, rather than being drawn over them.
    replaces: bool
    delay_ms: int


def drawn(size: tuple[int, int], frames: Iterable[tuple[Placement, Image.Image | None]]) -> Iterator[tuple[Image.Image, int]]:
    """Each frame, given as its placement and its own RGBA pixels (None for an empty frame), drawn on
    a canvas of `size` (a frame's part off it clipped), with its delay in milliseconds. The picture
    is the one the next frame is drawn on: use it before asking for the next."""
    canvas = Image.new("RGBA", size, TRANSPARENT)
    for placement, own in frames:
        left, top, _, _ = placement.box
        before = canvas.crop(placement.box) if placement.disposal is Disposal.PUT_BACK else None
        if own is not None:
            if placement.replaces:
                canvas.paste(own, (left, top))
            else:
                canvas.alpha_composite(own, (left, top))
        yield canvas, placement.delay_ms
        if placement.disposal is Disposal.CLEAR:
            canvas.paste(TRANSPARENT, placement.box)
        elif before is not None:
            canvas.paste(before, (left, top))
