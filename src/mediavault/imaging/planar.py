"""A JPEG's pixels kept as its own YCbCr planes, from decode to the encoded variants.

The display variant is the picture decoded at the largest of 1, 1/2, 1/4 or 1/8 scale
that keeps the display's size (most phone photos: full size), resized the rest of the
way, and re-encoded: decoding to planes and encoding from them is about a quarter faster
than going through RGB (see turbojpeg). EXIF turns and the chroma's move to 4:2:0
happen on the planes (in _pixels, the C loops). The smaller variants are resized from one
"YCbCr" picture at the chroma's resolution, where luma and chroma line up, with
Pillow's four-byte resampling (its one-byte path has no SIMD and runs 3-5 times slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

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


def _raw_image(mode: str, size: tuple[int, int], buffer: bytes | bytearray, raw_mode: str) -> Image.Image:
    """An image over the buffer's rows, without a copy."""
    # Pillow annotates the data as bytes, but maps any buffer (TurboJPEG's bytearrays too).
    return Image.frombuffer(mode, size, cast(bytes, buffer), "raw", raw_mode, 0, 1)


@dataclass(frozen=True)
class Planes:
    """An upright picture as 4:2:0 planes: luma width x height, Cb and Cr half that, rounded up.

    `data` holds the Y, Cb and Cr rows, `strides[i]` bytes apart; each plane has at
    least as many rows and columns as TurboJPEG's encoder reads (plane_size). An odd
    width or height has the luma's last column or row repeated there.
    """

    width: int
    height: int
    data: tuple[bytes | bytearray, bytes | bytearray, bytes | bytearray]
    strides: tuple[int, int, int]

    def encode(self, quality: int) -> bytes:
        """A baseline 4:2:0 JPEG of the planes, without any metadata."""
        return turbojpeg.compress_planes(self.data, self.width, self.height, SAMP_420, quality, self.strides)

    def half(self) -> Image.Image:
        """The picture at the chroma's resolution, as one "YCbCr" image: luma box-averaged 2x2."""
        y, cb, cr = self.data
        pixels = _pixels.half_ycbcr(y, self.strides[0], self.width, self.height, cb, cr, self.strides[1])
        size = turbojpeg.plane_size(1, self.width, self.height, SAMP_420)
        return _raw_image("YCbCr", size, pixels, "YCbCrX")

    def to_rgb(self) -> Image.Image:
        """The picture in RGB, colour-converted as a JPEG decoder does."""
        rgbx = turbojpeg.planes_to_rgbx(self.data, self.width, self.height, SAMP_420, self.strides)
        return _raw_image("RGB", (self.width, self.height), rgbx, "RGBX")


def covers(width: int, height: int, specs: Sequence[VariantSpec]) -> bool:
    """Whether planes of a width x height picture make every spec in `specs`.

    The largest is the picture decoded at the largest scale that fits its box and
    resized the rest of the way (TurboJPEG 2.1 has no Huffman optimisation, so it
    must not ask for one); the others fit in half of it, so they are resized down
    from Planes.half().
    """
    largest, *others = sorted(specs, key=lambda spec: spec.box, reverse=True)
    display = fit(width, height, largest.box)
    half = (_ceil_div(display[0], 2), _ceil_div(display[1], 2))
    return not largest.optimize and all(
        w <= half[0] and h <= half[1] for w, h in (fit(width, height, spec.box) for spec in others)
    )


def readable(header: turbojpeg.Header) -> bool:
    """Whether decode() takes a JPEG with this header: three-component YCbCr, common subsampling."""
    return header.colorspace == turbojpeg.COLORSPACE_YCBCR and header.subsampling in _CHROMA_FACTORS


def decode(data: bytes, header: turbojpeg.Header, transpose: Image.Transpose | None, size: tuple[int, int]) -> Planes:
    """The JPEG's planes at `size` (upright), turned upright by `transpose`, chroma at 4:2:0.

    The decoder scales by 1/2, 1/4 or 1/8 as far as `size` allows; a Lanczos resize
    does the rest. Raises TurboJPEGError on anything libjpeg-turbo warns about, so
    that the caller can hand the file to the stricter Pillow path.
    """
    quarter_turn = transpose in _QUARTER_TURNS
    target = (size[1], size[0]) if quarter_turn else size
    denominator = next(d for d in (8, 4, 2, 1) if _covers_size(turbojpeg.scaled_size(header, d), target))
    width, height = turbojpeg.scaled_size(header, denominator)
    fx, fy = _CHROMA_FACTORS[header.subsampling]
    buffers = turbojpeg.decompress_to_planes(data, header, denominator)
    # Each plane as (bytes, width, height, stride): TurboJPEG pads rows and columns to
    # whole MCUs, which a stride wider than the width skips.
    chroma = (_ceil_div(width, fx), _ceil_div(height, fy))
    strides = [turbojpeg.plane_size(c, width, height, header.subsampling)[0] for c in range(3)]
    y: _Plane = (buffers[0], width, height, strides[0])
    cb: _Plane
    cr: _Plane
    cb, cr = ((buffer, *chroma, stride) for buffer, stride in zip(buffers[1:], strides[1:], strict=True))
    if (fx, fy) != (2, 2):
        # Box-averaging to 4:2:0 is what libjpeg's own downsampling does on encode;
        # before turning, so that the turn moves fewer samples.
        cb, cr = (_halve(plane, (2 // fx, 2 // fy)) for plane in (cb, cr))
    if (width, height) != target:
        half_target = (_ceil_div(target[0], 2), _ceil_div(target[1], 2))
        y, cb, cr = _resize(y, target), _resize(cb, half_target), _resize(cr, half_target)
    if transpose is not None:
        y = _turn(y, transpose, _padded(y[2] if quarter_turn else y[1]))
        cb, cr = (_turn(plane, transpose) for plane in (cb, cr))
    y = _for_encoder(y)
    return Planes(size[0], size[1], (y[0], cb[0], cr[0]), (y[3], cb[3], cr[3]))


_Plane = tuple[bytes | bytearray, int, int, int]


def _covers_size(size: tuple[int, int], target: tuple[int, int]) -> bool:
    return size[0] >= target[0] and size[1] >= target[1]


def _padded(width: int) -> int:
    """Row length the encoder reads for a 4:2:0 luma plane this wide."""
    return width + width % 2


def _halve(plane: _Plane, factor: tuple[int, int]) -> _Plane:
    buffer, width, height, stride = plane
    halved = _pixels.halve(buffer, width, height, stride, *factor)
    width, height = _ceil_div(width, factor[0]), _ceil_div(height, factor[1])
    return halved, width, height, width


def _turn(plane: _Plane, transpose: Image.Transpose, out_stride: int = 0) -> _Plane:
    buffer, width, height, stride = plane
    turned = _pixels.orient(buffer, width, height, stride, transpose.value, out_stride)
    width, height = (height, width) if transpose in _QUARTER_TURNS else (width, height)
    return turned, width, height, out_stride or width


def _resize(plane: _Plane, size: tuple[int, int]) -> _Plane:
    """The plane Lanczos-resized to `size`, exactly as Pillow resizes an "L" image.

    Pillow's one-byte resampling has no SIMD: seen as a "CMYK" image, four columns at
    a time go through its four-byte path instead (107 ms -> 18 ms for a 12 MP luma
    plane). That path resamples columns, so rows are done as columns of the plane
    turned on its diagonal; rows padded to whole four-byte pixels.
    """
    across = _columns_resampled(_turn(plane, Image.Transpose.TRANSPOSE, _four(plane[2])), size[0])
    return _columns_resampled(_turn(across, Image.Transpose.TRANSPOSE, _four(size[0])), size[1])


def _four(width: int) -> int:
    return width + -width % 4


def _columns_resampled(plane: _Plane, rows: int) -> _Plane:
    buffer, width, height, stride = plane
    packed = _raw_image("CMYK", (stride // 4, height), buffer, "CMYK")
    return packed.resize((stride // 4, rows), Image.Resampling.LANCZOS).tobytes(), width, rows, stride


def _for_encoder(plane: _Plane) -> _Plane:
    """The luma with the rows and columns the encoder reads past an odd edge, as repeated edge samples."""
    buffer, width, height, stride = plane
    rows = len(buffer) // stride
    if stride < _padded(width):
        image = _raw_image("L", (stride, rows), buffer, "L").crop((0, 0, width, height))
        padded = _pad(image, (_padded(width), _padded(height)))
        return padded.tobytes(), width, height, padded.width
    if rows < _padded(height):
        last = bytes(buffer[(height - 1) * stride : height * stride])
        return bytes(buffer[: height * stride]) + last, width, height, stride
    return plane


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
