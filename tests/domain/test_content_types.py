from __future__ import annotations

import pytest

from mediavault.domain.content_types import matches, sniff
from tests.conftest import CORPUS

EXPECTED = {
    "images/camera/Canon_40D.jpg": "image/jpeg",
    "images/formats/hopper.png": "image/png",
    "images/formats/hopper.gif": "image/gif",
    "images/formats/hopper.webp": "image/webp",
    "images/formats/hopper.avif": "image/avif",
    "images/heic/IMG_5195.HEIC": "image/heif",
    "images/heic/samplefilehub.heif": "image/heif",
    "video/realshort.mp4": "video/mp4",
    "video/test.webm": "video/webm",
}


@pytest.mark.parametrize(("path", "expected"), sorted(EXPECTED.items()))
def test_sniffs_real_files(path, expected):
    assert sniff((CORPUS / path).read_bytes()[:1024]) == expected


def test_every_corpus_image_sniffs_as_an_allowed_type():
    for path in sorted((CORPUS / "images").rglob("*")):
        if path.is_file() and path.suffix.lower() in {".jpg", ".png", ".gif", ".webp", ".avif", ".heic", ".heif"}:
            assert sniff(path.read_bytes()[:1024]) is not None, path


@pytest.mark.parametrize(
    "head",
    [b"", b"%PDF-1.7", b"%!PS-Adobe-3.0 EPSF-3.0", b"8BPS\x00\x01", b"<svg xmlns=", b"\x00\x00\x00\x18ftypxxxx"],
)
def test_rejects_what_is_not_allowed(head):
    assert sniff(head) is None


def test_families():
    assert matches("image/heic", "image/heif")
    assert matches("video/quicktime", "video/mp4")
    assert not matches("image/jpeg", "image/png")
    assert not matches("image/avif", "image/heif")
    assert not matches("image/jpeg", None)
