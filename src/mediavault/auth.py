"""Bearer JWT -> Principal. Nothing else in mediavault knows about tokens."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from mediavault.errors import PermissionDenied, Unauthenticated
from mediavault.limits import Text

ROLES = frozenset({"user", "admin", "billing", "service"})
MAX_USER_ID_LENGTH = 128
# What accounts.user_id holds; a token's subject and every user id a request names.
USER_ID = Text(min_len=1, max_len=MAX_USER_ID_LENGTH)
MIN_SECRET_BYTES = 32
# Issuers' clocks drift from ours: without slack, a token stamped a second ahead (iat) is refused
# as not yet valid. MEDIAVAULT_JWT_LEEWAY_SECONDS; the same slack applies to exp and nbf.
DEFAULT_LEEWAY_SECONDS = 30


@dataclass(frozen=True)
class Principal:
    user_id: str
    roles: frozenset[str]

    def has_any(self, *roles: str) -> bool:
        return not self.roles.isdisjoint(roles)

    def require_any(self, *roles: str) -> None:
        if not self.has_any(*roles):
            raise PermissionDenied(f"requires one of the roles: {', '.join(roles)}")

    def user_or_self(self, user_id: str, *privileged: str) -> str:
        """The account a call acts on: the caller's own, or user_id when the caller holds a privileged role."""
        if not user_id or user_id == self.user_id:
            return self.user_id
        self.require_any(*privileged)
        return user_id


# Clients reuse one token for many calls; a verified token is remembered until it
# expires (exp plus the leeway, as jwt.decode judges it), so the HMAC check and claim
# parsing run once per token, not per call.
_CACHE_SIZE = 10_000


class Authenticator:
    def __init__(self, secret: str, *, leeway_seconds: int = DEFAULT_LEEWAY_SECONDS) -> None:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"MEDIAVAULT_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 3.2)")
        self._secret = secret
        self._leeway_seconds = leeway_seconds
        self._verified: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        header = next((value for key, value in metadata if key == "authorization"), None)
        if not isinstance(header, str):
            raise Unauthenticated("missing bearer token")
        cached = self._verified.get(header)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        principal, expires_at = self._verify(header)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()
        self._verified[header] = (principal, expires_at)
        return principal

    def _verify(self, header: str) -> tuple[Principal, float]:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        # A JWT is ASCII; an HTTP header's bytes that are not UTF-8 come as surrogate escapes,
        # which jwt.decode cannot encode.
        if not token.isascii():
            raise Unauthenticated("invalid token")
        try:
            claims = jwt.decode(
                token.strip(), self._secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}, leeway=self._leeway_seconds
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token") from None
        user_id = claims["sub"]
        if not isinstance(user_id, str) or USER_ID.violation(user_id) is not None:
            raise Unauthenticated("invalid token subject")
        raw_roles = claims.get("roles", ["user"])
        if isinstance(raw_roles, str):
            raw_roles = [raw_roles]
        if not isinstance(raw_roles, list) or not all(isinstance(role, str) for role in raw_roles):
            raise Unauthenticated("invalid roles claim")
        exp = claims["exp"]
        if not isinstance(exp, int | float):
            raise Unauthenticated("invalid exp claim")
        # jwt.decode compares the whole seconds of exp.
        return Principal(user_id, frozenset(r for r in raw_roles if r in ROLES)), int(exp) + self._leeway_seconds

    def issue(self, user_id: str, roles: Iterable[str], ttl_seconds: int = 3600) -> str:
        roles = list(roles)
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        now = int(time.time())
        return jwt.encode({"sub": user_id, "roles": roles, "iat": now, "exp": now + ttl_seconds}, self._secret, algorithm="HS256")
