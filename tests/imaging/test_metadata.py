"""The EXIF facts kept as data: date taken with its offset, camera; bad values dropped, never GPS."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime

import pytest
from PIL import Image

from mediavault.imaging.metadata import MAX_CAMERA_CHARS, PhotoFacts, photo_facts
from mediavault.imaging.pipeline import transcode_poster
from tests.imaging.helpers import corpus, transcoded


def with_exif(make: object = None, model: object = None, taken: object = None, offset: object = None) -> Image.Image:
    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model)):
        if value is not None:
            exif[tag] = value
    details = exif.get_ifd(0x8769)
    for tag, value in ((0x9003, taken), (0x9011, offset)):
        if value is not None:
            details[tag] = value
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    ("relative", "facts"),
    [
        ("images/camera/DSCN0010.jpg", PhotoFacts(datetime(2008, 10, 22, 16, 28, 39), None, "NIKON COOLPIX P6000")),
        ("images/camera/Canon_40D.jpg", PhotoFacts(datetime(2008, 5, 30, 15, 56, 1), None, "Canon EOS 40D")),
        ("images/heic/IMG_5195.HEIC", PhotoFacts(datetime(2021, 4, 11, 15, 47, 53), -300, "Apple iPhone 11 Pro Max")),
        ("images/formats/hopper.png", PhotoFacts()),
    ],
)
def test_the_transcode_result_carries_the_photos_facts(relative: str, facts: PhotoFacts) -> None:
    assert transcoded(relative).photo == facts


def test_the_facts_hold_nothing_but_date_offset_and_camera() -> None:
    assert [f.name for f in dataclasses.fields(PhotoFacts)] == ["taken_at", "utc_offset_minutes", "camera"]


@pytest.mark.parametrize(
    ("exif", "facts"),
    [
        ({"taken": "2024:05:01 14:03:22", "offset": "+05:30"}, PhotoFacts(datetime(2024, 5, 1, 14, 3, 22), 330, "")),
        ({"taken": "2024:05:01 14:03:22", "offset": "-00:00"}, PhotoFacts(datetime(2024, 5, 1, 14, 3, 22), 0, "")),
        ({"taken": "0000:00:00 00:00:00", "offset": "+01:00"}, PhotoFacts()),
        ({"taken": "    :  :     :  :  "}, PhotoFacts()),
        ({"taken": "2024:02:30 10:00:00"}, PhotoFacts()),
        ({"taken": "2024:05:01 14:03:22", "offset": "+15:00"}, PhotoFacts(datetime(2024, 5, 1, 14, 3, 22), None, "")),
        ({"taken": "2024:05:01 14:03:22", "offset": "+01:75"}, PhotoFacts(datetime(2024, 5, 1, 14, 3, 22), None, "")),
        ({"offset": "+01:00"}, PhotoFacts()),
        ({"make": "Canon", "model": "Canon EOS 5D\x00\x00junk"}, PhotoFacts(camera="Canon EOS 5D")),
        ({"make": "  Apple ", "model": "iPhone\t15\x07"}, PhotoFacts(camera="Apple iPhone 15")),
        ({"model": "X" * 500}, PhotoFacts(camera="X" * MAX_CAMERA_CHARS)),
        # The cut falls on the space between the make and the model: not kept at the end.
        ({"make": "M" * (MAX_CAMERA_CHARS - 1), "model": "Y1"}, PhotoFacts(camera="M" * (MAX_CAMERA_CHARS - 1))),
        ({"make": "小米".encode(), "model": b"Redmi Note 8 Pro"}, PhotoFacts(camera="小米 Redmi Note 8 Pro")),
        ({"make": b"LEICA", "model": "Q2 Moné".encode()}, PhotoFacts(camera="LEICA Q2 Moné")),
        ({"make": b"Sony", "model": "ILCE Moné\u202e\x00\xff".encode()}, PhotoFacts(camera="Sony ILCE Moné")),
        ({"make": b"Sony", "model": b"ILCE\xe9\xff-7"}, PhotoFacts(camera="Sony ILCE\xe9\xff-7")),
    ],
    ids=["offset", "zero-offset", "zero-date", "blank-date", "impossible-date", "offset-out-of-range",
         "offset-minutes", "offset-alone", "nul-padded", "whitespace-and-control", "long-model", "cut-at-the-space",
         "utf8-make", "utf8-model", "utf8-then-nul-and-junk", "latin1"],
)
def test_untrusted_values_parse_exactly_or_are_dropped(exif: dict, facts: PhotoFacts) -> None:
    assert photo_facts(with_exif(**exif)) == facts


def test_a_video_has_no_photo_facts() -> None:
    path = corpus("video/realshort.mp4")
    assert transcode_poster(path, "video/mp4").photo == PhotoFacts()
