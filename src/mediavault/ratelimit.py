"""Rate limits per (caller, RPC): an in-process burst limiter, then a sustained GCRA limit in Redis.

The HTTP listener's requests are limited by the same names: a tus creation as
StorageService/BeginUpload, a HEAD, PATCH or DELETE on a tus upload URL as tus/HEAD, tus/PATCH or
tus/DELETE (admission.py).

The burst layer is a token bucket per caller and RPC in this process: it costs no network
hop and keeps working when Redis does not. The sustained layer is one atomic Lua script on
Redis's own clock, so its limit holds across any number of server processes. Limits live in
the ``rate_limit_config`` table and are reloaded every few seconds, with the set of frozen
accounts, so operators change both without a restart.

When Redis is unreachable the sustained layer follows MEDIAVAULT_RATE_LIMIT_REDIS_DOWN_POLICY:
``reads-open`` (default) lets reads through and refuses uploads and other writes, ``open`` lets
everything through, ``closed`` refuses everything. Every decision is counted once in
``mediavault_rate_limit_decisions_total``, by the layer that made it (``burst``, ``sustained``, or
``redis_down`` for the policy's) and its outcome (``allowed`` or ``refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.db.pool import DATABASE_ERRORS
from mediavault.domain.accounts import Accounts
from mediavault.domain.rate_limit_config import RateLimitConfig

log = logging.getLogger(__name__)

WRITES = frozenset({
    "StorageService/BeginUpload", "StorageService/FinalizeUpload", "StorageService/FailUpload",
    "StorageService/UploadContent", "StorageService/PresignUploadParts", "MediaService/DeleteMedia", "MediaService/SaveMedia",
    "MediaService/ReprocessMedia", "MediaService/RecordEvents", "tus/PATCH", "tus/DELETE",
})
_BUCKETS_KEPT = 100_000
# How long a refused call waits for the automatic freeze it triggers; past it the refusal is
# answered and the freeze is tried again at the next refusal.
AUTO_FREEZE_WAIT_SECONDS = 1.0
# How long a reload waits for PostgreSQL; past it the reload is given up, the limits and frozen
# accounts it had kept, and tried again at the next period. A PostgreSQL that hangs would otherwise
# stall the reloads until the TCP connection drops.
RELOAD_WAIT_SECONDS = 2.0

# GCRA: every allowed call pushes the theoretical arrival time (TAT) one emission interval
# (an hour / limit) further; a call is allowed while TAT - now stays within the burst
# tolerance, which here is the whole hourly limit.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance - interval
if now < allow_at then
    return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, math.floor((tolerance + interval - (new_tat - now)) / interval), new_tat - now, 0}
"""


@dataclass(frozen=True)
class Limit:
    per_hour: int
    burst_per_second: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after_seconds: int
    layer: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = [
            ("ratelimit-limit", str(self.limit)),
            ("ratelimit-remaining", str(self.remaining)),
            ("ratelimit-reset", str(self.reset_seconds)),
        ]
        if not self.allowed:
            pairs.append(("retry-after", str(self.retry_after_seconds)))
        return tuple(pairs)


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = capacity
        self.updated = now


class RateLimiter:
    def __init__(
        self,
        redis: Redis | None,
        config: RateLimitConfig | None,
        accounts: Accounts | None = None,
        *,
        redis_down_policy: str = "reads-open",
        trusted_proxies: tuple[str, ...] = (),
        auto_freeze_refusals: int = 0,
        auto_freeze_window_seconds: int = 3600,
    ) -> None:
        self.redis = redis
        self.config = config
        self.accounts = accounts
        self.redis_down_policy = redis_down_policy
        self.trusted_proxies = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)
        self.auto_freeze_refusals = auto_freeze_refusals
        self.auto_freeze_window_seconds = auto_freeze_window_seconds
        self.limits: dict[tuple[str, str], Limit] = {}
        self.frozen: frozenset[str] = frozenset()
        # The accounts whose automatic freeze this process is making: their other refusals meanwhile
        # are answered at once rather than each waiting for a freeze of its own.
        self._freezing: set[str] = set()
        self._buckets: OrderedDict[tuple[str, str, str], _Bucket] = OrderedDict()
        # Loads the script on first use and again after Redis lost its script cache.
        self._gcra = redis.register_script(_GCRA) if redis is not None else None

    async def reload(self) -> None:
        """Reads the limits and the frozen accounts; called at start-up and every few seconds.

        TimeoutError when PostgreSQL has not answered within RELOAD_WAIT_SECONDS.
        """
        if self.config is None:
            return
        snapshot = await self.config.load(RELOAD_WAIT_SECONDS)
        self.limits = {(c.method, c.scope): Limit(c.per_hour, c.burst_per_second) for c in snapshot.limits}
        self.frozen = snapshot.frozen

    async def run_reloads(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.reload()
            except (*DATABASE_ERRORS, TimeoutError):
                log.warning("rate limit config reload failed; keeping the previous one", exc_info=True)

    def limit_for(self, method: str, scope: str) -> Limit | None:
        return self.limits.get((method, scope)) or self.limits.get(("*", scope))

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The caller's address: the peer, or, when the peer is a trusted proxy, the last
        x-forwarded-for hop that is not one. Each proxy appends the address it was called
        from, so hops left of the last untrusted one are whatever the client wrote."""
        address = _unmapped(_peer_address(peer))
        if not forwarded_for or not self._trusted(address):
            return address
        for hop in reversed(forwarded_for.split(",")):
            address = _unmapped(hop.strip()) or address
            if not self._trusted(address):
                break
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    async def check(self, method: str, subject: str, scope: str) -> Decision | None:
        """None when the caller is not limited for this method (exempt roles without own limits)."""
        limit = self.limit_for(method, scope)
        if limit is None:
            return None
        burst = self._burst(scope, method, subject, limit)
        if burst is not None:
            metrics.RATE_LIMIT_DECISIONS.labels(method, "burst", "refused").inc()
            return burst
        decision = await self._sustained(scope, method, subject, limit)
        metrics.RATE_LIMIT_DECISIONS.labels(method, decision.layer, "allowed" if decision.allowed else "refused").inc()
        # A frozen account's refusals could freeze nothing more.
        if not decision.allowed and self.auto_freeze_refusals and scope == "user" and subject not in self.frozen:
            await self._count_refusal(subject)
        return decision

    # The scope is part of every key: an anonymous caller's subject is an address, free text
    # behind a proxy, and must never name a user's budget.
    def _burst(self, scope: str, method: str, subject: str, limit: Limit) -> Decision | None:
        now = time.monotonic()
        key = (scope, method, subject)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(limit.burst_per_second, now)
            if len(self._buckets) > _BUCKETS_KEPT:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(limit.burst_per_second, bucket.tokens + (now - bucket.updated) * limit.burst_per_second)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        wait = (1 - bucket.tokens) / limit.burst_per_second
        return Decision(False, limit.burst_per_second, 0, 1, max(1, math.ceil(wait)), "burst")

    async def _sustained(self, scope: str, method: str, subject: str, limit: Limit) -> Decision:
        interval_ms = 3_600_000 / limit.per_hour
        tolerance_ms = interval_ms * (limit.per_hour - 1)
        key = f"rl:{scope}:{method}:{subject}"
        try:
            allowed, remaining, reset_ms, retry_ms = await self._eval(key, interval_ms, tolerance_ms)
        except (RedisError, OSError):
            return self._redis_down(method, limit)
        return Decision(
            bool(allowed), limit.per_hour, int(remaining), math.ceil(reset_ms / 1000),
            max(1, math.ceil(retry_ms / 1000)) if not allowed else 0, "sustained",
        )

    async def _eval(self, key: str, interval_ms: float, tolerance_ms: float) -> list[int]:
        if self._gcra is None:
            raise RedisError("no Redis configured")
        result: list[int] = await self._gcra(keys=[key], args=[interval_ms, tolerance_ms])
        return result

    def _redis_down(self, method: str, limit: Limit) -> Decision:
        refuse = self.redis_down_policy == "closed" or (self.redis_down_policy == "reads-open" and method in WRITES)
        metrics.REDIS_FALLBACKS.labels("rate_limit").inc()
        return Decision(not refuse, limit.per_hour, 0, 1, 1 if refuse else 0, "redis_down")

    async def _count_refusal(self, user_id: str) -> None:
        if self.redis is None:
            return
        key = f"rl:refusals:{user_id}"
        try:
            refusals = await self.redis.incr(key)
            if refusals == 1:
                await self.redis.expire(key, self.auto_freeze_window_seconds)
        except (RedisError, OSError):
            return
        # At or past the threshold: a freeze that PostgreSQL failed is tried again at the next refusal.
        if refusals < self.auto_freeze_refusals or self.accounts is None or user_id in self._freezing:
            return
        reason = f"automatic: {refusals} rate-limit refusals within {self.auto_freeze_window_seconds} s"
        self._freezing.add(user_id)
        try:
            # An operator may have frozen it since the last reload, here or in another process.
            frozen_now = await self.accounts.freeze_automatically(user_id, reason, AUTO_FREEZE_WAIT_SECONDS)
        except (*DATABASE_ERRORS, TimeoutError):
            # The call is answered the refusal it earned, not the database's fault.
            log.warning("automatic freeze failed; tried again at the next refusal", extra={"user_id": user_id}, exc_info=True)
            return
        finally:
            self._freezing.discard(user_id)
        if frozen_now:
            log.warning("account frozen automatically", extra={"user_id": user_id, "refusals": refusals})
        self.frozen = self.frozen | {user_id}
        # Counted afresh from here: an account an operator unfreezes is frozen again only after
        # as many new refusals, not at its next one.
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(key)


def _unmapped(address: str) -> str:
    """An IPv4 address written IPv4-mapped ("::ffff:10.0.0.5") as itself: a dual-stack listener
    sees IPv4 clients so (aiohttp's request.remote; gRPC's peer does not), and TRUSTED_PROXIES'
    IPv4 networks, and the budgets kept per address, must take it as the IPv4 address it is."""
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped else address


def _peer_address(peer: str) -> str:
    # grpc peers look like "ipv4:1.2.3.4:5678" or "ipv6:[::1]:5678".
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer
