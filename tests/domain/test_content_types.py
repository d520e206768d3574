from __future__ import annotations

import pytest

from mediavault.domain import content_types
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


def test_a_declared_type_and_the_bytes_that_satisfy_it_are_of_one_kind():
    # finalize takes the media kind from the sniffed type when it commits in one statement.
    for sniffed in content_types.ALLOWED_TYPES:
        declarable = content_types.declarable_as(sniffed)
        assert sniffed in declarable
        assert {content_types.kind_of(t) for t in declarable} == {content_types.kind_of(sniffed)}
    assert content_types.declarable_as(None) == ()
    assert content_types.declarable_as("image/heif") == ("image/heic", "image/heif")
