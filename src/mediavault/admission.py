"""Who may call, for the gRPC services and the HTTP endpoints alike: authentication, rate limits
and the refusal of writes by frozen accounts."""

from __future__ import annotations

from typing import Any

from mediavault.auth import Authenticator, Principal
from mediavault.errors import AccountFrozen, RateLimited, Unauthenticated
from mediavault.ratelimit import WRITES, RateLimiter


class Admission:
    """Who may call: authenticates the caller, applies its rate limit and refuses writes by frozen accounts."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter, *, rate_limits: bool) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._rate_limits = rate_limits

    async def admit(
        self, rpc_name: str, metadata: Any, peer: str
    ) -> tuple[Principal, tuple[tuple[str, str], ...]]:
        """Returns the caller and the rate-limit response metadata (or headers).

        rpc_name: "Service/Method", the name limits are configured by; metadata: the call's
        pairs (authorization, x-forwarded-for), read more than once; peer: grpc's peer string or the client's address.
        """
        limiter = self._limiter
        try:
            principal = self._authenticator.authenticate(metadata)
        except Unauthenticated:
            if self._rate_limits:
                forwarded = next((v for k, v in metadata if k == "x-forwarded-for" and isinstance(v, str)), None)
                address = limiter.client_address(peer, forwarded)
                await self._limit(rpc_name, address, "anonymous")
            raise
        privileged = principal.has_any("service", "admin")
        limits: tuple[tuple[str, str], ...] = ()
        if self._rate_limits:
            limits = await self._limit(rpc_name, principal.user_id, "service" if privileged else "user")
        if not privileged and rpc_name in WRITES:
            self.refuse_frozen(principal.user_id)
        return principal, limits

    def refuse_frozen(self, user_id: str) -> None:
        """AccountFrozen when the account may not write: for the calls admitted above, and for
        the tus chunks, whose credential is their signed URL rather than a token."""
        if user_id in self._limiter.frozen:
            raise AccountFrozen("account is frozen")

    async def _limit(self, rpc_name: str, subject: str, scope: str) -> tuple[tuple[str, str], ...]:
        decision = await self._limiter.check(rpc_name, subject, scope)
        if decision is None:
            return ()
        if not decision.allowed:
            raise RateLimited(
                decision,
                f"{scope}:{subject}",
                f"{rpc_name}: {decision.limit} calls per {'second' if decision.layer == 'burst' else 'hour'}",
            )
        return decision.metadata()
