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
        try:
            principal = self._authenticator.authenticate(metadata)
        except Unauthenticated:
            if self._rate_limits:
                await self._limit(rpc_name, self._address(metadata, peer), "anonymous")
            raise
        privileged = principal.has_any("service", "admin")
        limits: tuple[tuple[str, str], ...] = ()
        if self._rate_limits:
            limits = await self._limit(rpc_name, principal.user_id, "service" if privileged else "user")
        if not privileged and rpc_name in WRITES:
            self.refuse_frozen(principal.user_id)
        return principal, limits

    async def admit_signed_url(
        self, request_name: str, owner: str | None, metadata: Any, peer: str
    ) -> tuple[tuple[str, str], ...]:
        """The rate-limit headers of a request whose credential is a signed URL, RateLimited when
        it may not proceed: it spends the budget of the user the URL was signed for, as that
        user's calls do, or, for a URL that names no one, its caller's address's, as a call
        without a token does. Arguments as admit's, owner the user the URL names."""
        if not self._rate_limits:
            return ()
        if owner is None:
            return await self._limit(request_name, self._address(metadata, peer), "anonymous")
        return await self._limit(request_name, owner, "user")

    def _address(self, metadata: Any, peer: str) -> str:
        forwarded = next((v for k, v in metadata if k == "x-forwarded-for" and isinstance(v, str)), None)
        return self._limiter.client_address(peer, forwarded)

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
