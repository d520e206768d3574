"""Untrusted bytes to pictures: allow-listed decoders, bounds checked from headers first."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import pillow_avif  # noqa: F401  registers the AVIF opener (libavif); Pillow-SIMD is built without one
import pillow_heif
from PIL import Image, ImageChops, ImageCms, ImageFile, ImageMath

from mediavault.domain import content_types
from mediavault.imaging import canvas, gif, isobmff, lossless, png
from mediavault.imaging.colour import (
    DISPLAY_P3,
    SRGB_PROFILE,
    CodedColours,
    cached_by_digest,
    coded_colours,
    colour_space,
    hdr_tones,
    is_display_p3,
    is_srgb,
    matrix_profile,
    power_law_curve,
)
from mediavault.imaging.errors import (
    CORRUPT_IMAGE,
    CORRUPT_VIDEO,
    IMAGE_TOO_LARGE,
    UNSUPPORTED_FORMAT,
    VIDEO_TOO_LARGE,
    ImagingError,
    PermanentImagingError,
)
from mediavault.imaging.spec import Limits, VariantSpec, fit

# Embedded HEIF thumbnails could differ from the image they claim to preview, and depth
# or auxiliary images are never shown: decode only the primary image. One decoder
# thread per worker, since the pool already runs one worker per core.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)

# The only Pillow plugin each sniffed type may reach. Anything else Pillow can open
# (EPS runs Ghostscript, PSD, TIFF, ...) is never tried.
_PIL_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/heif": "HEIF",
    "image/avif": "AVIF",
}
# FFmpeg is told which demuxer to use, so it never probes its way into playlists
# (HLS, concat) that would open other files or URLs.
_DEMUXERS = {"video/mp4": "mp4", "video/quicktime": "mov", "video/webm": "matroska"}
# Decoder names as FFmpeg reports them; PyAV's FFmpeg decodes AV1 with libdav1d.
_VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "libdav1d"})
_ROTATIONS = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270,
              180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}

_EXIF_ORIENTATION = 0x0112
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass
class Still:
    """A picture to make variants from, and the upright size of the original it came from."""

    image: Image.Image
    width: int
    height: int


def sniff(data: bytes, declared: str) -> str:
    """The allow-listed type the bytes really are, which must also be the family declared."""
    declared = content_types.normalize(declared)
    sniffed = content_types.sniff(data[: content_types.SNIFF_BYTES])
    if sniffed is None or declared not in content_types.ALLOWED_TYPES or not content_types.matches(declared, sniffed):
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    return sniffed


def open_image(data: bytes, mime: str, limits: Limits) -> Image.Image:
    """The bytes opened by the one Pillow plugin their type allows: header read and checked, no pixel decoded."""
    # Pillow checks this in open(), from the header, before any pixel is decoded. It is
    # a global, but a pool worker runs one job at a time.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    # Another global, which anything imported into the process may have turned on: it
    # makes Pillow (and pillow-heif) hand out what it decoded of a truncated or corrupt
    # file, grey or black where the data ended, instead of raising.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if mime == "image/jpeg" and lossless.more_scans_than(data, limits.max_jpeg_scans):
        raise PermanentImagingError(IMAGE_TOO_LARGE)
    if mime in ("image/heif", "image/avif") and (
        isobmff.runs_past_the_end(data)
        or not isobmff.av1_frames_match_their_declared_sizes(data, limits.animation.max_frames)
    ):
        # What the decoders would take and decode wrongly (see isobmff).
        raise PermanentImagingError(CORRUPT_IMAGE)
    if mime == "image/gif":
        try:
            data = gif.openable(data)
        except gif.TooCostlyToOpen:
            raise PermanentImagingError(IMAGE_TOO_LARGE) from None
    with refused_if_corrupt():
        with warnings.catch_warnings():
            # Pillow only warns between one and two times MAX_IMAGE_PIXELS; refuse those as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[mime]])
        width, height = image.size
        if width * height > limits.max_pixels:
            raise PermanentImagingError(IMAGE_TOO_LARGE)
    if mime == "image/avif":
        _describe_avif(image, isobmff.primary_image(data))
    if mime in ("image/heif", "image/avif"):
        _describe_coded(image, data)
    if mime == "image/png":
        _describe_png(image, data)
    if mime == "image/gif":
        image.info[_GIF_BYTES] = data
    return image


def _describe_avif(image: Image.Image, primary: isobmff.PrimaryImage) -> None:
    """What Pillow's AVIF plugin leaves out of the image's info: its nclx colours, under
    pillow-heif's name for them (see _coded_colours), and its clean aperture (see
    clean_aperture). Only for the primary item's picture: an image sequence's frames may be
    another size."""
    if image.size != primary.size:
        return
    if primary.nclx is not None and "icc_profile" not in image.info:
        image.info["nclx_profile"] = {"color_primaries": primary.nclx[0], "transfer_characteristics": primary.nclx[1]}
    if primary.clean_aperture is not None:
        image.info[_CLEAN_APERTURE] = primary.clean_aperture


# Where open_image leaves an AVIF's clean aperture for decode_with_pillow.
_CLEAN_APERTURE = "mediavault_clean_aperture"
# Where open_image leaves a 16-bit RGB PNG's transparent colour for transparent_colour.
_TRANSPARENT_COLOUR = "mediavault_transparent_colour"
# Where open_image leaves an 8-bit PNG's levels in sRGB's tone curve (see _describe_png).
_SRGB_TONES = "mediavault_srgb_tones"
# Where open_image leaves a GIF's bytes, from which decode_with_pillow draws its still (see _first_gif_frame).
_GIF_BYTES = "mediavault_gif_bytes"
# Where decode_with_pillow leaves the own picture of a GIF's first frame (see first_gif_picture).
_GIF_FIRST_PICTURE = "mediavault_gif_first_picture"
# Where open_image leaves the bytes of an APNG whose default image is left out of its animation, from
# which decode_with_pillow draws its still (see _first_apng_frame).
_APNG_BYTES = "mediavault_apng_bytes"
# Where open_image leaves the profile a PNG's colours are in, or those a HEIF's or AVIF's nclx box
# names (see icc_profile).
_PROFILE = "mediavault_profile"
# Where open_image leaves a 16-bit PNG's levels in sRGB's tone curve, of all 16 bits (see _describe_png).
_SIXTEEN_BIT_TONES = "mediavault_sixteen_bit_tones"
_LARGEST_8_BIT = 255
_LARGEST_16_BIT = 65535
# For each colour type of 16-bit PNG that Pillow opens in 8-bit bands (RGB; grey with alpha, opened
# as RGBA; RGBA), the raw mode that decodes its pixels again to bands of their samples' low bytes,
# and which of those bands holds the low byte of each colour band: a grey sample's bytes, unpacked
# as RGBA, are its red and green.
_LOW_BYTES = {2: ("RGB;16L", (0, 1, 2)), 4: ("RGBA", (1, 1, 1)), 6: ("RGBA;16L", (0, 1, 2))}


@dataclass(frozen=True)
class _SixteenBitTones:
    """For each 16-bit sample of a 16-bit PNG, or of a HEIF of more than 8 bits, the 8-bit level in
    sRGB's tone curve that shows the light its cICP, gAMA or nclx box gives it; and what decodes the
    colour samples of its picture again, given the 8-bit RGB or RGBA picture Pillow decoded of it,
    band by band, 16-bit ("I")."""

    samples: Callable[[Image.Image], Iterator[Image.Image]]
    levels: tuple[int, ...]


def clean_aperture(image: Image.Image) -> Image.Image:
    """The loaded image cropped to the clean aperture its file declares (libavif reads the
    box but leaves the crop to its caller), or the image itself."""
    box = image.info.get(_CLEAN_APERTURE)
    return image if box is None else image.crop(box)


def _describe_png(image: Image.Image, data: bytes) -> None:
    """What Pillow's PNG plugin gets wrong or leaves out (see png): a 16-bit RGB PNG's transparent
    colour, left for transparent_colour with the PNG's bytes, from which it decodes the samples'
    low bytes; a grey PNG of 1, 2 or 4 bits' transparent level, scaled as its pixels are; and the
    colours its chunks describe, as browsers read them (see _png_colours): the levels in sRGB's tone
    curve of its own (for the stills of a 16-bit PNG, of its 16-bit levels, with its bytes: see
    _sixteen_bits_in_srgb_tones; its animation's frames are toned as apng_shown decodes them) and
    the profile the stills and the animation convert from (or keep) after them (see icc_profile)."""
    chunks = png.read(data)
    colour = chunks.transparent_colour
    if colour is not None and image.mode == "RGB":
        # Pillow's 16-bit samples of the colour: convert() would match their low bytes against
        # the pixels' top bytes.
        image.info.pop("transparency", None)
        image.info[_TRANSPARENT_COLOUR] = (colour, data)
    grey = chunks.transparent_grey
    if grey is not None:
        image.info["transparency"] = grey
    profile, tone_levels = _png_colours(chunks)
    if tone_levels is not None and chunks.bit_depth != 16:
        image.info[_SRGB_TONES] = tone_levels(_LARGEST_8_BIT)
    elif tone_levels is not None and not first_frame(image):
        # The picture the stills show is the IDAT's, whose bytes decode_with_pillow decodes again; an
        # APNG's frames are toned as apng_shown decodes them.
        image.info[_SIXTEEN_BIT_TONES] = _SixteenBitTones(
            functools.partial(_png_samples, data, chunks.colour_type), tone_levels(_LARGEST_16_BIT)
        )
    image.info[_PROFILE] = profile
    if first_frame(image):
        image.info[_APNG_BYTES] = data


def _png_colours(chunks: png.Chunks) -> tuple[bytes | None, Callable[[int], tuple[int, ...]] | None]:
    """The profile a PNG's colours are in, None for sRGB, and, where its cICP or gAMA gives its levels
    another tone curve that is not in that profile, what takes them to sRGB's curve first: for the
    largest level (255 or 65535), the 8-bit level in sRGB's curve of each. Its cICP comes before all
    else (read as a HEIF's or AVIF's nclx box: see _coded_colours), then its first iCCP before its
    pixels, then its gAMA and cHRM (a profile of those primaries)."""
    coded = chunks.coded_colours
    if coded is not None:
        return _coded_tones(coded, chunks.in_colour, chunks.bit_depth == 16)
    # Not Pillow's info["icc_profile"]: of two iCCP chunks it keeps the last, and it reads an iCCP
    # after the pixels, which libpng (and so browsers) ignores, as it loads them.
    profile = chunks.profile
    if profile is not None and colour_space(profile) == ("RGB" if chunks.in_colour else "GRAY"):
        return profile, None
    # No profile, or one lcms cannot read, or of other colours than the pixels': libpng drops it,
    # and browsers go by the gAMA and cHRM.
    colours = chunks.colours
    if colours is None:
        return None, None
    if colours.primaries is None:
        return None, colours.tones
    in_srgb_curve = matrix_profile(colours.primaries, colours.white, "PNG cHRM")
    if chunks.bit_depth == 16 or is_display_p3(in_srgb_curve):
        # lcms would take the top 8 bits of each sample: toned from all 16 first. Display P3's
        # primaries are kept, and a variant's profile has sRGB's curve.
        return in_srgb_curve, colours.tones
    # Their own curve, not levels taken to sRGB's in 8 bits before the primaries are converted:
    # saturated colours at the edge of a wider gamut than sRGB's came out up to 14 levels off.
    return matrix_profile(colours.primaries, colours.white, "PNG cHRM", power_law_curve(colours.exponent)), None


def _coded_tones(
    coded: CodedColours, in_colour: bool, deep: bool
) -> tuple[bytes | None, Callable[[int], tuple[int, ...]] | None]:
    """The profile a picture whose H.273 codes name `coded` is in, as _png_colours answers: and where
    its levels are PQ's or HLG's and that profile cannot convert them as they are, what takes them
    to sRGB's tone curve first: a grey picture's, and one's of more than 8 bits a sample (`deep`)."""
    hdr = None if coded.transfer is None else functools.partial(hdr_tones, coded.transfer)
    if not in_colour:
        # No RGB profile converts grey levels; they are the white, whatever the primaries.
        return None, hdr
    if deep:
        # lcms would take the top 8 bits of each sample: toned from all of them first.
        return coded.toned, hdr
    return coded.profile, None


def _describe_coded(image: Image.Image, data: bytes) -> None:
    """The colours a HEIF's or AVIF's nclx box names (see _coded_colours), read as a PNG's cICP is
    (see _coded_tones): the profile they are in (see icc_profile) and, for a grey picture in PQ or
    HLG, its levels in sRGB's tone curve (see tones), and for a HEIF of more than 8 bits in PQ or
    HLG, those of its samples, with its bytes (see _sixteen_bits_in_srgb_tones). An embedded ICC
    profile comes before them."""
    coded = None if image.info.get("icc_profile") else _coded_colours(image.info)
    if coded is None:
        return
    # pillow-heif's; the AVIF plugin decodes 8 bits of any AVIF, and says nothing of how many it had.
    bit_depth = image.info.get("bit_depth", 8)
    profile, tone_levels = _coded_tones(coded, image.mode in ("RGB", "RGBA"), deep=bit_depth > 8)
    image.info[_PROFILE] = profile
    if tone_levels is None:
        return
    if bit_depth > 8:
        # pillow-heif shifts the levels to the top of 16-bit samples: each sample's tone is its level's.
        levels = tuple(tone for tone in tone_levels((1 << bit_depth) - 1) for _ in range(1 << (16 - bit_depth)))
        image.info[_SIXTEEN_BIT_TONES] = _SixteenBitTones(functools.partial(_heif_samples, data), levels)
    else:
        image.info[_SRGB_TONES] = tone_levels(_LARGEST_8_BIT)


def icc_profile(image: Image.Image) -> bytes | None:
    """The ICC profile the opened image's colours are in, None for sRGB, once its levels are in
    sRGB's tone curve (see tones): a PNG's, of its cICP, its first iCCP before its pixels, or its
    cHRM (see _png_colours), never a later iCCP that Pillow reads into its info (a second one, or
    one after the pixels); any other image's embedded profile, or else that of its nclx box's
    colours (see _describe_coded)."""
    if _PROFILE in image.info:
        return image.info[_PROFILE]
    return image.info.get("icc_profile") or None


def _coded_colours(info: dict) -> CodedColours | None:
    """The colours an image's H.273 codes name (colour.coded_colours): a HEIF's or AVIF's nclx box
    (libheif's encoders write one instead of an ICC profile; see _describe_avif), under
    pillow-heif's name for it."""
    nclx = info.get("nclx_profile") or {}
    primaries, transfer = nclx.get("color_primaries"), nclx.get("transfer_characteristics")
    return None if primaries is None or transfer is None else coded_colours(primaries, transfer)


def transparent_colour(image: Image.Image) -> Image.Image:
    """The loaded picture of an opened PNG with its transparent 16-bit colour (see _describe_png)
    made transparent, as RGBA, each sample compared whole: its top byte in the picture, its low byte
    in the PNG decoded again (an APNG's frames are each a PNG of its own: see apng_shown). Any other
    image as it is."""
    described = image.info.get(_TRANSPARENT_COLOUR)
    if described is None:
        return image
    colour, data = described
    low_bytes = _decoded_again(data, "RGB;16L")
    alpha = ImageChops.lighter(
        _opaque_but(image, tuple(sample >> 8 for sample in colour)),
        _opaque_but(low_bytes, tuple(sample & 0xFF for sample in colour)),
    )
    rgba = image.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


def _sixteen_bits_in_srgb_tones(image: Image.Image) -> Image.Image:
    """The loaded still of a 16-bit PNG whose cICP or gAMA gives another tone curve (see
    _describe_png), or of a HEIF of more than 8 bits whose nclx box names PQ or HLG (see
    _describe_coded), with its colour levels taken to sRGB's curve from all the bits of each sample
    (see _toned_from_sixteen_bits), without the tones in its info. Any other image as it is."""
    sixteen = image.info.get(_SIXTEEN_BIT_TONES)
    if sixteen is None:
        return image
    toned = _toned_from_sixteen_bits(image, sixteen)
    toned.info = {key: value for key, value in image.info.items() if key != _SIXTEEN_BIT_TONES}
    return toned


def _toned_from_sixteen_bits(image: Image.Image, sixteen: _SixteenBitTones) -> Image.Image:
    """The loaded picture of the PNG or HEIF whose samples `sixteen` decodes, in 8 bits, its colour
    levels taken to sRGB's tone curve from all the bits of each sample: from the top 8 bits, where
    Pillow leaves them, the 256 darkest levels of a linear PNG, 0 to 13 in sRGB's curve, were all
    black, and a PQ gradient near its reference white showed in bands 3 to 5 levels apart."""
    if image.mode in ("I;16", "I"):
        return eight_bit(image, sixteen.levels)
    colours = [samples.point(sixteen.levels, "L") for samples in sixteen.samples(image)]
    # The alpha, if any, keeps its top 8 bits.
    return Image.merge(image.mode, [*colours, *image.split()[len(colours) :]])


def _png_samples(data: bytes, colour_type: int, picture: Image.Image) -> Iterator[Image.Image]:
    """The colour samples of the 16-bit PNG of `data` (see _SixteenBitTones): their top bytes in
    the picture Pillow decoded, their low bytes in the PNG decoded again."""
    raw_mode, low_bands = _LOW_BYTES[colour_type]
    tops, lows = picture.split(), _decoded_again(data, raw_mode).split()
    return (_samples(tops[band], lows[low]) for band, low in enumerate(low_bands))


def _heif_samples(data: bytes, picture: Image.Image) -> Iterator[Image.Image]:
    """The colour samples of the primary image of the HEIF of `data` (see _SixteenBitTones), which
    pillow-heif decodes again without taking them to 8 bits as its Pillow plugin does: 16-bit,
    little-endian, the levels of 10 or 12 bits shifted to the top."""
    heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
    # Each of Pillow's raw modes keeps one byte of a 16-bit sample, the top one of the byte order it
    # names: of little-endian samples, "16L" keeps the top byte, "16B" the low one.
    tops, lows = (
        Image.frombytes(picture.mode, heif.size, heif.data, "raw", (f"{picture.mode};16{order}", heif.stride)).split()
        for order in "LB"
    )
    return (_samples(tops[band], lows[band]) for band in range(3))


def _samples(top_bytes: Image.Image, low_bytes: Image.Image) -> Image.Image:
    """The 16-bit samples ("I") whose top and low bytes are these two bands'."""
    # Side by side, each sample's two bytes are the sample as a PNG holds it, big-endian.
    return Image.frombytes("I", top_bytes.size, Image.merge("LA", (top_bytes, low_bytes)).tobytes(), "raw", "I;16B")


def _decoded_again(data: bytes, raw_mode: str) -> Image.Image:
    """The PNG opened again, to be decoded with each pixel's bytes unpacked by `raw_mode`: the zip
    decoder still undoes the filters over whole pixels, so it must take as many bytes a pixel as
    the PNG's do ("RGB;16L" unpacks the second, low byte of each big-endian 16-bit sample)."""
    picture = Image.open(io.BytesIO(data), formats=["PNG"])
    picture.tile = [tile._replace(args=raw_mode) for tile in picture.tile]
    return picture


def _opaque_but(picture: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """An alpha channel for the RGB picture: 0 where its pixel is `colour`, 255 elsewhere."""
    # Each sample 0 where it matches, 255 where not; their sum, clipped, is 0 only where all three match.
    unmatched = picture.point([0 if level == value else 255 for value in colour for level in range(256)])
    return unmatched.convert("L", (1, 1, 1, 0))


def decode_with_pillow(image: Image.Image, specs: Sequence[VariantSpec]) -> Still:
    """The opened image decoded by Pillow, in sRGB (or Display P3, see colour) and upright: its
    first frame a browser shows (first_frame).

    A JPEG is decoded at the smallest of libjpeg's scales that still covers the largest
    variant; libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, far less to decode.
    """
    width, height = image.size
    with refused_if_corrupt():
        if image.format in ("JPEG", "MPO"):
            image.draft(None, fit(width, height, max(spec.box for spec in specs)))
        # Drawn from the GIF's bytes, not from Pillow's picture, which is left undecoded: a GIF's
        # blocks, XMP among them, are read as it is opened.
        shown = _first_gif_frame(image)
        if shown is None:
            if first := first_frame(image):
                image.seek(first)
            image.load()
            cropped = clean_aperture(image)
            if cropped is not image:
                width, height = cropped.size
            shown = _first_apng_frame(image) or transparent_colour(cropped)
        orientation = exif_orientation(image)
        # Converting is where Pillow first checks some chunks against each other (a PNG's
        # tRNS longer than its palette), so what it raises is the decoder's answer too.
        picture = _to_srgb(_sixteen_bits_in_srgb_tones(shown))
        if orientation in TRANSPOSE_FOR_ORIENTATION:
            picture = picture.transpose(TRANSPOSE_FOR_ORIENTATION[orientation])
    return Still(picture, *upright(width, height, orientation))


def _first_gif_frame(image: Image.Image) -> Image.Image | None:
    """The loaded GIF's first frame as browsers draw it and its animation shows it (see gif), RGBA,
    with the image's info: where that frame leaves the screen uncovered, Pillow shows the screen in
    colour 0 of the palette, browsers transparent. None for any other image, and for a GIF that
    gif.read does not read so far as Pillow draws it."""
    data = image.info.get(_GIF_BYTES)
    if data is None:
        return None
    blocks = gif.read(data, 1)
    if blocks is None or not blocks.frames:
        return None
    own = gif.own_picture(data, blocks, blocks.frames[0])
    picture, _ = next(gif.shown(data, blocks, own))
    # Its transparency is its alpha.
    picture.info = {key: value for key, value in image.info.items() if key != "transparency"}
    image.info[_GIF_FIRST_PICTURE] = own
    return picture


def first_gif_picture(image: Image.Image) -> Image.Image | None:
    """The own picture of the opened GIF's first frame (gif.own_picture) once decode_with_pillow has
    decoded it for its stills, for its animation to draw it again undecoded (gif.shown's first);
    None before that, and for any other image."""
    return image.info.get(_GIF_FIRST_PICTURE)


def _first_apng_frame(image: Image.Image) -> Image.Image | None:
    """The first frame of an APNG whose default image is left out of its animation, as browsers draw
    it and its animation shows it (see apng_shown), RGBA, with the image's info, its transparency
    being its alpha: Pillow draws it over the default image, browsers over a clear canvas. None for
    any other image: the first frame of an APNG whose default image is that frame is that image,
    which Pillow decodes as browsers do (and the stills of a 16-bit one from all 16 bits)."""
    data = image.info.get(_APNG_BYTES)
    if data is None:
        return None
    picture, _ = next(apng_shown(data, 1))
    picture.info = {key: value for key, value in image.info.items() if key not in ("transparency", _TRANSPARENT_COLOUR)}
    return picture


def apng_shown(data: bytes, most: int) -> Iterator[tuple[Image.Image, int]]:
    """The first `most` frames of the APNG Pillow opened of `data`, as browsers draw them (see canvas:
    dispose_op NONE, BACKGROUND and PREVIOUS keep, clear and put back a frame's area; blend_op SOURCE
    replaces the canvas's pixels, OVER draws over them), RGBA, each with its delay in milliseconds.
    Each frame's own pixels are decoded as a PNG of their own, and made transparent as a still's are
    (a tRNS colour, of 16 bits or a grey level of few): Pillow draws each frame over the last
    itself, ignoring the tRNS of grey and 16-bit frames there, and clears a frame disposed of to
    the background to opaque black (a palette's colour 0). Raises ValueError where Pillow's reader
    refuses the frames (see png.apng). The picture is the one the next frame is drawn on: use it
    before asking for the next."""
    animation = png.apng(data, most)
    chunks = png.read(data)
    _, tone_levels = _png_colours(chunks)
    # A 16-bit APNG's frames are toned as they are taken to 8 bits (see tones).
    levels = tone_levels(_LARGEST_16_BIT) if tone_levels is not None and chunks.bit_depth == 16 else None
    placed = ((_apng_placement(frame), _own_apng_pixels(data, animation, frame, levels)) for frame in animation.frames)
    return canvas.drawn(animation.size, placed)


# APNG's dispose_op and blend_op values (the APNG spec's fcTL).
_APNG_DISPOSALS = {0: canvas.Disposal.KEEP, 1: canvas.Disposal.CLEAR, 2: canvas.Disposal.PUT_BACK}
_APNG_BLEND_SOURCE = 0


def _apng_placement(frame: png.ApngFrame) -> canvas.Placement:
    disposal = _APNG_DISPOSALS.get(frame.dispose_op)
    if disposal is None or frame.blend_op > 1:
        raise ValueError("APNG contains an unknown dispose_op or blend_op")
    return canvas.Placement(frame.box, disposal, frame.blend_op == _APNG_BLEND_SOURCE, frame.delay_ms)


def _own_apng_pixels(data: bytes, animation: png.Apng, frame: png.ApngFrame, levels: tuple[int, ...] | None) -> Image.Image:
    """The frame's own pixels, RGBA, a 16-bit frame's in 8 bits: through `levels`, the 16-bit tones of
    the APNG's tone curve, where it has one, else their top 8 bits."""
    alone = animation.alone(data, frame)
    picture = Image.open(io.BytesIO(alone), formats=["PNG"])
    picture.load()
    _describe_png(picture, alone)
    shown = transparent_colour(picture)
    if levels is not None:
        samples = functools.partial(_png_samples, alone, png.read(alone).colour_type)
        shown = _toned_from_sixteen_bits(shown, _SixteenBitTones(samples, levels))
    return eight_bit(shown).convert("RGBA")


def first_frame(image: Image.Image) -> int:
    """The index of the first frame a browser shows of an opened image: 1 for an animated PNG whose
    default image (its IDAT) is not part of the animation, a picture for decoders that do not
    animate, which Pillow counts as frame 0 and APNG decoders never show; else 0.

    Pillow draws frame 1 over the default image, a browser over a clear canvas: the two differ
    only where that frame leaves the canvas uncovered or is not opaque."""
    return 1 if image.format == "PNG" and getattr(image, "default_image", False) else 0


# Faults of the machine, not of the file (scratch space full, descriptors or memory out): the
# decoders' own errors carry no errno.
_MACHINE_FAULTS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS, errno.EACCES}
)


@contextlib.contextmanager
def refused_if_corrupt() -> Iterator[None]:
    """Whatever a decoder raises on malformed input, as the PermanentImagingError the uploader sees;
    a fault of the machine (the animations' scratch files) as an ImagingError, tried again."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PermanentImagingError(IMAGE_TOO_LARGE) from None
    except (PermanentImagingError, MemoryError):
        raise
    except OSError as exc:
        if exc.errno in _MACHINE_FAULTS:
            raise ImagingError("processing failed") from exc
        raise PermanentImagingError(CORRUPT_IMAGE) from None
    except Exception:
        # OSError, SyntaxError, ValueError, struct.error, EOFError, ... all mean the same
        # thing to the uploader.
        raise PermanentImagingError(CORRUPT_IMAGE) from None


def converts_colour(icc: bytes) -> bool:
    """Whether pixels tagged with this ICC profile need converting to be sRGB."""
    return srgb_conversion(icc) is not None


@dataclass(frozen=True)
class SrgbConversion:
    """lcms's transforms of RGB and of RGBA pictures tagged with one profile to sRGB, their alpha kept."""

    transforms: dict[str, ImageCms.ImageCmsTransform]

    def apply(self, picture: Image.Image) -> Image.Image:
        return self.transforms[picture.mode].apply(picture)


def srgb_conversion(icc: bytes) -> SrgbConversion | None:
    """What takes RGB pixels tagged with this ICC profile to sRGB (Display P3's included, which
    the stills keep: see _to_srgb); None when they are sRGB already."""
    try:
        return _srgb_conversion(icc)
    except (ImageCms.PyCMSError, OSError, ValueError):
        # _apply_profile ignores a broken profile too.
        return None


def upright(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The size of a width x height picture once its EXIF orientation is applied."""
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


# JPEG holds its EXIF in one segment of at most 64 KiB; a PNG's eXIf chunk and the EXIF of a
# WebP or HEIF have no bound, and Pillow's reader copies a tag's data once for every tag that
# points at it: 2,000 tags at one 1 MB blob, a 1 MB file, cost 2 GB. A larger block is dropped
# unread, as an unreadable one is.
MAX_EXIF_BYTES = 64 * 1024


def exif(image: Image.Image) -> Image.Exif:
    """The image's EXIF, empty when its block is larger than MAX_EXIF_BYTES.

    Only for a loaded image, a JPEG or a GIF (whose blocks before its first image Pillow reads as
    it opens it): a PNG's eXIf chunk may follow its pixels, so
    getexif() loads it, and a load error swallowed by a caller would leave the half-decoded
    pixels behind for a later load() to accept as the whole picture.
    """
    raw = image.info.get("exif") or b""
    # PNG's older text form, hex digits (two a byte) with a header.
    legacy = image.info.get("Raw profile type exif") or ""
    if len(raw) > MAX_EXIF_BYTES or len(legacy) > 2 * MAX_EXIF_BYTES + 64:
        return Image.Exif()
    return image.getexif()


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 (upright) when there is none or it cannot be read (see exif)."""
    try:
        return int(exif(image).get(_EXIF_ORIENTATION, 1))
    except Exception:
        # An unreadable EXIF block is metadata we drop anyway; the pixels are still good.
        return 1


def _to_srgb(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image has any transparency, with colours in sRGB; or, for a
    Display P3 source, its own colours with info["icc_profile"] = colour.DISPLAY_P3, which
    the resized and turned copies inherit and the encoders embed."""
    alpha = None
    image = eight_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:
            alpha = None
        # Grey stays grey until its profile, a grey one, is applied (_apply_profile); the
        # alpha goes back on after.
        image = image.convert("L") if image.mode in ("L", "LA") else rgba
    elif image.mode == "P":
        # A palette's colours are RGB, what its profile describes: _apply_profile and the
        # Display P3 check take RGB.
        image = image.convert("RGB")
    # After the transparent levels are matched, before the profile, whose tone curve is sRGB's.
    image = in_srgb_tones(image, tones(image))
    icc = icc_profile(image)
    wide = icc is not None and image.mode in ("RGB", "RGBA") and is_display_p3(icc)
    converted = _apply_profile(image, icc) if icc and not wide else None
    # convert() copies even when the mode already matches: 16 ms on a phone photo.
    rgb = converted or (image if image.mode == "RGB" else image.convert("RGB"))
    # Resized and transposed copies inherit info, and the encoders write parts of it
    # (comments, EXIF) back out: clear it once here, but for a wide-colour profile.
    rgb.info = {"icc_profile": DISPLAY_P3} if wide else {}
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def tones(image: Image.Image) -> tuple[int, ...] | None:
    """The level in sRGB's tone curve of each 8-bit level of the opened image, where its PNG's
    cICP or gAMA, or a grey HEIF's or AVIF's nclx box, gives it another curve (see _png_colours,
    _describe_coded); None where its levels are sRGB's or its profile's, and for a 16-bit PNG, whose
    samples are toned as they are taken to 8 bits (its stills', its animation's frames': see
    _describe_png)."""
    return image.info.get(_SRGB_TONES)


# The bands of each mode that tones apply to; an alpha band after them keeps its levels.
_TONED_BANDS = {"L": 1, "RGB": 3, "RGBA": 3}


def in_srgb_tones(picture: Image.Image, levels: tuple[int, ...] | None) -> Image.Image:
    """The L, RGB or RGBA picture with its colour levels mapped through `levels` (see tones), as
    it is when `levels` is None; a picture of another mode as it is ("1": black and white are
    black and white in every curve)."""
    toned = _TONED_BANDS.get(picture.mode)
    if levels is None or toned is None:
        return picture
    return picture.point([*levels] * toned + [*range(256)] * (len(picture.getbands()) - toned))


def eight_bit(image: Image.Image, tones: Sequence[int] | None = None) -> Image.Image:
    """16-bit grey as "L", the top 8 bits of each level (a plain convert clips everything above
    255 to white), or where given the 8-bit level `tones` holds for it; "LA" when a tRNS chunk
    makes a level transparent, matched against the 16-bit levels, since many of them share their
    top 8 bits. Any other image as it is."""
    if image.mode not in ("I;16", "I"):
        return image
    levels = image.convert("I")
    grey = levels.point(lambda v: v / 256).convert("L") if tones is None else levels.point(tones, "L")
    grey.info = {key: value for key, value in image.info.items() if key != "transparency"}
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey.putalpha(ImageMath.lambda_eval(lambda args: (args["levels"] != transparent) * 255, levels=levels).convert("L"))
    return grey


def _apply_profile(image: Image.Image, icc: bytes) -> Image.Image | None:
    """The image converted from its embedded profile to sRGB, or None to convert it plainly."""
    try:
        if image.mode in ("RGB", "RGBA"):
            conversion = _srgb_conversion(icc)
            source = image.convert("RGB") if image.mode == "RGBA" else image
            return source if conversion is None else conversion.apply(source)
        if image.mode in ("CMYK", "L"):
            return ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), SRGB_PROFILE, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        # A broken or mismatched profile: the pixels are fine, the colour tag is not.
        return None
    return None


@cached_by_digest
def _srgb_conversion(icc: bytes) -> SrgbConversion | None:
    """The embedded RGB profile's conversion to sRGB, None when it is sRGB already."""
    if is_srgb(icc):
        return None
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    # lcms converts every pixel. A 33-point 3D LUT sampled from it, four times as fast, interpolated
    # straight across where the conversion clips to sRGB's gamut, and showed saturated colours up to
    # 17 to 29 levels off (Adobe RGB, ProPhoto, BT.2020, even sRGB's primaries with a D50 white);
    # no profile whose gamut differs from sRGB's came within 2 levels.
    return SrgbConversion({mode: ImageCms.buildTransform(profile, SRGB_PROFILE, mode, mode) for mode in ("RGB", "RGBA")})


# A poster is the first frame in the first seconds that is not near-black (a fade-in or a
# lens cap is not what the video shows); frames are looked at this far apart.
POSTER_SEARCH_SECONDS = 3.0
_POSTER_SAMPLE_SECONDS = 0.25
# Mean luma (0-255, full range) at or below which a frame counts as near-black.
NEAR_BLACK_LUMA = 24


@dataclass
class Poster(Still):
    """A video's poster frame, and its time in the file it came from: where a later decode of that
    file finds the same frame without searching again (decode_poster's at_seconds)."""

    seconds: float


def decode_poster(
    path: Path, mime: str, limits: Limits, picture_start_seconds: float = 0.0, at_seconds: float | None = None
) -> Poster:
    """The first frame of the first seconds that is not near-black (else the first frame), upright,
    of the video file at path: the demuxer reads the file as far as that frame and the container's
    index, never the whole of a long video into memory. The seconds are counted from
    picture_start_seconds after the first frame: a rendition holds the first frame of a picture that
    starts after its sound until the picture starts (video.Source.first_frame_seconds), and copies of
    it are not what the video shows. With at_seconds (a Poster's seconds, of the same file), the frame
    at that time, unsearched: the one the search chose."""
    with open(path, "rb") as file:
        return _decode_poster(file, mime, limits, picture_start_seconds, at_seconds)


def _decode_poster(
    file: BinaryIO, mime: str, limits: Limits, picture_start_seconds: float, at_seconds: float | None
) -> Poster:
    try:
        with av.open(file, mode="r", format=_DEMUXERS[mime]) as container:
            if not container.streams.video:
                raise PermanentImagingError(CORRUPT_VIDEO)
            stream = container.streams.video[0]
            codec = stream.codec_context
            if codec.name not in _VIDEO_CODECS:
                raise PermanentImagingError(UNSUPPORTED_FORMAT)
            if codec.width * codec.height > limits.max_pixels:
                raise PermanentImagingError(VIDEO_TOO_LARGE)
            codec.thread_count = 1
            if at_seconds is None:
                frame = _poster_frame(container, stream, limits.max_packets_before_first_frame, picture_start_seconds)
            else:
                frame = _frame_at(container, stream, limits.max_packets_before_first_frame, at_seconds)
            image = frame.to_image()
            seconds = _frame_seconds(frame)
            rotation = frame.rotation
            aspect = stream.sample_aspect_ratio or codec.sample_aspect_ratio
    except (PermanentImagingError, MemoryError):
        raise
    except Exception:
        raise PermanentImagingError(CORRUPT_VIDEO) from None
    if aspect and aspect != 1:
        # Anamorphic video stores non-square pixels; the picture is as wide as they say.
        width = max(1, round(image.width * aspect))
        if width * image.height > limits.max_pixels:
            raise PermanentImagingError(VIDEO_TOO_LARGE)
        image = image.resize((width, image.height), Image.Resampling.LANCZOS)
    # The display matrix rotates counter-clockwise by `rotation` degrees; phones store
    # portrait video as landscape frames with a -90 there.
    if int(rotation) in _ROTATIONS:
        image = image.transpose(_ROTATIONS[int(rotation)])
    return Poster(image, image.width, image.height, seconds)


def _frame_seconds(frame: av.VideoFrame) -> float:
    return float(frame.time) if frame.time is not None else 0.0


def _poster_frame(
    container: av.container.InputContainer, stream: av.VideoStream, max_packets: int, picture_start_seconds: float
) -> av.VideoFrame:
    first: av.VideoFrame | None = None
    next_sample = 0.0
    for count, packet in enumerate(container.demux(stream), start=1):
        for frame in packet.decode():
            at = _frame_seconds(frame)
            if first is None:
                # The frames before the picture's start have a negative elapsed time: none is sampled.
                first, start = frame, at + picture_start_seconds
            elapsed = at - start
            if elapsed > POSTER_SEARCH_SECONDS:
                return first
            if elapsed >= next_sample:
                if _mean_luma(frame) > NEAR_BLACK_LUMA:
                    return frame
                next_sample = elapsed + _POSTER_SAMPLE_SECONDS
        if first is None and count >= max_packets:
            break
    if first is None:
        raise PermanentImagingError(CORRUPT_VIDEO)
    return first


def _frame_at(
    container: av.container.InputContainer, stream: av.VideoStream, max_packets: int, at_seconds: float
) -> av.VideoFrame:
    decoded = False
    for count, packet in enumerate(container.demux(stream), start=1):
        for frame in packet.decode():
            # Decoded in presentation order: the first at or past the time is the frame there.
            if _frame_seconds(frame) >= at_seconds:
                return frame
            decoded = True
        if not decoded and count >= max_packets:
            break
    raise PermanentImagingError(CORRUPT_VIDEO)


def _mean_luma(frame: av.VideoFrame) -> float:
    small = frame.reformat(width=32, height=32, format="rgb24").to_image().convert("L")
    return sum(small.get_flattened_data()) / (32 * 32)

