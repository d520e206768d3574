"""What clients can send wrong, through the real server: every mistake is a client error, never INTERNAL."""

from __future__ import annotations

import base64
import json
import math
import string
import time
import uuid
from datetime import UTC, datetime

import grpc
import jwt
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from mediavault.config import GiB
from mediavault.domain import ledger
from mediavault.domain.pages import PageTokens
from mediavault.limits import UUID_VIOLATION
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import JWT_SECRET
from tests.helpers import bad_request, error_info, fake_jpeg, other_uuid_spellings, upload


@pytest.mark.parametrize("subject", ["a\x00b", "\x00", "", "u" * 129])
async def test_a_signed_token_whose_subject_no_account_can_have_is_unauthenticated(storage, media, subject):
    token = jwt.encode({"sub": subject, "roles": ["user"], "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
    md = (("authorization", f"Bearer {token}"),)
    calls = (
        storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md),
        media.RecordEvents(mpb.RecordEventsRequest(events=[mpb.UsageEvent()]), metadata=md),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "UNAUTHORIZED"


def _unsigned(value: object) -> str:
    """A token as the service once made them: base64 of JSON, which anyone could write."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


FORGED_TOKENS = {
    "garbage": "not-a-token",
    "date-before-year-1-in-utc": _unsigned(["0001-01-01T00:00:00+14:00", str(uuid.uuid4())]),
    "date-after-year-9999-in-utc": _unsigned(["9999-12-31T23:59:59.999999-14:00", str(uuid.uuid4())]),
    "deeply-nested-json": base64.urlsafe_b64encode(b"[" * 100_000).decode(),
    "nested-json": _unsigned([[[[[[]]]]], {"a": [1]}]),
    "wrong-types": _unsigned([1, 2]),
    "object": _unsigned({"created_at": "2026-01-01", "id": 1}),
    "nulls": _unsigned([None, None]),
    "feed-token-signed-with-another-key": PageTokens(b"another key").encode("feed", "u", datetime.now(UTC), uuid.uuid4()),
    "purchases-token-signed-with-another-key": PageTokens(b"another key").encode("purchases", "u", datetime.now(UTC), uuid.uuid4()),
    "right-length-letters": "A" * 60,
    "right-length-padding": "=" * 60,
    "right-length-non-ascii": "\u00e9" * 60,
    "right-length-nul": "\x00" * 60,
}


def _assert_bad_page_token(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert [v.field for v in bad_request(error).field_violations] == ["page_token"]


@pytest.mark.parametrize("token", FORGED_TOKENS.values(), ids=FORGED_TOKENS.keys())
async def test_a_page_token_the_service_did_not_issue_is_invalid_argument(storage, media, auth, user_id, token):
    md = auth(user_id)
    for call in (
        media.ListFeed(mpb.ListFeedRequest(page_token=token), metadata=md),
        storage.ListPurchases(pb.ListPurchasesRequest(page_token=token), metadata=md),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        _assert_bad_page_token(caught.value)


def _altered(token: str) -> list[str]:
    """Every spelling of the token with one character changed to another of the base64url alphabet."""
    alphabet = string.ascii_letters + string.digits + "-_"
    return [token[:i] + alphabet[(alphabet.index(c) + 1) % len(alphabet)] + token[i + 1 :] for i, c in enumerate(token)]


async def test_issued_page_tokens_page_on_and_any_change_to_them_is_refused(storage, media, auth, user_id):
    md = auth(user_id)
    for size in (900, 901, 902):
        await upload(storage, md, fake_jpeg(size))
    billing = auth("billing-bot", "billing")
    for n in range(3):
        await storage.AddStorageCredits(
            pb.AddStorageCreditsRequest(
                user_id=user_id, provider=pb.PAYMENT_PROVIDER_MANUAL, payment_reference=f"{user_id}-{n}",
                credit_bytes=1000, currency="USD",
            ),
            metadata=billing,
        )
    feed_token = (await media.ListFeed(mpb.ListFeedRequest(page_size=2), metadata=md)).next_page_token
    purchases_token = (await storage.ListPurchases(pb.ListPurchasesRequest(page_size=2), metadata=md)).next_page_token
    assert len((await media.ListFeed(mpb.ListFeedRequest(page_size=2, page_token=feed_token), metadata=md)).media) == 1
    rest = await storage.ListPurchases(pb.ListPurchasesRequest(page_size=2, page_token=purchases_token), metadata=md)
    assert len(rest.purchases) == 1

    calls = [media.ListFeed(mpb.ListFeedRequest(page_token=t), metadata=md) for t in (*_altered(feed_token), purchases_token)]
    calls += [
        storage.ListPurchases(pb.ListPurchasesRequest(page_token=t), metadata=md)
        for t in (*_altered(purchases_token), feed_token, feed_token[:-4], purchases_token + "AAAA")
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        _assert_bad_page_token(caught.value)


async def test_a_page_token_of_another_users_list_is_refused(storage, media, auth, user_id):
    other = f"{user_id}-other"
    billing = auth("billing-bot", "billing")
    for owner in (user_id, other):
        for size in (900, 901, 902):
            await upload(storage, auth(owner), fake_jpeg(size))
        for n in range(3):
            await storage.AddStorageCredits(
                pb.AddStorageCreditsRequest(
                    user_id=owner, provider=pb.PAYMENT_PROVIDER_MANUAL, payment_reference=f"{owner}-{n}",
                    credit_bytes=1000, currency="USD",
                ),
                metadata=billing,
            )
    theirs = auth(other)
    feed_token = (await media.ListFeed(mpb.ListFeedRequest(page_size=2), metadata=theirs)).next_page_token
    purchases_token = (await storage.ListPurchases(pb.ListPurchasesRequest(page_size=2), metadata=theirs)).next_page_token
    assert feed_token
    assert purchases_token
    md = auth(user_id)
    admin = auth("admin-bot", "admin")
    calls = [
        media.ListFeed(mpb.ListFeedRequest(page_token=feed_token), metadata=md),
        storage.ListPurchases(pb.ListPurchasesRequest(page_token=purchases_token), metadata=md),
        # A caller who may read both lists still pages each with its own tokens only.
        media.ListFeed(mpb.ListFeedRequest(user_id=user_id, page_token=feed_token), metadata=admin),
        storage.ListPurchases(pb.ListPurchasesRequest(user_id=user_id, page_token=purchases_token), metadata=admin),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        _assert_bad_page_token(caught.value)
    page = await media.ListFeed(mpb.ListFeedRequest(user_id=other, page_token=feed_token), metadata=admin)
    assert len(page.media) == 1


async def test_an_id_spelt_otherwise_than_the_service_writes_it_is_invalid_argument_even_when_it_names_media(
    storage, media, auth, user_id
):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1700))
    for name, spelling in other_uuid_spellings(done.media_id).items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await media.GetMedia(mpb.GetMediaRequest(media_id=spelling), metadata=md)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert [(v.field, v.description) for v in bad_request(caught.value).field_violations] == [("media_id", UUID_VIOLATION)]
    got = await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id.upper()), metadata=md)
    assert got.media.media_id == done.media_id


def _bad_events(media_id: str) -> list[mpb.UsageEvent]:
    """One event per way a client can get an event wrong; each must be rejected alone."""
    click = mpb.USAGE_EVENT_TYPE_CLICK
    bad = [
        mpb.UsageEvent(event_type=click, media_id=media_id, surface="fe\x00ed"),
        mpb.UsageEvent(event_type=click, media_id=media_id, surface="s" * 65),
        mpb.UsageEvent(event_type=click, media_id=media_id + "\x00"),
        mpb.UsageEvent(event_type=click, media_id="not-a-uuid"),
        *(mpb.UsageEvent(event_type=click, media_id=spelling) for spelling in other_uuid_spellings(media_id).values()),
        mpb.UsageEvent(event_type=mpb.USAGE_EVENT_TYPE_UNSPECIFIED, media_id=media_id),
        mpb.UsageEvent(event_type=99, media_id=media_id),
    ]
    for meta in (
        {"position": math.nan},
        {"position": math.inf},
        {"client": {"ratio": -math.inf}},
        {"list": [1, math.nan]},
        {"note": "a\x00b"},
        {"ke\x00y": 1},
        {"client": {"os\x00": "ios"}},
    ):
        event = mpb.UsageEvent(event_type=click, media_id=media_id)
        event.meta.update(meta)
        bad.append(event)
    for seconds, nanos in (
        (2**62, 0),
        (-(2**62), 0),
        (253402300799, 999_999_999),
        (-62135596800, 0),
        (2**63 - 1, 0),
        (-(2**63), 0),
        (int(time.time()) + 8 * 86_400, 0),
        (0, -5),
    ):
        bad.append(mpb.UsageEvent(event_type=click, media_id=media_id, occurred_at=Timestamp(seconds=seconds, nanos=nanos)))
    return bad


async def test_each_bad_event_is_rejected_alone_and_the_good_ones_are_stored(storage, media, auth, user_id, pool):
    md = auth(user_id)
    done = await upload(storage, md, fake_jpeg(1700))
    bad = _bad_events(done.media_id)
    good = [
        mpb.UsageEvent(event_type=mpb.USAGE_EVENT_TYPE_IMPRESSION, media_id=done.media_id, surface="feed"),
        mpb.UsageEvent(
            event_type=mpb.USAGE_EVENT_TYPE_LIKE,
            media_id=done.media_id,
            occurred_at=Timestamp(seconds=int(time.time()) - 86_400, nanos=999_999_999),
        ),
        mpb.UsageEvent(event_type=mpb.USAGE_EVENT_TYPE_SHARE, media_id=done.media_id, surface="s" * 64),
    ]
    good[0].meta.update({"position": 1e308, "text": "\u00e9\U0001f600", "list": [1, "x", None, True]})
    batch = [event for pair in zip(bad, good * len(bad), strict=False) for event in pair]
    result = await media.RecordEvents(mpb.RecordEventsRequest(events=batch), metadata=md)
    assert (result.accepted, result.rejected) == (len(bad), len(bad))

    stored = await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", user_id)
    assert stored == len(bad)
    item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
    assert (item.view_count, item.like_count, item.share_count) == tuple(
        sum(1 for e in batch[1::2] if e.event_type == kind)
        for kind in (mpb.USAGE_EVENT_TYPE_IMPRESSION, mpb.USAGE_EVENT_TYPE_LIKE, mpb.USAGE_EVENT_TYPE_SHARE)
    )
    metas = await pool.fetch("SELECT meta::text FROM usage_events WHERE user_id = $1 AND meta <> '{}'", user_id)
    assert {json.loads(r["meta"])["text"] for r in metas} == {"\u00e9\U0001f600"}


async def test_a_batch_of_a_million_events_is_refused_by_its_count_before_any_event_is_read(media, auth, user_id, pool):
    # Empty events, two bytes each: the server once made a domain event of each before the
    # domain counted them, holding its event loop (every other call) for seconds.
    one = mpb.RecordEventsRequest(events=[mpb.UsageEvent()]).SerializeToString()
    request = mpb.RecordEventsRequest.FromString(one * 1_000_000)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media.RecordEvents(request, metadata=auth(user_id))
    elapsed = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in bad_request(caught.value).field_violations] == [("events", "must hold 1-500 events")]
    assert elapsed < 1, f"refused after {elapsed:.2f} s"
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", user_id) == 0


NUL = "must not contain NUL characters"
FREE_QUOTA = GiB
BEGIN = {"filename": "a.jpg", "content_type": "image/jpeg", "size_bytes": 100}
CREDIT = {"provider": pb.PAYMENT_PROVIDER_STRIPE, "credit_bytes": 1000, "currency": "USD"}

# (rpc, request fields, the violated field, why); "{owner}" and "{upload}" are filled in per test.
REFUSED = {
    "idempotency-key-with-nul": ("BeginUpload", {**BEGIN, "idempotency_key": "k\x00"}, "idempotency_key", NUL),
    "idempotency-key-too-long": ("BeginUpload", {**BEGIN, "idempotency_key": "k" * 129}, "idempotency_key", "must be at most 128 characters"),
    "filename-too-long": ("BeginUpload", {**BEGIN, "filename": "f" * 256}, "filename", "must be at most 255 characters"),
    **{
        f"filename-with-{name}": ("BeginUpload", {**BEGIN, "filename": f"a{char}b.jpg"}, "filename", "must be 1-255 printable characters")
        for name, char in (
            ("newline", "\n"), ("del", "\x7f"), ("c1-control", "\x85"), ("line-separator", "\u2028"),
            ("paragraph-separator", "\u2029"), ("private-use", "\ue000"), ("right-to-left-override", "\u202e"),
            ("left-to-right-mark", "\u200e"), ("right-to-left-isolate", "\u2067"), ("arabic-letter-mark", "\u061c"),
        )
    },
    "fail-reason-with-nul": ("FailUpload", {"upload_id": "{upload}", "reason": "gave up\x00"}, "reason", NUL),
    "fail-reason-too-long": ("FailUpload", {"upload_id": "{upload}", "reason": "r" * 501}, "reason", "must be at most 500 characters"),
    "upload-id-with-nul": ("GetUpload", {"upload_id": "{upload}\x00"}, "upload_id", UUID_VIOLATION),
    "upload-id-in-braces": ("FinalizeUpload", {"upload_id": "{{upload}}"}, "upload_id", UUID_VIOLATION),
    "payment-reference-with-nul": (
        "AddStorageCredits", {**CREDIT, "user_id": "{owner}", "payment_reference": "pi_\x00"}, "payment_reference", NUL,
    ),
    "payment-reference-too-long": (
        "AddStorageCredits", {**CREDIT, "user_id": "{owner}", "payment_reference": "p" * 257}, "payment_reference",
        "must be 1-256 characters",
    ),
    "credit-user-with-nul": ("AddStorageCredits", {**CREDIT, "user_id": "u\x00", "payment_reference": "{upload}"}, "user_id", NUL),
    "credit-user-too-long": (
        "AddStorageCredits", {**CREDIT, "user_id": "u" * 129, "payment_reference": "{upload}"}, "user_id", "must be 1-128 characters",
    ),
    "credit-bytes-largest-int64": (
        "AddStorageCredits", {**CREDIT, "user_id": "{owner}", "payment_reference": "{upload}", "credit_bytes": 2**63 - 1},
        "credit_bytes", f"must be at most {2**50}",
    ),
    "currency-with-nul": ("AddStorageCredits", {**CREDIT, "user_id": "{owner}", "payment_reference": "{upload}", "currency": "US\x00"},
                          "currency", "must be an upper-case currency code such as USD or SOL"),
    "currency-with-newline": ("AddStorageCredits", {**CREDIT, "user_id": "{owner}", "payment_reference": "{upload}", "currency": "USD\n"},
                              "currency", "must be an upper-case currency code such as USD or SOL"),
    "summary-user-with-nul": ("GetStorageSummary", {"user_id": "{owner}\x00"}, "user_id", NUL),
    "summary-user-too-long": ("GetStorageSummary", {"user_id": "u" * 129}, "user_id", "must be at most 128 characters"),
    "purchases-user-with-nul": ("ListPurchases", {"user_id": "\x00"}, "user_id", NUL),
    "purchases-user-too-long": ("ListPurchases", {"user_id": "u" * 129}, "user_id", "must be at most 128 characters"),
    "purchases-page-size-negative": ("ListPurchases", {"page_size": -1}, "page_size", "must not be negative"),
    "freeze-user-with-nul": ("FreezeAccount", {"user_id": "{owner}\x00", "reason": "abuse"}, "user_id", NUL),
    "freeze-user-too-long": ("FreezeAccount", {"user_id": "u" * 129, "reason": "abuse"}, "user_id", "must be 1-128 characters"),
    "freeze-reason-with-nul": ("FreezeAccount", {"user_id": "{owner}", "reason": "abuse\x00"}, "reason", NUL),
    "unfreeze-user-with-nul": ("UnfreezeAccount", {"user_id": "{owner}\x00"}, "user_id", NUL),
    "feed-owner-with-nul": ("ListFeed", {"user_id": "{owner}\x00"}, "user_id", NUL),
    "feed-owner-too-long": ("ListFeed", {"user_id": "u" * 129}, "user_id", "must be at most 128 characters"),
    "feed-page-size-negative": ("ListFeed", {"page_size": -(2**31)}, "page_size", "must not be negative"),
    "media-id-with-nul": ("GetMedia", {"media_id": "\x00"}, "media_id", UUID_VIOLATION),
    **{
        f"media-id-{name}": ("GetMedia", {"media_id": spelling}, "media_id", UUID_VIOLATION)
        for name, spelling in other_uuid_spellings(str(uuid.uuid4())).items()
    },
}


@pytest.mark.parametrize(("rpc", "fields", "field", "why"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_field_breaking_its_declared_rule_is_invalid_argument_naming_the_field_and_why(
    storage, media, auth, user_id, pool, rpc, fields, field, why
):
    # An admin, so that every user id field is read; the owner's pending upload, so that a
    # request would reach SQL if nothing stopped it.
    admin = auth("ops", "admin")
    pending = await storage.BeginUpload(pb.BeginUploadRequest(**BEGIN), metadata=auth(user_id))
    values = {
        k: v.replace("{owner}", user_id).replace("{upload}", pending.upload.upload_id) if isinstance(v, str) else v
        for k, v in fields.items()
    }
    stub = storage if hasattr(storage, rpc) else media
    module = pb if stub is storage else mpb
    request = getattr(module, f"{rpc}Request")(**values)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request, metadata=auth(user_id) if rpc in ("BeginUpload", "FailUpload", "GetUpload") else admin)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in bad_request(caught.value).field_violations] == [(field, why)]
    assert [m for m in await ledger.audit(pool) if m.user_id == user_id] == []
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert (summary.quota_bytes, summary.reserved_bytes, summary.frozen) == (FREE_QUOTA, 100, False)


@pytest.mark.parametrize(
    "filename",
    ["Fam\u00edlia \U0001f468\u200d\U0001f469\u200d\U0001f467.jpg", "\u5199\u771f\u00a0\u0031.jpg", "\u0635\u0648\u0631\u0629.jpg", "  padded.jpg  "],
    ids=["emoji-joiner-sequence", "cjk-with-no-break-space", "right-to-left-script", "padded"],
)
async def test_a_filename_in_any_script_is_kept_as_written(storage, auth, user_id, filename):
    begun = await storage.BeginUpload(pb.BeginUploadRequest(**{**BEGIN, "filename": filename}), metadata=auth(user_id))
    assert begun.upload.filename == filename.strip()


async def test_a_credit_that_would_take_a_quota_past_bigint_is_invalid_argument_and_changes_nothing(storage, auth, user_id, pool):
    billing = auth("billing-bot", "billing")
    md = auth(user_id)
    quota = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary.quota_bytes
    near_the_top = 2**63 - 2**49

    async def grant(new_quota: int, delta: int) -> None:
        await pool.execute("UPDATE accounts SET quota_bytes = $2 WHERE user_id = $1", user_id, new_quota)
        await pool.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ($1, 'grant', $2)", user_id, delta)

    await grant(near_the_top, near_the_top - quota)
    credit = pb.AddStorageCreditsRequest(
        user_id=user_id, provider=pb.PAYMENT_PROVIDER_STRIPE, payment_reference=f"pi_{user_id}", credit_bytes=2**50, currency="USD"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.AddStorageCredits(credit, metadata=billing)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert [v.field for v in bad_request(caught.value).field_violations] == ["credit_bytes"]
    assert (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary.quota_bytes == near_the_top
    assert await pool.fetchval("SELECT count(*) FROM purchases WHERE user_id = $1", user_id) == 0
    assert [m for m in await ledger.audit(pool) if m.user_id == user_id] == []


def _nested_meta(depth: int) -> bytes:
    """RecordEvents whose event meta nests Structs depth deep; past 50 the server's parser gives up."""
    request = mpb.RecordEventsRequest()
    event = request.events.add(event_type=mpb.USAGE_EVENT_TYPE_CLICK, media_id=str(uuid.uuid4()))
    struct = event.meta
    for _ in range(depth):
        struct = struct.fields["a"].struct_value
    return request.SerializeToString()


STORAGE_PATH = "/mediavault.storage.v1.StorageService/"
UNDECODABLE = {
    "invalid-utf8-in-a-string": (STORAGE_PATH + "GetStorageSummary", b"\x0a\x02\xff\xfe"),
    "truncated-field": (STORAGE_PATH + "GetUpload", b"\x0a\x24abc"),
    "garbage": (STORAGE_PATH + "BeginUpload", b"\xff\xff\xff\xff"),
    "meta-nested-past-the-parsers-depth": ("/mediavault.media.v1.MediaService/RecordEvents", _nested_meta(200)),
}


def _assert_undecodable(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert [v.field for v in bad_request(error).field_violations] == [""]


@pytest.mark.parametrize(("path", "raw"), UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_a_request_whose_bytes_do_not_decode_is_invalid_argument(channel, auth, user_id, path, raw):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(path)(raw, metadata=auth(user_id))
    _assert_undecodable(caught.value)


async def test_an_undecodable_message_in_an_upload_stream_is_invalid_argument_and_stores_nothing(channel, storage, auth, user_id):
    md = auth(user_id)
    pending = await storage.BeginUpload(pb.BeginUploadRequest(**BEGIN), metadata=md)
    first = pb.UploadContentRequest(upload_id=pending.upload.upload_id).SerializeToString()

    async def stream():
        yield first
        yield pb.UploadContentRequest(chunk=fake_jpeg(50)).SerializeToString()
        yield b"\x12\x10only-half"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary(STORAGE_PATH + "UploadContent")(stream(), metadata=md)
    _assert_undecodable(caught.value)
    upload = (await storage.GetUpload(pb.GetUploadRequest(upload_id=pending.upload.upload_id), metadata=md)).upload
    assert upload.state == pb.UPLOAD_STATE_PENDING
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.reserved_bytes, summary.used_bytes) == (100, 0)


async def test_an_event_whose_meta_holds_millions_of_values_is_stored_without_reading_them_all(channel, auth, user_id, pool):
    # Empty values, two bytes each, past the first three: the server once made a value of each
    # before the events domain kept the first MAX_META_KEYS, holding its event loop for a second.
    request = mpb.RecordEventsRequest()
    event = request.events.add(event_type=mpb.USAGE_EVENT_TYPE_CLICK, media_id=str(uuid.uuid4()))
    listed = event.meta.fields["list"].list_value
    listed.extend([1, 2, 3])
    listed.MergeFromString(b"\x0a\x00" * 4_000_000)
    raw = request.SerializeToString()
    started = time.perf_counter()
    answer = mpb.RecordEventsResponse.FromString(
        await channel.unary_unary("/mediavault.media.v1.MediaService/RecordEvents")(raw, metadata=auth(user_id)))
    elapsed = time.perf_counter() - started
    assert (answer.accepted, answer.rejected) == (1, 0)
    assert elapsed < 0.5, f"stored after {elapsed:.2f} s"
    assert json.loads(await pool.fetchval("SELECT meta::text FROM usage_events WHERE user_id = $1", user_id)) == {"list": [1, 2, 3]}
