"""A JPEG's pixels kept as its own YCbCr planes, from decode to the encoded variants.

A phone photo usually fits the display box, so its display variant is a re-encode at
full size: decoding to planes and encoding from them is about a quarter faster than
going through RGB (see turbojpeg). EXIF turns and the chroma's move to 4:2:0 happen
on the planes (in _pixels, the C loops). The smaller variants are resized from one
"YCbCr" picture at the chroma's resolution, where luma and chroma line up, with
Pillow's four-byte resampling (its one-byte path has no SIMD and runs 3-5 times slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from mediavault.imaging import _pixels, turbojpeg
from mediavault.imaging.spec import VariantSpec, fit
from mediavault.imaging.turbojpeg import SAMP_420, SAMP_422, SAMP_440, SAMP_444

_QUARTER_TURNS = frozenset(
    {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE}
)
# How many luma samples, across and down, share one chroma sample.
_CHROMA_FACTORS = {SAMP_444: (1, 1), SAMP_422: (2, 1), SAMP_420: (2, 2), SAMP_440: (1, 2)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Planes:
    """An upright picture as 4:2:0 planes: luma width x height, Cb and Cr half that, rounded up.

    `data` holds the Y, Cb and Cr rows, each plane the size TurboJPEG's encoder reads
    (plane_size): an odd width or height pads the luma with a copy of its last column
    or row.
    """

    width: int
    height: int
    data: tuple[bytes | bytearray, bytes | bytearray, bytes | bytearray]

    def encode(self, quality: int) -> bytes:
        """A baseline 4:2:0 JPEG of the planes, without any metadata."""
        return turbojpeg.compress_planes(self.data, self.width, self.height, SAMP_420, quality)

    def half(self) -> Image.Image:
        """The picture at the chroma's resolution, as one "YCbCr" image: luma box-averaged 2x2."""
        y_stride = turbojpeg.plane_size(0, self.width, self.height, SAMP_420)[0]
        size = turbojpeg.plane_size(1, self.width, self.height, SAMP_420)
        pixels = _pixels.half_ycbcr(self.data[0], y_stride, self.width, self.height, self.data[1], self.data[2], size[0])
        return Image.frombuffer("YCbCr", size, pixels, "raw", "YCbCrX", 0, 1)

    def to_rgb(self) -> Image.Image:
        """The picture in RGB, colour-converted as a JPEG decoder does."""
        rgbx = turbojpeg.planes_to_rgbx(self.data, self.width, self.height, SAMP_420)
        return Image.frombuffer("RGB", (self.width, self.height), rgbx, "raw", "RGBX", 0, 1)


def covers(width: int, height: int, specs: Sequence[VariantSpec]) -> bool:
    """Whether planes of a width x height picture make every spec in `specs`.

    The largest is the picture itself, re-encoded (TurboJPEG 2.1 has no Huffman
    optimisation, so it must not ask for one); the others fit in half the picture, so
    they are resized down from Planes.half().
    """
    largest, *others = sorted(specs, key=lambda spec: spec.box, reverse=True)
    half = (_ceil_div(width, 2), _ceil_div(height, 2))
    return (
        fit(width, height, largest.box) == (width, height)
        and not largest.optimize
        and all(w <= half[0] and h <= half[1] for w, h in (fit(width, height, spec.box) for spec in others))
    )


def readable(header: turbojpeg.Header) -> bool:
    """Whether decode() takes a JPEG with this header: three-component YCbCr, common subsampling."""
    return header.colorspace == turbojpeg.COLORSPACE_YCBCR and header.subsampling in _CHROMA_FACTORS


def decode(data: bytes, header: turbojpeg.Header, transpose: Image.Transpose | None) -> Planes:
    """The JPEG's planes at full scale, turned upright by `transpose`, chroma brought to 4:2:0.

    Raises TurboJPEGError on anything libjpeg-turbo warns about, so that the caller
    can hand the file to the stricter Pillow path.
    """
    width, height = header.width, header.height
    fx, fy = _CHROMA_FACTORS[header.subsampling]
    buffers = turbojpeg.decompress_to_planes(data, header)
    # Each plane as (bytes, width, height, stride): TurboJPEG pads rows and columns to
    # whole MCUs, which a stride wider than the width skips.
    chroma = (_ceil_div(width, fx), _ceil_div(height, fy))
    strides = [turbojpeg.plane_size(c, width, height, header.subsampling)[0] for c in range(3)]
    y = (buffers[0], width, height, strides[0])
    cb, cr = ((buffer, *chroma, stride) for buffer, stride in zip(buffers[1:], strides[1:], strict=True))
    if (fx, fy) != (2, 2):
        # Box-averaging to 4:2:0 is what libjpeg's own downsampling does on encode;
        # before turning, so that the turn moves fewer samples.
        cb, cr = (_reduce(plane, (2 // fx, 2 // fy)) for plane in (cb, cr))
    if transpose is not None:
        y, cb, cr = (_orient(plane, transpose) for plane in (y, cb, cr))
        if transpose in _QUARTER_TURNS:
            width, height = height, width
    planes = (_laid_out(y, turbojpeg.plane_size(0, width, height, SAMP_420)), cb[0], cr[0])
    return Planes(width, height, planes)


_Plane = tuple[bytes | bytearray, int, int, int]


def _reduce(plane: _Plane, factor: tuple[int, int]) -> _Plane:
    buffer, width, height, stride = plane
    halved = _pixels.halve(buffer, width, height, stride, *factor)
    width, height = _ceil_div(width, factor[0]), _ceil_div(height, factor[1])
    return halved, width, height, width


def _orient(plane: _Plane, transpose: Image.Transpose) -> _Plane:
    buffer, width, height, stride = plane
    turned = _pixels.orient(buffer, width, height, stride, transpose.value)
    width, height = (height, width) if transpose in _QUARTER_TURNS else (width, height)
    return turned, width, height, width


def _laid_out(plane: _Plane, size: tuple[int, int]) -> bytes | bytearray:
    """The luma as the encoder reads it: `size`, which is at most a column and a row more than the picture."""
    buffer, width, height, stride = plane
    if (stride, len(buffer) // stride) == size:
        return buffer
    image = Image.frombuffer("L", (stride, len(buffer) // stride), buffer, "raw", "L", 0, 1)
    return _pad(image.crop((0, 0, width, height)), size).tobytes()


def _pad(plane: Image.Image, size: tuple[int, int]) -> Image.Image:
    if plane.size == size:
        return plane
    # A repeated edge compresses without the ringing a black border would leave in the
    # last visible column or row.
    width, height = plane.size
    padded = Image.new("L", size)
    padded.paste(plane, (0, 0))
    if size[0] > width:
        padded.paste(plane.crop((width - 1, 0, width, height)), (width, 0))
    if size[1] > height:
        padded.paste(padded.crop((0, height - 1, size[0], height)), (0, height))
    return padded
