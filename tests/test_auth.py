from __future__ import annotations

import time

import grpc
import jwt
import pytest

from mediavault.auth import Authenticator, Principal
from mediavault.errors import PermissionDenied, Unauthenticated
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import JWT_SECRET

LEEWAY = 30


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def token_at(iat: float, exp: float) -> str:
    return jwt.encode({"sub": "u1", "roles": ["user"], "iat": int(iat), "exp": int(exp)}, JWT_SECRET, algorithm="HS256")


def test_roundtrip_keeps_known_roles_only():
    auth = Authenticator(JWT_SECRET)
    token = jwt.encode({"sub": "u1", "roles": ["admin", "root"], "exp": 2**40}, JWT_SECRET, algorithm="HS256")
    assert auth.authenticate(bearer(token)) == Principal("u1", frozenset({"admin"}))


@pytest.mark.parametrize(
    "claims",
    [
        {"roles": ["user"], "exp": 2**40},
        {"sub": "u", "roles": ["user"]},
        {"sub": "", "exp": 2**40},
        {"sub": "u", "roles": 5, "exp": 2**40},
        # A role that is not a string was a TypeError, answered INTERNAL.
        {"sub": "u", "roles": [["admin"]], "exp": 2**40},
        {"sub": "u", "roles": [{"admin": True}], "exp": 2**40},
    ],
)
def test_incomplete_claims_are_rejected(claims):
    token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        Authenticator(JWT_SECRET).authenticate(bearer(token))


def test_algorithm_none_is_rejected():
    token = jwt.encode({"sub": "u", "exp": 2**40, "roles": ["admin"]}, None, algorithm="none")
    with pytest.raises(Unauthenticated):
        Authenticator(JWT_SECRET).authenticate(bearer(token))


def test_short_secret_is_refused():
    with pytest.raises(ValueError, match="MEDIAVAULT_JWT_SECRET must be at least"):
        Authenticator("short")


def test_privileged_access_to_other_accounts():
    user = Principal("u1", frozenset({"user"}))
    assert user.user_or_self("", "admin") == "u1"
    assert user.user_or_self("u1", "admin") == "u1"
    with pytest.raises(PermissionDenied):
        user.user_or_self("u2", "admin")
    assert Principal("svc", frozenset({"service"})).user_or_self("u2", "admin", "service") == "u2"


def test_remembered_token_still_expires():
    auth = Authenticator(JWT_SECRET, leeway_seconds=0)
    token = jwt.encode({"sub": "u1", "roles": ["user"], "exp": time.time() + 1}, JWT_SECRET, algorithm="HS256")
    assert auth.authenticate(bearer(token)).user_id == "u1"
    time.sleep(1.1)
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(token))


def test_a_bad_token_is_never_remembered_as_good():
    auth = Authenticator(JWT_SECRET)
    forged = jwt.encode({"sub": "u1", "exp": 2**40}, "another-secret-of-at-least-32-bytes!", algorithm="HS256")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bearer(forged))


def test_an_issuer_clock_ahead_by_less_than_the_leeway_is_accepted():
    auth = Authenticator(JWT_SECRET, leeway_seconds=LEEWAY)
    now = time.time()
    assert auth.authenticate(bearer(token_at(now + 5, now + 3600))).user_id == "u1"
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.authenticate(bearer(token_at(now + LEEWAY + 30, now + 3600)))


def test_a_token_expired_within_the_leeway_is_accepted_and_beyond_it_refused():
    auth = Authenticator(JWT_SECRET, leeway_seconds=LEEWAY)
    now = time.time()
    assert auth.authenticate(bearer(token_at(now - 3600, now - 10))).user_id == "u1"
    with pytest.raises(Unauthenticated, match="token expired"):
        auth.authenticate(bearer(token_at(now - 3600, now - LEEWAY - 10)))


def test_a_remembered_token_expires_with_its_leeway():
    auth = Authenticator(JWT_SECRET, leeway_seconds=2)
    exp = int(time.time())  # expired without the leeway
    token = token_at(exp - 3600, exp)
    assert auth.authenticate(bearer(token)).user_id == "u1"
    time.sleep(max(0.0, exp + 2.05 - time.time()))
    with pytest.raises(Unauthenticated, match="token expired"):
        auth.authenticate(bearer(token))


async def test_the_server_allows_its_configured_clock_skew(storage):
    now = time.time()
    ahead = token_at(now + 5, now + 3600)
    summary = await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=bearer(ahead))
    assert summary.summary.quota_bytes > 0
    too_far = token_at(now + LEEWAY + 30, now + 3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=bearer(too_far))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
