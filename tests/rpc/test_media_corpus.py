"""Every corpus file through the real path: Begin -> PUT -> Finalize -> arq worker -> GetMedia -> variant URLs."""

from __future__ import annotations

import asyncio
import io

import av
import pytest
from PIL import Image

from mediavault.media.v1 import media_pb2 as mpb
from tests.conftest import CORPUS
from tests.helpers import fetch, settled, upload
from tests.imaging.helpers import avif_sequence
from tests.imaging.test_corpus import ALPHA, BAD, CAMERA, OPAQUE, ORIENTATION, VIDEOS

CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp",
    ".avif": "image/avif", ".heic": "image/heic", ".heif": "image/heif", ".mp4": "video/mp4", ".webm": "video/webm",
}
BUDGETS = {"thumbnail": (300, 40_000), "preview": (600, 100_000), "display": (4000, 2_000_000), "poster": (600, 100_000)}


def content_type_of(relative: str) -> str:
    return CONTENT_TYPES["." + relative.rsplit(".", 1)[1].lower()]


async def run_through(storage, media, md, relative: str) -> mpb.Media:
    data = (CORPUS / relative).read_bytes()
    done = await upload(storage, md, data, filename=relative.rsplit("/", 1)[1], content_type=content_type_of(relative))
    return await settled(media, md, done.media_id, timeout=120)


async def variant_pictures(item: mpb.Media) -> dict[str, Image.Image]:
    """The still variants, checked and opened; an animation's moving ones are checked by their own test."""
    pictures = {}
    for variant in (v for v in item.variants if v.name != "animation"):
        status, body, headers = await fetch(variant.url)
        assert status == 200
        assert headers["Content-Type"] == variant.content_type
        box, budget = BUDGETS[variant.name]
        assert len(body) == variant.size_bytes <= budget, (variant.name, len(body))
        picture = Image.open(io.BytesIO(body))
        picture.load()
        assert picture.size == (variant.width, variant.height)
        assert max(picture.size) <= box
        assert not picture.getexif()
        assert not {"exif", "xmp", "comment"} & set(picture.info)
        pictures[variant.name] = picture
    return pictures


@pytest.mark.parametrize("relative", ORIENTATION + CAMERA + ALPHA + OPAQUE)
async def test_photos(storage, media, auth, user_id, worker, relative):
    item = await run_through(storage, media, auth(user_id), relative)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.attempts == 1
    pictures = await variant_pictures(item)
    assert set(pictures) == {"thumbnail", "preview", "display"}
    assert item.feed_url == next(v.url for v in item.variants if v.name == "thumbnail")
    if relative in ORIENTATION:
        landscape = "Landscape" in relative
        for picture in (*pictures.values(),):
            assert (picture.width > picture.height) == landscape, relative
        assert (item.width > item.height) == landscape
    if relative in ALPHA:
        for picture in pictures.values():
            assert picture.format in ("WEBP", "PNG")
            assert "A" in picture.getbands()
    else:
        assert all(p.mode == "RGB" for p in pictures.values())


@pytest.mark.parametrize("relative", sorted(BAD))
async def test_bad_files(storage, media, auth, user_id, worker, relative):
    item = await run_through(storage, media, auth(user_id), relative)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert (item.processing_error, item.attempts) == (BAD[relative], 1)
    assert not item.variants


@pytest.mark.parametrize("relative", sorted(VIDEOS))
async def test_videos(storage, media, auth, user_id, worker, relative):
    item = await run_through(storage, media, auth(user_id), relative)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.kind == mpb.MEDIA_KIND_VIDEO
    assert (item.width, item.height) == VIDEOS[relative]
    pictures = await variant_pictures(item)
    assert set(pictures) == {"poster", "thumbnail", "preview"}
    assert item.feed_url == next(v.url for v in item.variants if v.name == "thumbnail")


async def test_many_uploads_at_once_all_complete(storage, media, auth, user_id, worker):
    md = auth(user_id)
    items = await asyncio.gather(*(run_through(storage, media, md, r) for r in CAMERA + ORIENTATION[:5]))
    assert all(i.processing_status == mpb.PROCESSING_STATUS_COMPLETE for i in items)


async def test_a_photos_exif_date_and_camera_are_data_and_its_location_is_nowhere(storage, media, auth, user_id, worker, pool):
    relative = "images/camera/DSCN0010.jpg"
    assert Image.open(CORPUS / relative).getexif().get_ifd(0x8825)
    item = await run_through(storage, media, auth(user_id), relative)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert (item.taken_at, item.camera) == ("2008-10-22T16:28:39", "NIKON COOLPIX P6000")
    row = await pool.fetchrow("SELECT * FROM media WHERE media_id = $1::uuid", item.media_id)
    assert (row["taken_at"].isoformat(), row["taken_at_utc_offset_minutes"], row["camera"]) == (
        "2008-10-22T16:28:39", None, "NIKON COOLPIX P6000",
    )
    # Nothing of the GPS block anywhere: not a column, not in the answer, not in a variant.
    located = ("gps", "latitude", "longitude", "location")
    assert not [name for name in dict(row) if any(word in name for word in located)]
    assert not [f.name for f in mpb.Media.DESCRIPTOR.fields if any(word in f.name for word in located)]
    for picture in (await variant_pictures(item)).values():
        assert not picture.getexif().get_ifd(0x8825)


async def test_an_iphone_photo_keeps_its_utc_offset(storage, media, auth, user_id, worker):
    item = await run_through(storage, media, auth(user_id), "images/heic/IMG_5195.HEIC")
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert (item.taken_at, item.camera) == ("2021-04-11T15:47:53-05:00", "Apple iPhone 11 Pro Max")


@pytest.mark.parametrize("relative", ["images/camera/DSCN0010.jpg", "images/heic/IMG_5195.HEIC"])
async def test_the_feed_answers_a_photos_facts_alike_from_the_database_and_from_its_cache(
    storage, media, auth, user_id, worker, relative
):
    md = auth(user_id)
    item = await run_through(storage, media, md, relative)
    computed = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    cached = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    assert cached.etag == computed.etag
    assert [(m.media_id, m.taken_at, m.camera) for m in cached.media] == [(item.media_id, item.taken_at, item.camera)]


async def test_an_animated_gif_says_it_moves_and_for_how_long(storage, media, auth, user_id, worker):
    moving = await run_through(storage, media, auth(user_id), "images/formats/newtonscradle.gif")
    still = await run_through(storage, media, auth(user_id), "images/formats/hopper.gif")
    assert moving.processing_status == still.processing_status == mpb.PROCESSING_STATUS_COMPLETE
    assert (moving.animated, moving.animation_duration_ms, moving.animation_plays) == (True, 820, 0)
    assert (still.animated, still.animation_duration_ms, still.animation_plays) == (False, 0, 0)
    assert {v.name for v in moving.variants} == {"thumbnail", "preview", "display", "animation"}
    assert {v.name for v in still.variants} == {"thumbnail", "preview", "display"}
    assert not still.renditions
    animation = next(v for v in moving.variants if v.name == "animation")
    status, body, headers = await fetch(animation.url)
    assert (status, headers["Content-Type"], len(body)) == (200, "image/webp", animation.size_bytes)
    webp = Image.open(io.BytesIO(body))
    assert (webp.format, webp.n_frames, webp.size) == ("WEBP", 36, (animation.width, animation.height))
    (gifv,) = moving.renditions
    assert (gifv.name, gifv.content_type) == ("gifv", "video/mp4")
    # One loop's bits a second, as a video's renditions say theirs.
    assert gifv.bitrate == pytest.approx(gifv.size_bytes * 8 / 0.820, rel=0.01)
    status, body, headers = await fetch(gifv.url)
    assert (status, headers["Content-Type"], len(body)) == (200, "video/mp4", gifv.size_bytes)
    with av.open(io.BytesIO(body)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", gifv.width, gifv.height)
        assert sum(1 for _ in container.decode(stream)) >= 2


def looping_gif(loop: int | None) -> bytes:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((220, 30, 40), (30, 180, 60), (40, 60, 210))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, **({} if loop is None else {"loop": loop}))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("source", "content_type", "plays"),
    [
        # A GIF plays once without a loop count, and once more than its count with one.
        (lambda: looping_gif(None), "image/gif", 1),
        (lambda: looping_gif(2), "image/gif", 3),
        # An AVIF sequence whose 300 ms edit repeats for a track of 900 ms plays three times.
        (lambda: avif_sequence(True, 900), "image/avif", 3),
    ],
    ids=["gif-no-loop-count", "gif-loop-count-2", "avif-edit-list"],
)
async def test_an_animation_says_how_many_times_it_plays_which_its_mp4_cannot(
    storage, media, auth, user_id, worker, source, content_type, plays
):
    md = auth(user_id)
    done = await upload(storage, md, source(), filename=f"plays.{content_type.removeprefix('image/')}", content_type=content_type)
    item = await settled(media, md, done.media_id, timeout=120)
    assert (item.processing_status, item.animated, item.animation_plays) == (mpb.PROCESSING_STATUS_COMPLETE, True, plays)
    animation = next(v for v in item.variants if v.name == "animation")
    status, body, _ = await fetch(animation.url)
    assert status == 200
    assert Image.open(io.BytesIO(body)).info["loop"] == plays
