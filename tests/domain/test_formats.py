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


@pytest.mark.parametrize(
    ("accept", "preferred"),
    [
        ([], ()),
        (["image/avif", "image/webp"], ("image/avif", "image/webp")),
        (["IMAGE/WebP; q=0.9", "image/avif"], ("image/webp", "image/avif")),
        (["application/json", "image/svg+xml", "text/html"], ()),
        (["image/avif", "image/*"], ("image/avif", "image/jpeg", "image/webp", "image/png")),
        (["*/*"], formats.SERVER_ORDER),
        (["image/webp", "image/webp", "image/avif"], ("image/webp", "image/avif")),
        (["text/plain"] * formats.MAX_ACCEPTED + ["image/avif"], ()),
    ],
)
def test_preference_keeps_the_formats_the_server_makes_in_the_clients_order(accept, preferred):
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
    ],
)
def test_a_variant_answers_in_the_first_accepted_format_it_has_else_the_servers_first(accept, made, answer):
    ordered = formats.ordered(made, formats.preference(accept))
    assert [m.content_type for m in ordered] == answer


def test_signature_names_a_preference_for_cache_keys():
    assert formats.signature(()) == ""
    assert formats.signature(("image/avif", "image/webp")) == "avif,webp"
