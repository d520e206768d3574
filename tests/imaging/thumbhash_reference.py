"""The ThumbHash encoder as it was written out in Python before it moved to C (_pixels.thumbhash).

The C one must give these bytes for every picture (test_thumbhash compares them). The
sums add left to right, as Python 3.11's sum() and the JavaScript reference do (Python
3.12's sum() compensates its rounding, which would move some hashes by a nibble).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _total(values: Iterable[float]) -> float:
    total = 0.0
    for value in values:
        total += value
    return total


def encode(width: int, height: int, rgba: bytes) -> bytes:
    """The ThumbHash of width x height RGBA pixels (at most 100x100), as the reference computes it."""
    if not (0 < width <= 100 and 0 < height <= 100) or len(rgba) != width * height * 4:
        raise ValueError(f"{width}x{height} RGBA with {len(rgba)} bytes is no picture up to 100x100")
    count = width * height
    # Byte strides: each channel is one C-level slice, so the loops below are comprehensions.
    reds, greens, blues, alpha_bytes = (rgba[c::4] for c in range(4))
    alphas = [a / 255 for a in alpha_bytes]
    total_alpha = _total(alphas)
    has_alpha = total_alpha < count
    if has_alpha:
        # Composited over the picture's average colour, weighted by alpha.
        average = [
            _total(a * v for a, v in zip(alphas, channel, strict=True)) / 255 / total_alpha if total_alpha else 0.0
            for channel in (reds, greens, blues)
        ]
        r, g, b = (
            [avg * (1 - a) + a / 255 * v for a, v in zip(alphas, channel, strict=True)]
            for avg, channel in zip(average, (reds, greens, blues), strict=True)
        )
    else:
        r, g, b = ([v / 255 for v in channel] for channel in (reds, greens, blues))
    luma = [(x + y + z) / 3 for x, y, z in zip(r, g, b, strict=True)]
    p = [(x + y) / 2 - z for x, y, z in zip(r, g, b, strict=True)]
    q = [x - y for x, y in zip(r, g, strict=True)]
    l_limit = 5 if has_alpha else 7
    longest = max(width, height)
    lx = max(1, _round(l_limit * width / longest))
    ly = max(1, _round(l_limit * height / longest))

    l_dc, l_ac, l_scale = _encode_channel(luma, width, height, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = _encode_channel(p, width, height, 3, 3)
    q_dc, q_ac, q_scale = _encode_channel(q, width, height, 3, 3)
    landscape = width > height
    header24 = (
        _round(63 * l_dc) | _round(31.5 + 31.5 * p_dc) << 6 | _round(31.5 + 31.5 * q_dc) << 12
        | _round(31 * l_scale) << 18 | int(has_alpha) << 23
    )
    header16 = (ly if landscape else lx) | _round(63 * p_scale) << 3 | _round(63 * q_scale) << 9 | int(landscape) << 15
    hashed = [header24 & 255, (header24 >> 8) & 255, header24 >> 16, header16 & 255, header16 >> 8]
    factors = [l_ac, p_ac, q_ac]
    if has_alpha:
        a_dc, a_ac, a_scale = _encode_channel(alphas, width, height, 5, 5)
        hashed.append(_round(15 * a_dc) | _round(15 * a_scale) << 4)
        factors.append(a_ac)
    nibbles = [_round(15 * f) for ac in factors for f in ac]
    nibbles += [0] * (len(nibbles) % 2)
    hashed += [nibbles[i] | nibbles[i + 1] << 4 for i in range(0, len(nibbles), 2)]
    return bytes(hashed)


def _round(value: float) -> int:
    # The reference's rounding (JavaScript's Math.round: halves up); Python's round() halves to even.
    return math.floor(value + 0.5)


def _encode_channel(channel: list[float], width: int, height: int, nx: int, ny: int) -> tuple[float, list[float], float]:
    """DC, AC terms normalised to 0..1, and their scale: the DCT terms with cx * ny < nx * (ny - cy)."""
    # The DCT is separable: first each row against each horizontal frequency.
    cos_x = [[math.cos(math.pi / width * cx * (x + 0.5)) for x in range(width)] for cx in range(nx)]
    rows = [channel[y * width : (y + 1) * width] for y in range(height)]
    row_sums = [[_total(v * f for v, f in zip(row, cos_x[cx], strict=True)) for row in rows] for cx in range(nx)]
    dc, ac, scale = 0.0, [], 0.0
    for cy in range(ny):
        cos_y = [math.cos(math.pi / height * cy * (y + 0.5)) for y in range(height)]
        cx = 0
        while cx * ny < nx * (ny - cy):
            f = _total(s * c for s, c in zip(row_sums[cx], cos_y, strict=True)) / (width * height)
            if cx or cy:
                ac.append(f)
                scale = max(scale, abs(f))
            else:
                dc = f
            cx += 1
    if scale:
        ac = [0.5 + 0.5 / scale * f for f in ac]
    return dc, ac, scale
