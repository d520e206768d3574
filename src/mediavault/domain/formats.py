"""Which of a variant's formats a client gets: the first it accepts, else the universal one.

Clients name the image types they decode, in preference order (MediaService's `accept`;
the REST gateway fills it from the HTTP Accept header). Each entry is read as a line of an
Accept header (RFC 9110 12.5.1): one media range or several separated by commas, as an
OpenAPI client sends the query array `accept` (comma-separated, Swagger 2.0's default).
Each range has an optional q: a format takes its q from the most specific range that
matches it (`image/webp` before `image/*` before `*/*`, the first of equals), q=0 refuses
it, and a format no range matches is not accepted. The accepted formats rank by q, then by
the position of the range that gave them their q, then in the server's order (which orders
the formats one wildcard gives the same q). A variant answers in the first of those it
exists in. Types the server never makes, other parameters, a q that is not a decimal number
and anything past the first MAX_ACCEPTED ranges are ignored, never refused: an Accept
header is a hint. When a client accepts none of a variant's formats it gets the server's
first choice, JPEG (WebP for pictures with alpha, which have no JPEG), which every client
decodes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

AVIF = "image/avif"
WEBP = "image/webp"
JPEG = "image/jpeg"
PNG = "image/png"
# The server's order when a client states no preference: the most widely decoded first.
SERVER_ORDER = (JPEG, WEBP, PNG, AVIF)
# How specific each range matching a format is; every format the server makes is an image/*.
_WILDCARDS = {"*/*": 0, "image/*": 1}
_EXACT = len(_WILDCARDS)
# More decimals than RFC 9110's three, so that a client's q=0.0001 still ranks low.
_QVALUE = re.compile(r"[0-9]+(\.[0-9]*)?")
MAX_ACCEPTED = 16


class Encoded(Protocol):
    @property
    def content_type(self) -> str: ...


E = TypeVar("E", bound=Encoded)


def preference(accept: Iterable[str]) -> tuple[str, ...]:
    """The formats the server makes that the client accepts, best first; empty when it accepts none."""
    # Per format: (specificity, q, position) of the most specific range matching it so far.
    matched: dict[str, tuple[int, float, int]] = {}
    for position, accepted_range in enumerate(itertools.islice(_ranges(accept), MAX_ACCEPTED)):
        mime, *parameters = accepted_range.split(";")
        media_range = mime.strip().lower()
        specificity = _EXACT if media_range in SERVER_ORDER else _WILDCARDS.get(media_range)
        if specificity is None:
            continue
        q = _quality(parameters)
        for format_ in SERVER_ORDER if specificity < _EXACT else (media_range,):
            if format_ not in matched or specificity > matched[format_][0]:
                matched[format_] = (specificity, q, position)
    accepted = [f for f in SERVER_ORDER if f in matched and matched[f][1] > 0]
    return tuple(sorted(accepted, key=lambda f: (-matched[f][1], matched[f][2])))


def _ranges(accept: Iterable[str]) -> Iterator[str]:
    for entry in accept:
        # At most MAX_ACCEPTED ranges are read: the rest of a long entry is never split.
        yield from entry.split(",", MAX_ACCEPTED)[:MAX_ACCEPTED]


def _quality(parameters: Sequence[str]) -> float:
    q = 1.0
    for parameter in parameters:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "q" and _QVALUE.fullmatch(value):
            q = min(float(value), 1.0)
    return q


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
