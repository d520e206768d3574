"""HMAC-signed, expiring URLs for the fs backend, with the semantics of S3 presigned URLs:
method, key, expiry, content length, content type and, when given, the body's SHA-256 and the
owner (the user whose budget requests on the URL spend, as an S3 URL names its access key) are
bound into the signature."""

from __future__ import annotations

import hmac
import time
from functools import lru_cache
from urllib.parse import quote, quote_plus

from mediavault.blobs.base import check_key

# What verify says of a URL that is signed as it stands and only past its expiry.
URL_EXPIRED = "URL expired"


class UrlSigner:
    def __init__(self, key: bytes, base_url: str) -> None:
        self._key = key
        self._base_url = base_url.rstrip("/")

    def _signature(
        self, method: str, key: str, expires: int, length: str, content_type: str, sha256: str, owner: str
    ) -> str:
        fields = [method, key, str(expires), length, content_type]
        # Appended only when given, so URLs signed before checksums (or owners) were signed still
        # verify; neither can be dropped from (or added to) a URL, as the message would differ. An
        # owner always comes seventh, so it is never read as a checksum, and percent-encoded: a user
        # id may hold a newline, which would make the fields around it others.
        if sha256 or owner:
            fields.append(sha256)
        if owner:
            fields.append(quote(owner, safe=""))
        return hmac.digest(self._key, "\n".join(fields).encode(), "sha256").hex()

    def sign(
        self,
        method: str,
        key: str,
        *,
        expires_in: int,
        length: int | None = None,
        content_type: str = "",
        sha256: str | None = None,
    ) -> str:
        return self.sign_until(
            method, key, expires=int(time.time()) + expires_in, length=length, content_type=content_type, sha256=sha256
        )

    def sign_until(
        self,
        method: str,
        key: str,
        *,
        expires: int,
        length: int | None = None,
        content_type: str = "",
        sha256: str | None = None,
        route: str = "blobs",
        owner: str | None = None,
    ) -> str:
        """A URL under /route/key valid until the Unix time expires."""
        check_key(key)
        length_part = "" if length is None else str(length)
        query = f"X-Expires={expires}"
        if length is not None:
            query += f"&X-Length={length_part}"
        if content_type:
            query += f"&X-Content-Type={_query_value(content_type)}"
        if sha256:
            query += f"&X-Sha256={sha256}"
        if owner:
            query += f"&X-Owner={quote_plus(owner)}"
        signature = self._signature(method, key, expires, length_part, content_type, sha256 or "", owner or "")
        # check_key admits only characters that need no escaping in a path.
        return f"{self._base_url}/{route}/{key}?{query}&X-Signature={signature}"

    def verify(self, method: str, key: str, params: dict[str, str], now: float | None = None) -> str | None:
        """None when the URL is valid for this method and key, else why not."""
        try:
            expires = int(params["X-Expires"])
            signature = params["X-Signature"]
        except (KeyError, ValueError):
            return "missing or malformed signature parameters"
        signed = (params.get("X-Length", ""), params.get("X-Content-Type", ""), params.get("X-Sha256", ""))
        # The fields are signed joined by newlines: one holding a newline could carry the next
        # (a SHA-256 moved into X-Content-Type, the content type into X-Length) under the same signature.
        if any("\n" in field for field in signed):
            return "missing or malformed signature parameters"
        expected = self._signature(method, key, expires, *signed, params.get("X-Owner", ""))
        # compare_digest raises TypeError on a str holding non-ASCII characters, which a
        # percent-encoded X-Signature may: such a one matches no hex digest.
        if not signature.isascii() or not hmac.compare_digest(expected, signature):
            return "signature does not match"
        if (now if now is not None else time.time()) > expires:
            return URL_EXPIRED
        return None


def signed_owner(params: dict[str, str]) -> str | None:
    """The owner a URL verify accepted names; None when it was signed without one."""
    return params.get("X-Owner") or None


@lru_cache(maxsize=256)
def _query_value(value: str) -> str:
    # Content types: a handful of distinct values, each signed many times.
    return quote_plus(value)
