"""The ways a still image becomes its variants, and the one place that picks between them.

LosslessJpeg    A YCbCr JPEG in sRGB that already fits the display's box and budget and
                is upright or turns upright exactly in the DCT domain: its display is the
                original's coefficients with optimised Huffman tables and no metadata (see
                lossless), the smaller variants come from the picture libjpeg decodes
                from the same coefficients at the smallest DCT scale that covers them,
                exactly the picture Pillow's draft decode gives.
PlanarJpeg      A YCbCr JPEG in sRGB whose variants its planes can all make: libjpeg-turbo
                decodes it to its YCbCr planes, turned upright in them, and the variants
                are encoded from them (see planar), never through RGB.
PillowPipeline  Everything else: Pillow decodes it (a JPEG at the smallest DCT scale that
                covers the largest variant), converts it to sRGB, turns it upright, and
                the variants are resized and encoded from that picture.

`choose` picks one and says why (the strategy's `reason`); with `jpeg_planes` off
(MEDIAVAULT_IMAGING_JPEG_PLANES=off) it always picks Pillow, with `lossless_display` off
(MEDIAVAULT_IMAGING_LOSSLESS_DISPLAY=off) never LosslessJpeg. The planes decoder stops at
anything libjpeg-turbo warns about, a truncated or damaged file among others; such a
JPEG goes through Pillow after all, which refuses it or decodes it as stock Pillow does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from PIL import Image

from mediavault.imaging import animation, colour, lossless, planar, turbojpeg
from mediavault.imaging.decode import (
    TRANSPOSE_FOR_ORIENTATION,
    Still,
    converts_colour,
    decode_with_pillow,
    exif_orientation,
    open_image,
    refused_if_corrupt,
    upright,
)
from mediavault.imaging.errors import CORRUPT_IMAGE, PermanentImagingError
from mediavault.imaging.metadata import photo_facts
from mediavault.imaging.planar import Planes
from mediavault.imaging.spec import Limits, VariantSpec, fit
from mediavault.imaging.variants import TranscodeResult, Variant, make_variants, make_variants_from_planes


class Strategy(Protocol):
    """One way from an opened still image to its variants."""

    name: ClassVar[str]

    @property
    def reason(self) -> str:
        """Why the strategy was chosen for this file."""
        ...

    def transcode(self, specs: Sequence[VariantSpec]) -> TranscodeResult: ...


@dataclass(frozen=True)
class PlanarJpeg:
    name: ClassVar[str] = "jpeg-planes"
    data: bytes
    header: turbojpeg.Header
    orientation: int
    reason: str

    def decode(self, specs: Sequence[VariantSpec]) -> Planes:
        """The upright planes at the size of the largest variant.

        Raises TurboJPEGError on anything libjpeg-turbo warns about.
        """
        width, height = self.upright_size()
        display = fit(width, height, max(spec.box for spec in specs))
        try:
            return planar.decode(self.data, self.header, TRANSPOSE_FOR_ORIENTATION.get(self.orientation), display)
        except (turbojpeg.TurboJPEGError, MemoryError):
            raise
        except Exception:
            # As on the Pillow path: whatever the input makes fail is the uploader's answer,
            # never a retry of the same bytes.
            raise PermanentImagingError(CORRUPT_IMAGE) from None

    def transcode(self, specs: Sequence[VariantSpec]) -> TranscodeResult:
        planes = self.decode(specs)
        width, height = self.upright_size()
        return TranscodeResult("image", width, height, make_variants_from_planes(planes, width, height, specs), self.name)

    def upright_size(self) -> tuple[int, int]:
        return upright(self.header.width, self.header.height, self.orientation)


@dataclass(frozen=True)
class LosslessJpeg:
    name: ClassVar[str] = "jpeg-lossless"
    header: turbojpeg.Header
    display: bytes
    # What the smaller variants are made from (lossless.display_and_picture); None when the
    # display is the only variant.
    picture: Image.Image | None
    reason: str

    def transcode(self, specs: Sequence[VariantSpec]) -> TranscodeResult:
        largest, *others = sorted(specs, key=lambda spec: spec.box, reverse=True)
        width, height = self.header.width, self.header.height
        display = Variant(largest.name, "image/jpeg", width, height, self.display)
        if self.picture is None:
            return TranscodeResult("image", width, height, [display], self.name)
        return TranscodeResult("image", width, height, [display, *make_variants(self.picture, width, height, others)], self.name)


@dataclass(frozen=True)
class PillowPipeline:
    name: ClassVar[str] = "pillow"
    image: Image.Image
    reason: str

    def decode(self, specs: Sequence[VariantSpec]) -> Still:
        return decode_with_pillow(self.image, specs)

    def transcode(self, specs: Sequence[VariantSpec]) -> TranscodeResult:
        still = self.decode(specs)
        return TranscodeResult(
            "image", still.width, still.height, make_variants(still.image, still.width, still.height, specs), self.name
        )


def choose(
    image: Image.Image, data: bytes, specs: Sequence[VariantSpec], jpeg_planes: bool = True, lossless_display: bool = True
) -> Strategy:
    """The strategy for an opened still image (decode.open_image), and why."""
    if not jpeg_planes:
        return PillowPipeline(image, "the JPEG planes are turned off")
    if image.format not in ("JPEG", "MPO"):
        return PillowPipeline(image, f"{image.format} is not a JPEG")
    icc = image.info.get("icc_profile")
    wide = bool(icc and colour.is_display_p3(icc))
    if icc and not wide and converts_colour(icc):
        return PillowPipeline(image, "its colours need converting to sRGB")
    try:
        header = turbojpeg.read_header(data)
    except turbojpeg.TurboJPEGError as exc:
        return PillowPipeline(image, f"libjpeg-turbo cannot read its header: {exc}")
    if (header.width, header.height) != image.size:
        return PillowPipeline(image, "libjpeg-turbo and Pillow disagree on its size")
    if not planar.readable(header):
        return PillowPipeline(image, "it is not three-component YCbCr with a common chroma subsampling")
    orientation = exif_orientation(image)
    display = max(specs, key=lambda spec: spec.box)
    if lossless_display and lossless.orients_exactly(header, orientation) and fit(header.width, header.height, display.box) == image.size:
        try:
            profile = colour.DISPLAY_P3 if wide else None
            others = [spec.box for spec in specs if spec is not display]
            picture = None
            if others:
                shown, picture = lossless.display_and_picture(data, header, display.max_bytes, max(others), profile, orientation)
            else:
                shown = lossless.display(data, header, display.max_bytes, profile, orientation)
            space = "Display P3" if wide else "sRGB"
            reason = (f"an upright YCbCr JPEG in {space} that fits the display" if orientation in (0, 1)
                      else f"a YCbCr JPEG in {space} that fits the display and flips upright exactly")
            return LosslessJpeg(header, shown, picture, reason)
        except lossless.NotLossless:
            # Not a JPEG every browser decodes as it is, or over the budget: re-encoded.
            pass
    if wide:
        # The planes encoder writes no profile.
        return PillowPipeline(image, "its Display P3 colours are kept")
    if not planar.covers(*image.size, specs):
        return PillowPipeline(image, "a variant needs more than half the largest one, which the planes cannot make")
    return PlanarJpeg(data, header, orientation, "a YCbCr JPEG in sRGB whose planes make every variant")


def transcode_image(
    data: bytes,
    mime: str,
    limits: Limits,
    specs: Sequence[VariantSpec],
    jpeg_planes: bool = True,
    lossless_display: bool = True,
) -> TranscodeResult:
    """Every spec of a still image of an allow-listed type, by the strategy `choose` picks."""
    image = open_image(data, mime, limits)
    strategy = choose(image, data, specs, jpeg_planes, lossless_display)
    try:
        result = strategy.transcode(specs)
    except turbojpeg.TurboJPEGError as exc:
        result = PillowPipeline(image, f"libjpeg-turbo warned: {exc}").transcode(specs)
    moving = None
    if animation.is_animated(image, data):
        with refused_if_corrupt():
            moving = animation.animate(_to_animate(image, data, mime, limits), data, limits.animation)
    # After the pixels: a JPEG's EXIF is read from its header, anything else's once loaded.
    return dataclasses.replace(result, photo=photo_facts(image), animation=moving)


def _to_animate(image: Image.Image, data: bytes, mime: str, limits: Limits) -> Image.Image:
    """The opened image whose frames animate draws, its first frame loaded where that reads its EXIF
    (see decode.exif). A GIF's is the stills' own: both draw its frames from its bytes (gif.shown),
    the first decoded once (decode.first_gif_picture). Any other is opened again: the stills' decode
    may keep the first one's pixels and replace its info (decode._to_srgb), where Pillow puts each
    frame's duration as it seeks."""
    if image.format == "GIF":
        return image
    frames = open_image(data, mime, limits)
    frames.load()
    return frames
