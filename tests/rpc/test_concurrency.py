"""The quota invariant and payment idempotency under real concurrency, decided by PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mediavault.domain import ledger
from mediavault.storage.v1 import storage_pb2 as pb
from tests.helpers import error_info

GiB = 1024**3


# Run straight to PostgreSQL and through PgBouncer in transaction mode (tests/conftest.py: stack).
@pytest.fixture
def pool(stack):
    return stack.pool


@pytest.fixture
def storage(stack):
    return stack.storage


async def watch_invariant(pool, user_id: str, stop: asyncio.Event, seen: list[tuple[int, int, int]]) -> None:
    while not stop.is_set():
        row = await pool.fetchrow("SELECT quota_bytes, used_bytes, reserved_bytes FROM accounts WHERE user_id = $1", user_id)
        if row is not None:
            seen.append(tuple(row))
        await asyncio.sleep(0)


async def test_200_concurrent_begins_for_three_times_the_quota(storage, auth, user_id, pool):
    md = auth(user_id)
    available = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary.available_bytes
    assert available == GiB
    size = 3 * available // 200
    fits = available // size

    stop = asyncio.Event()
    seen: list[tuple[int, int, int]] = []
    watcher = asyncio.create_task(watch_invariant(pool, user_id, stop, seen))
    request = pb.BeginUploadRequest(filename="big.jpg", content_type="image/jpeg", size_bytes=size)
    results = await asyncio.gather(*(storage.BeginUpload(request, metadata=md) for _ in range(200)), return_exceptions=True)
    stop.set()
    await watcher

    succeeded = [r for r in results if isinstance(r, pb.BeginUploadResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(succeeded) == fits == 66
    assert len(refused) == 200 - fits
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).reason == "STORAGE_LIMIT_REACHED"
    assert len({r.upload.upload_id for r in succeeded}) == fits

    assert len(seen) > 1
    for quota, used, reserved in seen:
        assert reserved >= 0
        assert used >= 0
        assert used + reserved <= quota
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.reserved_bytes == fits * size
    assert summary.pending_uploads == fits
    assert await ledger.audit(pool) == []


async def test_100_concurrent_deliveries_of_one_payment_credit_once(storage, auth, user_id, pool):
    billing = auth("stripe-webhook", "billing")
    request = pb.AddStorageCreditsRequest(
        user_id=user_id,
        provider=pb.PAYMENT_PROVIDER_STRIPE,
        payment_reference=f"pi_{user_id}",
        credit_bytes=5 * GiB,
        amount_minor=499,
        currency="USD",
    )
    results = await asyncio.gather(*(storage.AddStorageCredits(request, metadata=billing) for _ in range(100)))
    assert sum(not r.already_processed for r in results) == 1
    assert len({r.purchase.purchase_id for r in results}) == 1
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert summary.quota_bytes == GiB + 5 * GiB
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'purchase'", user_id) == 1

    for field, value in (("credit_bytes", 6 * GiB), ("amount_minor", 500), ("currency", "EUR"), ("user_id", user_id + "-x")):
        mismatched = pb.AddStorageCreditsRequest()
        mismatched.CopyFrom(request)
        setattr(mismatched, field, value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await storage.AddStorageCredits(mismatched, metadata=billing)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS, field
        assert error_info(refused.value).reason == "IDEMPOTENCY_CONFLICT", field
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert summary.quota_bytes == 6 * GiB
    assert await pool.fetchval("SELECT count(*) FROM purchases WHERE user_id = $1", user_id + "-x") == 0
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user_id + "-x") == 0
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1", user_id + "-x") == 0
    assert await ledger.audit(pool) == []


async def test_concurrent_deliveries_of_one_payment_for_several_users_credit_one_and_make_no_other_account(storage, auth, user_id, pool):
    billing = auth("solana-webhook", "billing")
    users = [f"{user_id}-{i}" for i in range(4)]
    requests = [
        pb.AddStorageCreditsRequest(
            user_id=u, provider=pb.PAYMENT_PROVIDER_SOLANA, payment_reference=f"sig-{user_id}",
            credit_bytes=(i + 1) * GiB, amount_minor=i, currency="SOL",
        )
        for i, u in enumerate(users)
        for _ in range(25)
    ]
    results = await asyncio.gather(*(storage.AddStorageCredits(r, metadata=billing) for r in requests), return_exceptions=True)
    credited = [r for r in results if isinstance(r, pb.AddStorageCreditsResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(credited) + len(refused) == 100
    assert sum(not r.already_processed for r in credited) == 1
    (winner,) = {r.purchase.user_id for r in credited}
    assert len(credited) == 25
    assert {(e.code(), error_info(e).reason) for e in refused} == {(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")}

    accounts = await pool.fetch("SELECT user_id, quota_bytes FROM accounts WHERE user_id = ANY($1)", users)
    credit = (users.index(winner) + 1) * GiB
    assert [tuple(a) for a in accounts] == [(winner, GiB + credit)]
    entries = await pool.fetch("SELECT user_id, kind, quota_delta FROM ledger_entries WHERE user_id = ANY($1) ORDER BY entry_id", users)
    assert [tuple(e) for e in entries] == [(winner, "grant", GiB), (winner, "purchase", credit)]
    assert [m for m in await ledger.audit(pool) if m.user_id in users] == []


async def test_same_reference_from_another_provider_is_another_payment(storage, auth, user_id):
    billing = auth("billing-bot", "billing")
    for provider in (pb.PAYMENT_PROVIDER_STRIPE, pb.PAYMENT_PROVIDER_SOLANA):
        response = await storage.AddStorageCredits(
            pb.AddStorageCreditsRequest(
                user_id=user_id, provider=provider, payment_reference=f"ref-{user_id}", credit_bytes=1000, currency="USD"
            ),
            metadata=billing,
        )
        assert not response.already_processed
    assert response.summary.quota_bytes == GiB + 2000


async def test_add_credits_needs_billing_or_admin(storage, auth, user_id):
    request = pb.AddStorageCreditsRequest(
        user_id=user_id, provider=pb.PAYMENT_PROVIDER_MANUAL, payment_reference=f"gift-{user_id}", credit_bytes=1, currency="USD"
    )
    for roles in (("user",), ("service",)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await storage.AddStorageCredits(request, metadata=auth(user_id, *roles))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, roles
    admin = await storage.AddStorageCredits(request, metadata=auth("ops", "admin"))
    assert admin.purchase.provider == pb.PAYMENT_PROVIDER_MANUAL


async def test_list_purchases_pages_newest_first_without_repeats(storage, auth, user_id):
    billing = auth("billing-bot", "billing")
    for i in range(7):
        await storage.AddStorageCredits(
            pb.AddStorageCreditsRequest(
                user_id=user_id, provider=pb.PAYMENT_PROVIDER_SOLANA, payment_reference=f"sig-{user_id}-{i}",
                credit_bytes=1000 + i, amount_minor=i, currency="SOL",
            ),
            metadata=billing,
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await storage.ListPurchases(pb.ListPurchasesRequest(page_size=3, page_token=token), metadata=auth(user_id))
        seen.extend(p.payment_reference for p in page.purchases)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"sig-{user_id}-{i}" for i in reversed(range(7))]

    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await storage.ListPurchases(pb.ListPurchasesRequest(page_token="garbage!"), metadata=auth(user_id))
    assert forged.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as someone_elses:
        await storage.ListPurchases(pb.ListPurchasesRequest(user_id=user_id), metadata=auth("someone"))
    assert someone_elses.value.code() == grpc.StatusCode.PERMISSION_DENIED
