"""Wide colour: Display P3 sources keep their gamut, tagged with a compact profile of our own.

Phones (iPhones since the 7) shoot in Display P3, whose reds and greens lie outside sRGB;
converting to sRGB clips them. A source whose profile is Display P3 keeps its pixels as
they are, and every variant carries DISPLAY_P3, an ICC v4 profile of a few hundred bytes
built here (P3 primaries, D65 white, the sRGB tone curve), instead of the source's
profile with its copyright, descriptions and whatever else a camera wrote in it.
Anything else is converted to sRGB and carries no profile (decode._to_srgb).

A PNG may describe its colours with gAMA and cHRM chunks instead of a profile, which browsers
honour (png.py): primaries other than sRGB's become a profile of those primaries with the gAMA's
curve (`matrix_profile`, `power_law_curve`), converted as an embedded one is; otherwise its levels
are taken to sRGB's tone curve (`srgb_tones`), and Display P3's primaries are kept, as are their
levels once in sRGB's curve.

A PNG's cICP chunk, or a HEIF's or AVIF's nclx box, names the colours by H.273 codes instead
(`coded_colours`, the one reading of them): primaries 1 (sRGB's), 9 (BT.2020's) or 12 (Display
P3's) with sRGB's tone curve (transfer 13) are those primaries' profile, Display P3's DISPLAY_P3;
BT.2020 with PQ (16) or HLG (18), the HDR of Chrome's and Android's screenshots, is a profile of
BT.2020 with a tone curve that shows it as an SDR screen does (`hdr_light`), converted as an
embedded one is; or, where that profile cannot convert the pixels as they are (a grey picture, or
one of more than 8 bits, of which lcms takes 8), its levels are first taken to sRGB's tone curve by
that light (`hdr_tones`), as a gAMA's are. Other codes are left unread, and the picture goes by what
else describes it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image, ImageCms

Chromaticity = tuple[float, float]
Primaries = tuple[Chromaticity, Chromaticity, Chromaticity]

_D50 = (0.9642, 1.0, 0.8249)
D65: Chromaticity = (0.3127, 0.3290)
SRGB_PRIMARIES: Primaries = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
_P3_PRIMARIES: Primaries = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
_BT2020_PRIMARIES: Primaries = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))
# The sRGB transfer function as an ICC parametric curve (type 3): g, a, b, c, d.
_SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
_BRADFORD = ((0.8951, 0.2664, -0.1614), (-0.7502, 1.7135, 0.0367), (0.0389, -0.0685, 1.0296))
# A profile counts as Display P3 when it maps this grid of colours to within this many
# levels of DISPLAY_P3.
_GRID_STEPS = (0, 64, 128, 192, 255)
_SAME_WITHIN_LEVELS = 2
# Profiles whose answers a worker keeps: a phone's uploads carry one or two.
_CACHED_PROFILES = 16

T = TypeVar("T")


def _matmul(a: tuple, b: tuple) -> tuple:
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)) for i in range(3))


def _inverse(m: tuple) -> tuple:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return (
        ((e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det),
        ((f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det),
        ((d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det),
    )


def _xyz(x: float, y: float) -> tuple[float, float, float]:
    return x / y, 1.0, (1 - x - y) / y


def _diagonal(values: tuple[float, ...]) -> tuple:
    return tuple(tuple(values[i] if i == j else 0.0 for j in range(3)) for i in range(3))


def _rgb_to_xyz(primaries: tuple, white: tuple[float, float, float]) -> tuple:
    columns = tuple(_xyz(*xy) for xy in primaries)
    m = tuple(tuple(columns[j][i] for j in range(3)) for i in range(3))
    scale = [sum(row[k] * w for k, w in enumerate(white)) for row in _inverse(m)]
    return _matmul(m, _diagonal(tuple(scale)))


def _adaptation(source: tuple[float, float, float], target: tuple[float, float, float]) -> tuple:
    """Bradford chromatic adaptation from one white to another, as ICC v4 wants it in 'chad'."""
    cone_source = [sum(_BRADFORD[i][k] * source[k] for k in range(3)) for i in range(3)]
    cone_target = [sum(_BRADFORD[i][k] * target[k] for k in range(3)) for i in range(3)]
    scale = _diagonal(tuple(t / s for t, s in zip(cone_target, cone_source, strict=True)))
    return _matmul(_inverse(_BRADFORD), _matmul(scale, _BRADFORD))


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: tuple[float, ...]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in xyz)


_SRGB_CURVE_TAG = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in _SRGB_CURVE)


def power_law_curve(exponent: float) -> bytes:
    """The tone curve tag (for matrix_profile) whose light is level ** exponent."""
    return b"para\0\0\0\0" + struct.pack(">HH", 0, 0) + _s15(exponent)


def _text_tag(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(encoded), 28) + encoded


def matrix_profile(primaries: Primaries, white: Chromaticity, description: str, curve: bytes = _SRGB_CURVE_TAG) -> bytes:
    """A compact ICC v4 profile of RGB with these red, green and blue primaries and this white
    (CIE xy), and this tone curve (a curv or para tag: sRGB's unless given). The white must lie
    inside the primaries' triangle."""
    chad = _adaptation(_xyz(*white), _D50)
    colorants = _matmul(chad, _rgb_to_xyz(primaries, _xyz(*white)))
    tags: list[tuple[bytes, bytes]] = [
        (b"desc", _text_tag(description)),
        (b"cprt", _text_tag("No copyright, use freely")),
        (b"wtpt", _xyz_tag(_D50)),
        (b"chad", b"sf32\0\0\0\0" + b"".join(_s15(v) for row in chad for v in row)),
        *((name, _xyz_tag(tuple(colorants[i][column] for i in range(3))))
          for column, name in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data, placed = [], b"", {}
    for signature, body in tags:
        if body not in placed:
            # The three tone curves share one copy.
            placed[body] = offset + len(data)
            data += body + bytes(-len(body) % 4)
        table.append(signature + struct.pack(">II", placed[body], len(body)))
    size = offset + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x04300000, b"mntr", b"RGB ", b"XYZ ")
        + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0) + b"".join(_s15(v) for v in _D50) + bytes(4 + 16 + 28)
    )
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


DISPLAY_P3 = matrix_profile(_P3_PRIMARIES, D65, "Display P3")
_DISPLAY_P3_PROFILE = ImageCms.ImageCmsProfile(io.BytesIO(DISPLAY_P3))
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _srgb_encoded(light: float) -> float:
    """The sRGB level (0 to 1) of a light (0 to 1): _SRGB_CURVE inverted, linear below the light
    its linear part ends at."""
    g, a, b, c, d = _SRGB_CURVE
    return light / c if light < c * d else (light ** (1 / g) - b) / a


def srgb_tones(light: Callable[[float], float], largest: int) -> tuple[int, ...]:
    """For each level, 0 to `largest` (255 of 8-bit samples, 65535 of 16-bit ones), of a tone curve
    whose light (0 to 1) is light(level / largest), the 8-bit level that shows the same light in
    sRGB's curve."""
    return tuple(round(255 * _srgb_encoded(light(level / largest))) for level in range(largest + 1))


# H.273's codes (ITU-T H.273, tables 2 and 3) of the primaries and tone curves read.
_H273_SRGB_CURVE = 13
_H273_PQ = 16
_H273_HLG = 18
_H273_BT2020 = 9

# HDR on an SDR screen, as BT.2408 has it: the reference white of PQ and HLG (203 cd/m2, HLG's 75%
# signal) is the SDR white, so the SDR content of an HDR screenshot keeps its levels; brighter
# highlights are clipped to it, channel by channel (a tone curve, as the video renditions' Hable
# from 100 cd/m2, would grey a screenshot's white: docs/video.md). Each curve is sampled into a
# profile's tone curve at this many points.
_REFERENCE_WHITE_NITS = 203.0
_HDR_CURVE_POINTS = 4096
_PQ_PEAK_NITS = 10_000.0
_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
# HLG's inverse OETF (BT.2100), and its OOTF on the 1000 cd/m2 display its reference white is set
# for, applied to each channel as to a grey's (the OOTF proper scales a colour by its luminance).
_HLG_A, _HLG_B, _HLG_C = 0.17883277, 0.28466892, 0.55991073
_HLG_PEAK_NITS = 1000.0
_HLG_SYSTEM_GAMMA = 1.2


def _pq_nits(level: float) -> float:
    power = level ** (1 / _PQ_M2)
    return _PQ_PEAK_NITS * (max(power - _PQ_C1, 0.0) / (_PQ_C2 - _PQ_C3 * power)) ** (1 / _PQ_M1)


def _hlg_nits(level: float) -> float:
    scene = level * level / 3 if level <= 0.5 else (math.exp((level - _HLG_C) / _HLG_A) + _HLG_B) / 12
    return _HLG_PEAK_NITS * scene**_HLG_SYSTEM_GAMMA


def hdr_light(level: float, transfer: int) -> float:
    """The light (0 to 1 of SDR white) a PQ or HLG level (0 to 1; H.273 transfer 16 or 18) shows on an SDR screen."""
    nits = _pq_nits(level) if transfer == _H273_PQ else _hlg_nits(level)
    return min(nits / _REFERENCE_WHITE_NITS, 1.0)


def _sampled_curve(transfer: int) -> bytes:
    samples = (hdr_light(i / (_HDR_CURVE_POINTS - 1), transfer) for i in range(_HDR_CURVE_POINTS))
    return b"curv\0\0\0\0" + struct.pack(f">I{_HDR_CURVE_POINTS}H", _HDR_CURVE_POINTS, *(round(65535 * v) for v in samples))


@functools.cache
def hdr_tones(transfer: int, largest: int) -> tuple[int, ...]:
    """For each PQ or HLG level (H.273 transfer 16 or 18), 0 to `largest`, the 8-bit level in sRGB's
    tone curve that shows its light on an SDR screen (see srgb_tones and hdr_light)."""
    # Kept: the 65,536 levels of 16-bit samples cost too much to work out again for every picture.
    return srgb_tones(functools.partial(hdr_light, transfer=transfer), largest)


@dataclass(frozen=True)
class CodedColours:
    """What H.273 codes say a picture's colours are: those of an ICC profile, None for sRGB's; or
    where their levels are PQ's or HLG's (`transfer`), once those are taken to sRGB's tone curve
    (see hdr_tones), those of `toned` (else `toned` is `profile`)."""

    profile: bytes | None
    toned: bytes | None
    transfer: int | None = None


_BT2020 = matrix_profile(_BT2020_PRIMARIES, D65, "BT.2020")
# The colours of each pair of codes read.
_H273_COLOURS = {
    (1, _H273_SRGB_CURVE): CodedColours(None, None),
    (12, _H273_SRGB_CURVE): CodedColours(DISPLAY_P3, DISPLAY_P3),
    (_H273_BT2020, _H273_SRGB_CURVE): CodedColours(_BT2020, _BT2020),
    **{
        (_H273_BT2020, transfer): CodedColours(matrix_profile(_BT2020_PRIMARIES, D65, name, _sampled_curve(transfer)), _BT2020, transfer)
        for transfer, name in ((_H273_PQ, "BT.2100 PQ"), (_H273_HLG, "BT.2100 HLG"))
    },
}


def coded_colours(primaries: int, transfer: int) -> CodedColours | None:
    """The colours H.273 primaries and transfer characteristics name (see the module's docstring);
    None for codes not read here."""
    return _H273_COLOURS.get((primaries, transfer))


def cached_by_digest(compute: Callable[[bytes], T]) -> Callable[[bytes], T]:
    """`compute` of an ICC profile, its answers for the last _CACHED_PROFILES profiles kept by
    their SHA-256. Not by the profiles themselves: nothing bounds a WebP's or a HEIF's profile but
    the upload's size, and a worker would hold the last ones, tens of megabytes each, against its
    memory budget for every later job."""
    answers: OrderedDict[bytes, T] = OrderedDict()

    @functools.wraps(compute)
    def cached(icc: bytes) -> T:
        digest = hashlib.sha256(icc).digest()
        if digest in answers:
            answers.move_to_end(digest)
            return answers[digest]
        answer = answers[digest] = compute(icc)
        if len(answers) > _CACHED_PROFILES:
            answers.popitem(last=False)
        return answer

    return cached


@cached_by_digest
def is_display_p3(icc: bytes) -> bool:
    """Whether pixels tagged with this RGB profile are Display P3 as they are (to within two levels)."""
    return _shows_as(icc, _DISPLAY_P3_PROFILE)


def is_srgb(icc: bytes) -> bool:
    """Whether pixels tagged with this RGB profile are sRGB as they are (to within two levels):
    what a profile does, not what it is called ("Linear sRGB" is not)."""
    return _shows_as(icc, SRGB_PROFILE)


def _shows_as(icc: bytes, target: ImageCms.ImageCmsProfile) -> bool:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(profile, target, "RGB", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False
    grid = bytes(v for r in _GRID_STEPS for g in _GRID_STEPS for b in _GRID_STEPS for v in (r, g, b))
    source = Image.frombytes("RGB", (len(grid) // 3, 1), grid)
    converted = transform.apply(source).tobytes()
    return max(abs(a - b) for a, b in zip(grid, converted, strict=True)) <= _SAME_WITHIN_LEVELS


def colour_space(icc: bytes) -> str | None:
    """The colour space of the pixels an ICC profile describes, as its header names it ("RGB",
    "GRAY", "CMYK", ...); None when lcms cannot read the profile."""
    try:
        return str(ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space).strip()
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def jpeg_icc_segment(icc: bytes) -> bytes:
    """An APP2 ICC_PROFILE segment holding the whole profile (one chunk: profiles under 64 KB)."""
    payload = b"ICC_PROFILE\0" + bytes((1, 1)) + icc
    return b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload
