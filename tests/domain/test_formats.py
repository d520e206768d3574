"""Choosing a variant's format from the client's accept list."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mediavault.domain import formats


@dataclass(frozen=True)
class Made:
    content_type: str


PHOTO = [Made("image/jpeg"), Made("image/webp"), Made("image/avif")]
WITH_ALPHA = [Made("image/webp"), Made("image/avif")]
# A photo's thumbnail before a client asked for WebP.
STORED = [Made("image/jpeg"), Made("image/avif")]


@pytest.mark.parametrize(
    ("accept", "preferred"),
    [
        ([], ()),
        (["image/avif", "image/webp"], ("image/avif", "image/webp")),
        (["IMAGE/WebP; q=0.9", "image/avif"], ("image/avif", "image/webp")),
        (["application/json", "image/svg+xml", "text/html"], ()),
        (["image/avif", "image/*"], ("image/avif", "image/jpeg", "image/webp", "image/png")),
        (["*/*"], formats.SERVER_ORDER),
        (["image/webp", "image/webp", "image/avif"], ("image/webp", "image/avif")),
        (["text/plain"] * formats.MAX_ACCEPTED + ["image/avif"], ()),
        # A format takes its q from the most specific range naming it; q=0 refuses it.
        (["image/avif;q=0"], ()),
        (["image/avif;q=0", "image/webp"], ("image/webp",)),
        (["image/avif;q=0", "image/avif"], ()),
        (["image/*", "image/jpeg;q=0"], ("image/webp", "image/png", "image/avif")),
        (["image/jpeg;q=0.1", "image/*"], ("image/webp", "image/png", "image/avif", "image/jpeg")),
        (["image/*", "image/jpeg"], ("image/webp", "image/png", "image/avif", "image/jpeg")),
        (["*/*;q=0.1", "image/*;q=0.5", "image/avif"], ("image/avif", "image/jpeg", "image/webp", "image/png")),
        (["image/*;q=0", "*/*"], ()),
        (["image/webp;q=0.5", "image/avif;q=0.50", "image/jpeg;q=0.9"], ("image/jpeg", "image/webp", "image/avif")),
        (["image/avif;q=high", "image/webp;q=0.0001"], ("image/avif", "image/webp")),
        (["image/avif;q=7", "image/webp;level=1"], ("image/avif", "image/webp")),
        # An entry is read as an Accept header line: it may list several ranges, as an OpenAPI
        # client sends an array query parameter, and the 16 read are ranges, not entries.
        (["image/avif,image/jpeg"], ("image/avif", "image/jpeg")),
        (["image/*;q=0.5, image/avif", "image/jpeg;q=0"], ("image/avif", "image/webp", "image/png")),
        ([", ".join(["text/plain"] * formats.MAX_ACCEPTED + ["image/avif"])], ()),
    ],
)
def test_preference_is_the_accepted_formats_the_server_makes_best_first(accept, preferred):
    assert formats.preference(accept) == preferred


@pytest.mark.parametrize(
    ("accept", "made", "answer"),
    [
        (["image/avif", "image/webp"], PHOTO, ["image/avif", "image/webp", "image/jpeg"]),
        (["image/webp"], PHOTO, ["image/webp", "image/jpeg", "image/avif"]),
        ([], PHOTO, ["image/jpeg", "image/webp", "image/avif"]),
        (["application/json"], PHOTO, ["image/jpeg", "image/webp", "image/avif"]),
        (["image/jpeg"], WITH_ALPHA, ["image/webp", "image/avif"]),
        (["image/avif"], [Made("image/jpeg")], ["image/jpeg"]),
        (["image/avif"], [Made("video/mp4")], ["video/mp4"]),
        (["image/*", "image/jpeg;q=0"], STORED, ["image/avif", "image/jpeg"]),
        (["image/jpeg;q=0.1", "image/*"], STORED, ["image/avif", "image/jpeg"]),
        (["image/avif;q=0"], STORED, ["image/jpeg", "image/avif"]),
    ],
)
def test_a_variant_answers_in_the_first_accepted_format_it_has_else_the_servers_first(accept, made, answer):
    ordered = formats.ordered(made, formats.preference(accept))
    assert [m.content_type for m in ordered] == answer


def test_signature_names_a_preference_for_cache_keys():
    assert formats.signature(()) == ""
    assert formats.signature(("image/avif", "image/webp")) == "avif,webp"
