"""The C loops over planes give exactly what Pillow gives, on odd sizes and padded rows."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from mediavault.imaging import _pixels


def random_plane(width: int, height: int) -> Image.Image:
    return Image.frombytes("L", (width, height), os.urandom(width * height))


def padded_rows(image: Image.Image, stride: int) -> bytes:
    """The image's rows, each followed by stride - width bytes of junk."""
    junk = os.urandom(stride - image.width)
    rows = image.tobytes()
    return b"".join(rows[y * image.width : (y + 1) * image.width] + junk for y in range(image.height))


@pytest.mark.parametrize("method", list(Image.Transpose))
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (131, 70), (64, 64), (300, 129)])
def test_orient_matches_pillows_transpose(method: Image.Transpose, size: tuple[int, int]) -> None:
    plane = random_plane(*size)
    stride = size[0] + 5
    turned = _pixels.orient(padded_rows(plane, stride), *size, stride, method.value)
    assert turned == plane.transpose(method).tobytes()


@pytest.mark.parametrize("method", [Image.Transpose.TRANSPOSE, Image.Transpose.FLIP_LEFT_RIGHT])
def test_orient_pads_each_row_with_its_last_sample(method: Image.Transpose) -> None:
    plane = random_plane(37, 21)
    turned = plane.transpose(method)
    padded = _pixels.orient(plane.tobytes(), 37, 21, 37, method.value, turned.width + 3)
    rows = [padded[y * (turned.width + 3) : (y + 1) * (turned.width + 3)] for y in range(turned.height)]
    assert b"".join(row[: turned.width] for row in rows) == turned.tobytes()
    assert all(row[turned.width :] == row[turned.width - 1 : turned.width] * 3 for row in rows)


@pytest.mark.parametrize("size", [(2, 2), (1, 1), (7, 5), (130, 71), (301, 200)])
def test_half_ycbcr_matches_pillows_reduce_and_merge(size: tuple[int, int]) -> None:
    width, height = size
    half = ((width + 1) // 2, (height + 1) // 2)
    y, cb, cr = random_plane(width, height), random_plane(*half), random_plane(*half)
    y_stride, c_stride = width + 1, half[0] + 3
    pixels = _pixels.half_ycbcr(padded_rows(y, y_stride), y_stride, width, height,
                                padded_rows(cb, c_stride), padded_rows(cr, c_stride), c_stride)
    expected = Image.merge("YCbCr", (y.reduce(2), cb, cr))
    assert Image.frombytes("YCbCr", half, pixels, "raw", "YCbCrX").tobytes() == expected.tobytes()
    assert pixels[3::4] == b"\xff" * (half[0] * half[1])


@pytest.mark.parametrize("factor", [(1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("size", [(1, 1), (2, 2), (7, 5), (130, 71), (301, 200)])
def test_halve_matches_pillows_reduce(factor: tuple[int, int], size: tuple[int, int]) -> None:
    plane = random_plane(*size)
    stride = size[0] + 3
    assert _pixels.halve(padded_rows(plane, stride), *size, stride, *factor) == plane.reduce(factor).tobytes()


def test_short_buffers_and_unknown_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        _pixels.orient(bytes(99), 10, 10, 10, Image.Transpose.ROTATE_90.value)
    with pytest.raises(ValueError, match="stride"):
        _pixels.orient(bytes(100), 10, 10, 9, Image.Transpose.ROTATE_90.value)
    with pytest.raises(ValueError, match="out_stride"):
        _pixels.orient(bytes(200), 20, 10, 20, Image.Transpose.ROTATE_90.value, 9)
    with pytest.raises(ValueError, match="method"):
        _pixels.orient(bytes(100), 10, 10, 10, 7)
    with pytest.raises(ValueError, match="factors"):
        _pixels.halve(bytes(100), 10, 10, 10, 1, 1)
    with pytest.raises(ValueError, match="cb"):
        _pixels.half_ycbcr(bytes(100), 10, 10, 10, bytes(24), bytes(25), 5)
