"""The standing guard: generated requests to every RPC of both services, as the owner, a stranger and an admin.

Requests are built from the services' descriptors, so that a new RPC or field is fuzzed
without a change here. A third are valid-looking (each field from values a client would
send, the ids of a real scene), a third are valid but for one field, a third are hostile
throughout; what is not valid is what a careless or hostile client sends: NUL and astral
characters, strings far past every column, extreme integers, unknown enum values, random,
forged and altered page tokens, UUID-ish and non-UUID ids, broken and deep metadata.
Whatever arrives, the server answers with a status the client can act on (never INTERNAL
or UNKNOWN) carrying exactly one ErrorInfo, stays SERVING, and its books add up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediavault.domain import content_types, ledger
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.storage.v1 import storage_pb2 as pb
from tests.helpers import error_info, fake_jpeg, upload

SERVICES = (pb.DESCRIPTOR.services_by_name["StorageService"], mpb.DESCRIPTOR.services_by_name["MediaService"])
METHODS = [method for service in SERVICES for method in service.methods]
ROLES = {"owner": ("user",), "stranger": ("user",), "admin": ("admin",)}
EXAMPLES_PER_RPC = 100

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT = {FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1)}
INT_RANGES = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64), INT64),
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32), INT32),
    **UINT,
    FieldDescriptor.TYPE_FIXED32: UINT[FieldDescriptor.TYPE_UINT32],
    FieldDescriptor.TYPE_FIXED64: UINT[FieldDescriptor.TYPE_UINT64],
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2**31 - 1, -(2**31), 2**50, 2**50 + 1, 2**53 + 1, 2**63 - 1, -(2**63)) if low <= v <= high]
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, *edges]))


TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\u00e9", "\U0001f600", "\n", "\ufeff", "\u202e", "'; DROP TABLE accounts; --"]),
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["x", "\x00", "\u00e9", "\U0001f600"]),
        st.sampled_from([36, 37, 63, 64, 65, 127, 128, 129, 255, 256, 257, 499, 500, 501, 4096, 100_000]),
    ),
)
UUIDISH = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u).upper() + "}"),
    st.uuids().map(lambda u: f"urn:uuid:{u}"),
    st.uuids().map(lambda u: str(u)[:-1] + "\x00"),
    st.text(alphabet="0123456789abcdef-", min_size=30, max_size=40),
)
BASE64 = st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
NUMBERS = st.floats(allow_nan=True, allow_infinity=True)
JSONISH = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


@dataclass
class Scene:
    """What exists before the fuzzing: the three callers, their uploads, media, purchases and page tokens."""

    users: dict[str, str]
    metadata: dict[str, tuple[tuple[str, str], ...]]
    upload_ids: list[str]
    streams: dict[str, bytes]
    media_ids: list[str]
    page_tokens: list[str]
    now: int = field(default_factory=lambda: int(time.time()))


@pytest.fixture
async def scene(storage, media, auth) -> Scene:
    """A fresh scene for each RPC, so that one RPC's examples (deleting, failing, finalizing) leave the next its own."""
    run = uuid.uuid4().hex[:8]
    users = {role: f"fuzz-{role}-{run}" for role in ROLES}
    metadata = {role: auth(users[role], *roles) for role, roles in ROLES.items()}
    owner, stranger = metadata["owner"], metadata["stranger"]
    finalized = [await upload(storage, md, fake_jpeg(700 + i)) for i, md in enumerate((owner, owner, stranger))]
    streams = {}
    for size in range(600, 604):
        data = fake_jpeg(size)
        begun = await storage.BeginUpload(
            pb.BeginUploadRequest(
                filename="s.jpg", content_type="image/jpeg", size_bytes=size, sha256=hashlib.sha256(data).hexdigest()
            ),
            metadata=owner,
        )
        streams[begun.upload.upload_id] = data
    for n in range(2):
        await storage.AddStorageCredits(
            pb.AddStorageCreditsRequest(
                user_id=users["owner"], provider=pb.PAYMENT_PROVIDER_MANUAL, payment_reference=f"fuzz-{run}-{n}",
                credit_bytes=1000, currency="USD",
            ),
            metadata=metadata["admin"],
        )
    tokens = [
        (await media.ListFeed(mpb.ListFeedRequest(page_size=1), metadata=owner)).next_page_token,
        (await storage.ListPurchases(pb.ListPurchasesRequest(page_size=1), metadata=owner)).next_page_token,
    ]
    assert all(tokens)
    return Scene(
        users=users,
        metadata=metadata,
        upload_ids=[f.upload.upload_id for f in finalized] + list(streams),
        streams=streams,
        media_ids=[f.media_id for f in finalized],
        page_tokens=tokens,
    )


def _altered(token: str) -> st.SearchStrategy[str]:
    """The token with one character replaced, or cut short."""
    alphabet = string.ascii_letters + string.digits + "-_="
    replaced = st.builds(lambda i, c: token[:i] + c + token[i + 1 :], st.integers(0, len(token) - 1), st.sampled_from(alphabet))
    return replaced | st.integers(0, len(token) - 1).map(lambda n: token[:n])


def _unsigned_json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# What page tokens once were, base64 of JSON anyone could write: dates near the ends of the calendar, nesting.
FORGED_TOKENS = st.one_of(
    st.builds(
        lambda when, offset, item: _unsigned_json([f"{when.isoformat()}{offset}", str(item)]),
        st.datetimes(),
        st.sampled_from(["", "+14:00", "-14:00", "Z"]),
        st.uuids(),
    ),
    JSONISH.map(_unsigned_json),
    st.integers(1, 5000).map(lambda depth: base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode()),
)


def _nested_struct(depth: int) -> struct_pb2.Struct:
    """A Struct nesting depth deep; Python builds no message much deeper (test_bad_input sends deeper bytes)."""
    root = struct_pb2.Struct()
    inner = root
    for _ in range(depth):
        inner = inner.fields["a"].struct_value
    return root


def _struct(valid: bool) -> st.SearchStrategy[struct_pb2.Struct]:
    values = st.one_of(st.integers(-1000, 1000), st.text(string.ascii_letters, max_size=8), st.booleans()) if valid else JSONISH
    keys = st.sampled_from(["position", "os", "email", "client"]) if valid else TEXT

    def build(content: dict) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        struct.update(content)
        return struct

    built = st.dictionaries(keys, values, max_size=4).map(build)
    return built if valid else built | st.integers(2, 30).map(_nested_struct)


def _timestamps(scene: Scene, valid: bool) -> st.SearchStrategy[Timestamp]:
    near = st.integers(scene.now - 86_400, scene.now + 3_600)
    if valid:
        return st.builds(Timestamp, seconds=near, nanos=st.integers(0, 999_999_999))
    return st.builds(Timestamp, seconds=near | integers(*INT64), nanos=integers(*INT32))


def _valid_strings(scene: Scene) -> dict[str, st.SearchStrategy[str]]:
    """What a well-behaved client puts in each string field, by field name."""
    users = list(scene.users.values())
    return {
        "filename": st.sampled_from(["photo.jpg", "IMG 0001.HEIC", "\u00e9t\u00e9.png"]),
        "content_type": st.sampled_from(sorted(content_types.ALLOWED_TYPES)),
        "sha256": st.just("") | st.binary(max_size=8).map(lambda b: hashlib.sha256(b).hexdigest()),
        "idempotency_key": st.text(string.ascii_letters + string.digits, max_size=16),
        "upload_id": st.sampled_from(scene.upload_ids),
        "reason": st.sampled_from(["gave up", "chargeback"]),
        "user_id": st.sampled_from(users),
        "payment_reference": st.uuids().map(lambda u: f"pi_{u.hex}"),
        "currency": st.sampled_from(["USD", "EUR", "SOL"]),
        "page_token": st.sampled_from(["", *scene.page_tokens]),
        "if_none_match": st.just(""),
        "accept": st.sampled_from(["image/avif", "image/webp", "image/jpeg", "image/*", "*/*", "image/png;q=0.5"]),
        "media_id": st.sampled_from(scene.media_ids),
        "surface": st.sampled_from(["feed", "profile", ""]),
    }


def _hostile_strings(scene: Scene) -> dict[str, st.SearchStrategy[str]]:
    """What else arrives in them, beyond TEXT: other callers' values, ids in odd spellings, forged tokens."""
    users = st.sampled_from(["", *scene.users.values()])
    ids = st.sampled_from(scene.upload_ids + scene.media_ids) | UUIDISH
    tokens = st.one_of(*(_altered(t) for t in scene.page_tokens), FORGED_TOKENS, BASE64, st.sampled_from(scene.page_tokens))
    return {"upload_id": ids, "media_id": ids, "user_id": users, "page_token": tokens}


VALID_INTEGERS = {
    "size_bytes": st.integers(1, 5000),
    "credit_bytes": st.integers(1, 10**6),
    "amount_minor": st.integers(0, 10**4),
    "page_size": st.integers(0, 60),
}


def _spoiled(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with a NUL or an astral character put in, or grown past the column it goes to."""
    inserted = st.builds(
        lambda value, at, char: value[: at % (len(value) + 1)] + char + value[at % (len(value) + 1) :],
        valid, st.integers(0, 64), st.sampled_from(["\x00", "\x00", "\U0001f600"]),
    )
    grown = st.builds(
        lambda value, length: (value or "x") * (length // max(len(value), 1) + 1),
        valid, st.sampled_from([65, 129, 257, 501, 100_000]),
    )
    return inserted | grown


def _value(field: FieldDescriptor, scene: Scene, mode: str) -> st.SearchStrategy:
    """A value of one field: valid, hostile, or for a message, valid but for one of its fields (one-bad)."""
    valid = mode == "valid"
    name, kind = field.name, field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return _timestamps(scene, valid)
        if full_name == "google.protobuf.Struct":
            return _struct(valid)
        return _message(field.message_type, scene, mode)
    if kind == FieldDescriptor.TYPE_STRING:
        well_behaved = _valid_strings(scene).get(name, st.text(string.ascii_letters, min_size=1, max_size=12))
        if valid:
            return well_behaved
        known = _hostile_strings(scene).get(name)
        return st.one_of(_spoiled(well_behaved), TEXT, *([known] if known is not None else []))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=2048) | st.sampled_from([b"", fake_jpeg(600)])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        # 0 is UNSPECIFIED, which most fields refuse.
        defined = [v.number for v in field.enum_type.values if v.number]
        return st.sampled_from(defined) if valid else st.sampled_from([0, *defined]) | integers(*INT32)
    if kind in INT_RANGES:
        sensible = VALID_INTEGERS.get(name, st.integers(0, 100))
        return sensible if valid else integers(*INT_RANGES[kind])
    raise AssertionError(f"{field.full_name}: no strategy for field type {kind}")


def _repeated(field: FieldDescriptor, scene: Scene, mode: str) -> st.SearchStrategy[list]:
    if mode == "one-bad":
        # Valid items around one that is not.
        return st.builds(
            lambda good, bad, at: [*good[:at], bad, *good[at:]],
            st.lists(_value(field, scene, "valid"), max_size=4), _value(field, scene, "one-bad"), st.integers(0, 4),
        )
    items = st.lists(_value(field, scene, mode), max_size=6)
    if mode == "valid" or field.type != FieldDescriptor.TYPE_MESSAGE:
        return items
    many = st.builds(lambda item, n: [item] * n, _value(field, scene, "valid"), st.sampled_from([500, 501]))
    return items | many


def _message(descriptor: Descriptor, scene: Scene, mode: str) -> st.SearchStrategy[Message]:
    """A message whose every field is valid, or hostile (each may be left unset), or valid but one (one-bad)."""
    make = message_factory.GetMessageClass(descriptor)

    def field_values(bad: FieldDescriptor | None) -> st.SearchStrategy[dict]:
        values = {}
        for f in descriptor.fields:
            field_mode = mode if mode != "one-bad" else "valid" if f is not bad else "one-bad"
            if field_mode == "one-bad" and f.type != FieldDescriptor.TYPE_MESSAGE:
                field_mode = "hostile"
            values[f.name] = _repeated(f, scene, field_mode) if f.is_repeated else _value(f, scene, field_mode)
        return st.fixed_dictionaries({}, optional=values) if mode == "hostile" else st.fixed_dictionaries(values)

    chosen = st.sampled_from(list(descriptor.fields)).flatmap(field_values) if mode == "one-bad" else field_values(None)
    return chosen.map(lambda kwargs: make(**kwargs))


def _requests(method: MethodDescriptor, scene: Scene) -> st.SearchStrategy:
    """One request of the method, or the messages of one stream."""
    requests = st.sampled_from(["valid", "one-bad", "hostile"]).flatmap(lambda mode: _message(method.input_type, scene, mode))
    if not method.client_streaming:
        return requests
    make = message_factory.GetMessageClass(method.input_type)

    def whole_upload(upload_id: str, cuts: list[int]) -> list[Message]:
        data = scene.streams[upload_id]
        bounds = [0, *sorted(cut % len(data) for cut in cuts), len(data)]
        return [make(upload_id=upload_id), *(make(chunk=data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))]

    whole = st.builds(whole_upload, st.sampled_from(sorted(scene.streams)), st.lists(st.integers(0, 10**6), max_size=3))
    return st.one_of(whole, st.lists(requests, max_size=4))


def _client_wrote_after_the_answer(error: grpc.aio.AioRpcError) -> bool:
    """The client's own status for a stream message it sent after the server had already answered.

    grpc's client marks the call INTERNAL "Internal error from Core" when sending a message fails
    because the server ended the call (it refused an earlier message); the server's answer is then
    lost to the client, and it never came from the server: every answer of ours carries an ErrorInfo.
    """
    return (
        error.code() == grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
        and "SendMessageOperation" in (error.debug_error_string() or "")
    )


def _described(request) -> str:
    shown = str(request) if not isinstance(request, list) else "; ".join(str(m) for m in request)
    return shown[:600]


@pytest.mark.parametrize("method", METHODS, ids=[m.full_name.rsplit(".", 1)[-1] for m in METHODS])
@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=EXAMPLES_PER_RPC,
    # The scene is made once per RPC and its examples share it, as clients share a server.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
async def test_no_request_to_any_rpc_gets_a_server_error(channel, storage, media, pool, scene, method, data):
    role = data.draw(st.sampled_from(sorted(ROLES)), label="caller")
    request = data.draw(_requests(method, scene), label="request")
    stub = storage if method.containing_service is SERVICES[0] else media
    call = getattr(stub, method.name)
    refusal: grpc.aio.AioRpcError | None = None
    try:
        await call(iter(request) if method.client_streaming else request, metadata=scene.metadata[role], timeout=20)
    except grpc.aio.AioRpcError as error:
        refusal = error
    if refusal is not None and not _client_wrote_after_the_answer(refusal):
        assert refusal.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            f"{method.name} as {role}: {refusal.code().name} {refusal.details()} for {_described(request)}"
        )
        assert error_info(refusal).domain == "mediavault"

    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert await ledger.audit(pool) == []
