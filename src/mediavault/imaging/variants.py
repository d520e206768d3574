"""Pixels to encoded variants: largest first, each resized from the cheapest good source, within budget."""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from mediavault.imaging import formats
from mediavault.imaging.metadata import PhotoFacts
from mediavault.imaging.planar import Planes
from mediavault.imaging.spec import VariantSpec, fit

if TYPE_CHECKING:
    from mediavault.imaging.animation import Animation

# Above this many pixels in Pillow's intermediate (16 MB of RGBX), resize band by band.
_MAX_INTERMEDIATE_PIXELS = 4_000_000
_BAND_ROWS = 128


@dataclass(frozen=True)
class Variant:
    name: str
    content_type: str
    width: int
    height: int
    data: bytes
    # The same variant in other formats (formats.py), each without alternates of its own.
    alternates: tuple[Variant, ...] = ()


def bitrate(size_bytes: int, seconds: float) -> int:
    """The average bits per second of a playable file of size_bytes lasting seconds: at least 1,
    for a file of no duration too."""
    return max(1, math.floor(size_bytes * 8 / max(seconds, 0.001)))


@dataclass(frozen=True)
class TranscodeResult:
    """What an upload became. width x height is the original's upright size (for video, the frame's);
    `strategy` names the way its variants were made (the name of a strategies.Strategy);
    `photo` holds the facts of its EXIF kept as data (none for videos); `animation` the
    moving renditions of an animated image (None for anything else, or past the limits)."""

    kind: str
    width: int
    height: int
    variants: list[Variant]
    strategy: str
    # ThumbHash of the smallest variant (thumbhash.py); empty when there is none.
    thumbhash: bytes = b""
    photo: PhotoFacts = PhotoFacts()
    animation: Animation | None = None
    # A video's: the time of its poster frame in the file it came from (decode.Poster); None for images.
    poster_seconds: float | None = None


def make_variants(
    image: Image.Image,
    width: int,
    height: int,
    specs: Sequence[VariantSpec],
    requested: Mapping[str, Collection[str]] | None = None,
    primary_bytes: Mapping[str, int] | None = None,
) -> list[Variant]:
    """Every spec from one decoded picture; width x height is the original's upright size.

    The picture may be smaller than the original (JPEG draft decoding), never smaller
    than the largest variant, so sizes are computed from the original. Each variant comes
    with its spec's eager alternates, or with the formats `requested` for it by name, each
    smaller than the primary: the one made here, or the stored one `primary_bytes` names.
    """
    made = [image]
    variants = []
    for spec in sorted(specs, key=lambda s: s.box, reverse=True):
        size = fit(width, height, spec.box)
        # Downscaling from a picture at least twice the target loses nothing visible
        # and skips most of the pixels of the decoded original.
        source = next((p for p in reversed(made) if p.width >= 2 * size[0] and p.height >= 2 * size[1]), image)
        picture = source if source.size == size else _resize(source, size)
        made.append(picture)
        wanted = None if requested is None else requested.get(spec.name, ())
        primary = _encode(picture, spec)
        ceiling = len(primary.data) if primary_bytes is None else primary_bytes[spec.name]
        variants.append(_with_alternates(primary, picture, spec, wanted, ceiling))
    return variants


def _with_alternates(
    primary: Variant, picture: Image.Image, spec: VariantSpec, requested: Collection[str] | None, ceiling: int
) -> Variant:
    made = formats.alternates(picture, spec, primary.content_type, ceiling, requested)
    return replace(primary, alternates=tuple(Variant(spec.name, ct, *picture.size, data) for ct, data in made))


def _resize(source: Image.Image, size: tuple[int, int]) -> Image.Image:
    if size[0] * source.height <= _MAX_INTERMEDIATE_PIXELS:
        # reducing_gap=2 box-averages by an integer factor before Lanczos, as thumbnail()
        # does: 30% faster, SSIM above 0.998 against a full Lanczos on phone photos.
        return source.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    # Pillow resizes horizontally into an intermediate as tall as the source, then
    # vertically: for a 12 MP photo that is a third full-size copy alive at once. Band
    # by band it stays small; the filter still reads across band edges, so the result
    # is the same to within rounding. (Outputs this large downscale by less than 2x,
    # where reducing_gap would do nothing anyway.)
    picture = Image.new(source.mode, size)
    # A new image starts with no info: the source's colour profile goes along.
    picture.info = dict(source.info)
    scale = source.height / size[1]
    for top in range(0, size[1], _BAND_ROWS):
        bottom = min(size[1], top + _BAND_ROWS)
        box = (0, top * scale, source.width, bottom * scale)
        picture.paste(source.resize((size[0], bottom - top), Image.Resampling.LANCZOS, box=box), (0, top))
    return picture


def make_variants_from_planes(planes: Planes, width: int, height: int, specs: Sequence[VariantSpec]) -> list[Variant]:
    """Every spec from a JPEG's planes; width x height is the original's upright size.

    The planes make the largest spec at their own size and the others from their
    half-size picture, which is why only planes that planar.covers the specs come here.
    """
    largest, *others = sorted(specs, key=lambda spec: spec.box, reverse=True)
    return [_encode_planes(planes, largest), *make_variants(planes.half(), width, height, others)]


def _encode_planes(planes: Planes, spec: VariantSpec) -> Variant:
    for quality in _qualities(spec):
        data = planes.encode(quality)
        if len(data) <= spec.max_bytes:
            return Variant(spec.name, "image/jpeg", planes.width, planes.height, data)
    # Shrinking needs a resize, done in RGB; pictures this noisy are rare.
    return _shrunk(planes.to_rgb(), spec, len(data))


def _encode(picture: Image.Image, spec: VariantSpec) -> Variant:
    for quality in _qualities(spec):
        data = _save(picture, quality, spec.optimize)
        if len(data) <= spec.max_bytes:
            return _variant(spec, picture, data)
    return _shrunk(picture, spec, len(data))


def _qualities(spec: VariantSpec) -> Iterator[int]:
    """spec.quality, then lower by quality_step down to min_quality."""
    quality = spec.quality
    yield quality
    while quality > spec.min_quality:
        quality = max(spec.min_quality, quality - spec.quality_step)
        yield quality


def _shrunk(picture: Image.Image, spec: VariantSpec, size_at_floor: int) -> Variant:
    # Still too big at the quality floor: bytes grow roughly with pixel count, so
    # shrink by the square root of the overshoot, a little more to converge quickly.
    size = size_at_floor
    while True:
        scale = min(0.9, math.sqrt(spec.max_bytes / size) * 0.95)
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.LANCZOS
        )
        data = _save(picture, spec.min_quality, spec.optimize)
        if len(data) <= spec.max_bytes:
            return _variant(spec, picture, data)
        size = len(data)


def _variant(spec: VariantSpec, picture: Image.Image, data: bytes) -> Variant:
    content_type = "image/webp" if _has_alpha(picture) else "image/jpeg"
    return Variant(spec.name, content_type, picture.width, picture.height, data)


def _has_alpha(picture: Image.Image) -> bool:
    # Only WebP of the web's formats has both lossy compression (so a byte budget can
    # be met) and an alpha channel.
    return picture.mode == "RGBA"


def _save(picture: Image.Image, quality: int, optimize: bool) -> bytes:
    buffer = io.BytesIO()
    # Set on wide-colour pictures only (decode._to_srgb); sRGB goes untagged.
    icc = picture.info.get("icc_profile")
    if _has_alpha(picture):
        picture.save(buffer, "WEBP", quality=quality, icc_profile=icc)
    else:
        picture.save(buffer, "JPEG", quality=quality, optimize=optimize, subsampling="4:2:0", icc_profile=icc)
    return buffer.getvalue()
