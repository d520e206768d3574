"""Every corpus file through the real path: Begin -> PUT -> Finalize -> arq worker -> GetMedia -> variant URLs."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from mediavault.media.v1 import media_pb2 as mpb
from tests.conftest import CORPUS
from tests.helpers import fetch, settled, upload
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
    pictures = {}
    for variant in item.variants:
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
