"""Pages of every list: the page size, and the page token, an opaque keyset position signed by the service.

A token names the last item of a page by (created_at, id), the order every list
pages in. It is signed with a key only the service knows and bound to the list that
issued it and the user whose list that was, so that a client can hand back only a
position the service gave it for that list: a forged, altered or truncated token, or
one of another list or another user's, is refused before it reaches SQL, and nothing
a client writes into one is ever parsed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import uuid
from datetime import UTC, datetime, timedelta

from mediavault.errors import InvalidArgument

# 2: the owner of the list is signed too (1 named the list alone). Caches of pages that hold
# tokens name it, so that replicas of two releases never serve each other's tokens.
TOKEN_VERSION = 2
# version, microseconds since the epoch (PostgreSQL's precision), the item's id
_POSITION = struct.Struct(">Bq16s")
# With the position, a whole number of base64 groups: no padding, and no spare bits
# that would let two strings name one token.
_MAC_BYTES = 20
TOKEN_LENGTH = (_POSITION.size + _MAC_BYTES) * 4 // 3
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def page_size(requested: int, default: int, maximum: int) -> int:
    """The page size a request asks for: 0 means the default, more than the maximum is the maximum.

    A negative size is refused at the boundary (rpc.fields).
    """
    return min(requested or default, maximum)


def _refused() -> InvalidArgument:
    return InvalidArgument.single("page_token", "not a token this service issued")


class PageTokens:
    """Encodes and verifies the page tokens of every list, each list under its own name and owner."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, listing: str, owner: str, created_at: datetime, item_id: uuid.UUID) -> str:
        since = created_at - _EPOCH
        micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
        position = _POSITION.pack(TOKEN_VERSION, micros, item_id.bytes)
        return base64.urlsafe_b64encode(position + self._mac(listing, owner, position)).decode()

    def decode(self, listing: str, owner: str, token: str) -> tuple[datetime, uuid.UUID]:
        """The position a token of this owner's listing names; InvalidArgument on page_token for anything else."""
        if len(token) != TOKEN_LENGTH or not token.isascii():
            raise _refused()
        try:
            raw = base64.urlsafe_b64decode(token)
        except ValueError:
            raise _refused() from None
        # The decoder skips characters outside the alphabet; only the canonical spelling is a token.
        if base64.urlsafe_b64encode(raw).decode() != token:
            raise _refused()
        position, mac = raw[: _POSITION.size], raw[_POSITION.size :]
        if not hmac.compare_digest(mac, self._mac(listing, owner, position)):
            raise _refused()
        version, micros, item_id = _POSITION.unpack(position)
        if version != TOKEN_VERSION:
            raise _refused()
        try:
            created_at = _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise _refused() from None
        return created_at, uuid.UUID(bytes=item_id)

    def _mac(self, listing: str, owner: str, position: bytes) -> bytes:
        # Neither a list's name nor a user id holds a NUL (auth.USER_ID), so the message names one pair.
        signed = b"\x00".join((listing.encode(), owner.encode(), position))
        return hmac.new(self._key, signed, hashlib.sha256).digest()[:_MAC_BYTES]
