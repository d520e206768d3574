"""Which strategy makes a still's variants, why, and the setting that keeps JPEGs out of their planes."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import pytest
from PIL import Image, ImageFile

from mediavault.imaging import DEFAULT_LIMITS, DEFAULT_VARIANTS, Transcoder, transcode
from mediavault.imaging.decode import open_image
from mediavault.imaging.strategies import LosslessJpeg, PillowPipeline, PlanarJpeg, choose
from tests.imaging.helpers import check_variants, corpus, open_variant

SPECS = DEFAULT_VARIANTS.image
JOLLA = corpus("images/camera/jolla.jpg").read_bytes()
# EXIF orientation 6: its display is turned, so it is re-encoded from the planes.
ROMMEL = corpus("images/formats/rommel.jpg").read_bytes()


def turned() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def photo(mode: str = "RGB", size: tuple[int, int] = (2000, 1500), **params: object) -> bytes:
    """A JPEG of two flat halves, large enough for the planes to make every default variant."""
    picture = Image.new("RGB", size, (200, 40, 30))
    picture.paste((30, 60, 200), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    picture.convert(mode).save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "mime", "jpeg_planes", "strategy", "reason"),
    [
        (JOLLA, "image/jpeg", True, LosslessJpeg, "an upright YCbCr JPEG in sRGB that fits the display"),
        (ROMMEL, "image/jpeg", True, PlanarJpeg, "a YCbCr JPEG in sRGB whose planes make every variant"),
        (JOLLA, "image/jpeg", False, PillowPipeline, "the JPEG planes are turned off"),
        (corpus("images/formats/hopper.png").read_bytes(), "image/png", True, PillowPipeline, "PNG is not a JPEG"),
        (photo(size=(1100, 800), exif=turned()), "image/jpeg", True, PillowPipeline,
         "a variant needs more than half the largest one"),
        (photo("CMYK"), "image/jpeg", True, PillowPipeline, "it is not three-component YCbCr"),
        (photo("L"), "image/jpeg", True, PillowPipeline, "it is not three-component YCbCr"),
        (
            photo(icc_profile=Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"]),
            "image/jpeg", True, PillowPipeline, "its colours need converting to sRGB",
        ),
    ],
    ids=["phone-photo", "turned-phone-photo", "planes-off", "png", "small-jpeg", "cmyk", "grey", "foreign-profile"],
)
def test_choose_names_the_strategy_and_says_why(
    data: bytes, mime: str, jpeg_planes: bool, strategy: type, reason: str
) -> None:
    chosen = choose(open_image(data, mime, DEFAULT_LIMITS), data, SPECS, jpeg_planes)
    assert type(chosen) is strategy
    assert chosen.reason.startswith(reason), chosen.reason
    assert transcode(data, mime, jpeg_planes=jpeg_planes).strategy == strategy.name


def test_with_the_planes_off_a_phone_photo_gets_the_pillow_pipelines_variants() -> None:
    planar = transcode(ROMMEL, "image/jpeg")
    pillow = transcode(ROMMEL, "image/jpeg", jpeg_planes=False)
    assert (planar.strategy, pillow.strategy) == ("jpeg-planes", "pillow")
    by_pillow = PillowPipeline(open_image(ROMMEL, "image/jpeg", DEFAULT_LIMITS), "").transcode(SPECS)
    assert [v.data for v in pillow.variants] == [v.data for v in by_pillow.variants]
    # The two encoders differ, so the display's bytes tell which path made it.
    assert open_variant(pillow.variants[0].data).size == open_variant(planar.variants[0].data).size
    assert pillow.variants[0].data != planar.variants[0].data
    check_variants(pillow, {spec.name for spec in SPECS})


async def test_the_pool_passes_the_setting_to_its_processes() -> None:
    async with Transcoder(workers=1, jpeg_planes=False) as off, Transcoder(workers=1) as on:
        pillow, planar = await asyncio.gather(off.run(ROMMEL, "image/jpeg"), on.run(ROMMEL, "image/jpeg"))
    assert (pillow.strategy, planar.strategy) == ("pillow", "jpeg-planes")
    assert [v.data for v in pillow.variants] == [v.data for v in transcode(ROMMEL, "image/jpeg", jpeg_planes=False).variants]


def test_a_jpeg_libjpeg_turbo_warns_about_goes_through_pillow() -> None:
    data = photo(exif=turned())
    # Bytes between the last scan and the EOI marker: libjpeg-turbo warns ("extraneous
    # bytes before marker"), stock Pillow decodes it all the same.
    damaged = data[:-2] + bytes(5) + data[-2:]
    Image.open(io.BytesIO(damaged)).load()
    assert isinstance(choose(open_image(damaged, "image/jpeg", DEFAULT_LIMITS), damaged, SPECS), PlanarJpeg)
    result = transcode(damaged, "image/jpeg")
    assert result.strategy == "pillow"
    assert [v.data for v in result.variants] == [v.data for v in transcode(data, "image/jpeg", jpeg_planes=False).variants]


def pillow_tuning() -> tuple[int, int]:
    return ImageFile.MAXBLOCK, Image.core.get_blocks_max()


def test_importing_and_running_the_pipeline_leaves_the_process_untuned() -> None:
    script = (
        "from PIL import Image, ImageFile\n"
        "defaults = (ImageFile.MAXBLOCK, Image.core.get_blocks_max())\n"
        "from mediavault.imaging import transcode\n"
        f"transcode(open({str(corpus('images/formats/hopper.jpg'))!r}, 'rb').read(), 'image/jpeg')\n"
        "print(defaults == (ImageFile.MAXBLOCK, Image.core.get_blocks_max()))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "True"


async def test_pool_processes_are_tuned_when_they_start() -> None:
    async with Transcoder(workers=1) as transcoder:
        await transcoder.prewarm()
        (worker,) = transcoder._idle
        tuning = await asyncio.wrap_future(worker.executor.submit(pillow_tuning))
    assert tuning == (4 * 1024 * 1024, 8)
