"""Which of a variant's formats a client gets: the first it accepts, else the universal one.

Clients name the image types they decode, in preference order (MediaService's `accept`;
the REST gateway fills it from the HTTP Accept header). A variant answers in the first
of those it exists in; `image/*` and `*/*` accept every format, in the server's order.
Types the server never makes, parameters (`;q=0.8`) and anything past the first
MAX_ACCEPTED entries are ignored, never refused: an Accept header is a hint.
When a client accepts none of a variant's formats it gets the server's first choice,
JPEG (WebP for pictures with alpha, which have no JPEG), which every client decodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

AVIF = "image/avif"
WEBP = "image/webp"
JPEG = "image/jpeg"
PNG = "image/png"
# The server's order when a client states no preference: the most widely decoded first.
SERVER_ORDER = (JPEG, WEBP, PNG, AVIF)
_WILDCARDS = frozenset({"image/*", "*/*"})
MAX_ACCEPTED = 16


class Encoded(Protocol):
    @property
    def content_type(self) -> str: ...


E = TypeVar("E", bound=Encoded)


def preference(accept: Iterable[str]) -> tuple[str, ...]:
    """The formats the server makes, in the client's order; empty when the client named none."""
    chosen: list[str] = []
    for position, entry in enumerate(accept):
        if position >= MAX_ACCEPTED:
            break
        mime = entry.split(";", 1)[0].strip().lower()
        expanded = SERVER_ORDER if mime in _WILDCARDS else (mime,) if mime in SERVER_ORDER else ()
        chosen += (m for m in expanded if m not in chosen)
    return tuple(chosen)


def signature(preferred: Sequence[str]) -> str:
    """A short stable name of a preference, for cache keys and etags ("" for none)."""
    return ",".join(mime.removeprefix("image/") for mime in preferred)


def rank(content_type: str, preferred: Sequence[str]) -> tuple[int, int]:
    """Sort key: accepted formats in the client's order, then the rest in the server's order."""
    in_client = preferred.index(content_type) if content_type in preferred else len(preferred)
    in_server = SERVER_ORDER.index(content_type) if content_type in SERVER_ORDER else len(SERVER_ORDER)
    return in_client, in_server


def ordered(formats: Iterable[E], preferred: Sequence[str]) -> list[E]:
    """A variant's formats, the one to answer first, then its alternatives."""
    return sorted(formats, key=lambda encoded: rank(encoded.content_type, preferred))
