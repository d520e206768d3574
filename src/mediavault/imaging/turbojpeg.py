"""libjpeg-turbo's TurboJPEG API through ctypes: JPEG to and from YCbCr planes.

A JPEG holds its pixels as YCbCr planes, chroma usually at half resolution. Pillow
always hands out RGB: it upsamples the chroma and converts the colour on decode, then
converts back and downsamples on encode. Decoding to planes and encoding from them
skips all four steps (about a quarter of the decode and encode time of a phone photo)
and moves 1.5 bytes per pixel instead of 4. The pixels are the same libjpeg-turbo
decodes for Pillow: this is the same library, reached through its other API.

The library is Debian's libturbojpeg0 (or any libjpeg-turbo 2.1 or later; 3.x keeps
these functions). Every call makes its own handle, so nothing is shared between threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SAMP_444, SAMP_422, SAMP_420, SAMP_GRAY, SAMP_440, SAMP_411 = range(6)
COLORSPACE_YCBCR = 1
_PIXEL_FORMAT_RGBX = 2
# A warning (a truncated or slightly corrupt file) fails the call, and so does a
# progressive file of more than 500 scans (a known way to burn CPU): such files go to
# the stricter Pillow path, where the job's time limit bounds them.
_FLAG_STOPONWARNING = 8192
_FLAG_LIMITSCANS = 32768
_DECODE_FLAGS = _FLAG_STOPONWARNING | _FLAG_LIMITSCANS
# TurboJPEG compresses with the fast, less accurate forward DCT unless told otherwise;
# Pillow uses the accurate one, and so do the variants.
_ENCODE_FLAGS = 4096


class TurboJPEGError(Exception):
    """TurboJPEG refused the data or the call; the message is the library's."""


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise ImportError(f"libturbojpeg not found ({exc}); install Debian's libturbojpeg0") from exc
    handle, buf, size, ints = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_int)
    planes = ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "tjInitDecompress": (handle, []),
        "tjInitCompress": (handle, []),
        "tjDestroy": (ctypes.c_int, [handle]),
        "tjGetErrorStr2": (ctypes.c_char_p, [handle]),
        "tjFree": (None, [ctypes.c_void_p]),
        "tjPlaneWidth": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        "tjPlaneHeight": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        "tjDecompressHeader3": (ctypes.c_int, [handle, buf, size, ints, ints, ints, ints]),
        "tjDecompressToYUVPlanes": (ctypes.c_int, [handle, buf, size, planes, ctypes.c_int, ints, ctypes.c_int, ctypes.c_int]),
        "tjCompressFromYUVPlanes": (
            ctypes.c_int,
            [handle, planes, ctypes.c_int, ints, ctypes.c_int, ctypes.c_int,
             ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong), ctypes.c_int, ctypes.c_int],
        ),
        "tjDecodeYUVPlanes": (
            ctypes.c_int,
            [handle, planes, ints, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int],
        ),
    }
    for function, (restype, argtypes) in signatures.items():
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


_lib = _load()


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    subsampling: int
    colorspace: int


@contextmanager
def _handle(init: Callable[[], int | None]) -> Iterator[int]:
    # A c_void_p restype comes back as an int, or None for NULL.
    handle = init()
    if not handle:
        raise TurboJPEGError(_lib.tjGetErrorStr2(None).decode(errors="replace"))
    try:
        yield handle
    finally:
        _lib.tjDestroy(handle)


def _check(status: int, handle: int) -> None:
    if status != 0:
        raise TurboJPEGError(_lib.tjGetErrorStr2(handle).decode(errors="replace"))


def plane_size(component: int, width: int, height: int, subsampling: int) -> tuple[int, int]:
    """The size TurboJPEG gives plane `component` (0 = Y) of a width x height picture."""
    return _lib.tjPlaneWidth(component, width, subsampling), _lib.tjPlaneHeight(component, height, subsampling)


def _pointers(planes: Sequence[bytes | bytearray]) -> ctypes.Array:
    # from_buffer needs a writable buffer; bytes are only read, through a char pointer.
    addresses = [
        ctypes.addressof((ctypes.c_char * len(p)).from_buffer(p)) if isinstance(p, bytearray)
        else ctypes.cast(ctypes.c_char_p(p), ctypes.c_void_p).value
        for p in planes
    ]
    return (ctypes.c_void_p * len(planes))(*addresses)


def read_header(data: bytes) -> Header:
    width, height, subsampling, colorspace = (ctypes.c_int() for _ in range(4))
    with _handle(_lib.tjInitDecompress) as handle:
        _check(
            _lib.tjDecompressHeader3(handle, data, len(data), ctypes.byref(width), ctypes.byref(height),
                                     ctypes.byref(subsampling), ctypes.byref(colorspace)),
            handle,
        )
    return Header(width.value, height.value, subsampling.value, colorspace.value)


def scaled_size(header: Header, denominator: int) -> tuple[int, int]:
    """The picture's size decoded at 1/denominator (1, 2, 4 or 8), as libjpeg rounds it."""
    return -(-header.width // denominator), -(-header.height // denominator)


def decompress_to_planes(data: bytes, header: Header, denominator: int = 1) -> list[bytearray]:
    """The picture's Y, Cb and Cr planes at 1/denominator scale, each plane_size() of scaled_size().

    libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, so a smaller scale decodes less.
    """
    width, height = scaled_size(header, denominator)
    sizes = [plane_size(c, width, height, header.subsampling) for c in range(3)]
    planes = [bytearray(w * h) for w, h in sizes]
    with _handle(_lib.tjInitDecompress) as handle:
        _check(
            _lib.tjDecompressToYUVPlanes(handle, data, len(data), _pointers(planes), width, None, height, _DECODE_FLAGS),
            handle,
        )
    return planes


def _strides(strides: Sequence[int] | None) -> ctypes.Array | None:
    return None if strides is None else (ctypes.c_int * len(strides))(*strides)


def compress_planes(
    planes: Sequence[bytes | bytearray], width: int, height: int, subsampling: int, quality: int,
    strides: Sequence[int] | None = None,
) -> bytes:
    """A baseline JFIF JPEG of the planes, with no metadata at all.

    Each plane holds at least plane_size() rows of `strides` bytes (default: the plane's width).
    """
    out, size = ctypes.c_void_p(), ctypes.c_ulong(0)
    with _handle(_lib.tjInitCompress) as handle:
        _check(
            _lib.tjCompressFromYUVPlanes(handle, _pointers(planes), width, _strides(strides), height, subsampling,
                                         ctypes.byref(out), ctypes.byref(size), quality, _ENCODE_FLAGS),
            handle,
        )
    try:
        return ctypes.string_at(out, size.value)
    finally:
        _lib.tjFree(out)


def planes_to_rgbx(
    planes: Sequence[bytes | bytearray], width: int, height: int, subsampling: int, strides: Sequence[int] | None = None
) -> bytearray:
    """The planes (laid out as for compress_planes) colour-converted to packed RGBX rows, as a JPEG decoder would."""
    rgbx = bytearray(width * height * 4)
    target = (ctypes.c_char * len(rgbx)).from_buffer(rgbx)
    with _handle(_lib.tjInitDecompress) as handle:
        _check(
            _lib.tjDecodeYUVPlanes(handle, _pointers(planes), _strides(strides), subsampling, ctypes.addressof(target), width,
                                   0, height, _PIXEL_FORMAT_RGBX, 0),
            handle,
        )
    return rgbx
