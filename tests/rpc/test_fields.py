"""The declared rules of the request fields (rpc.fields): every field has one, and the check applies them."""

from __future__ import annotations

import time
import uuid

import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from mediavault.errors import InvalidArgument
from mediavault.limits import UUID_VIOLATION, Int, Text
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.rpc import fields
from mediavault.storage.v1 import storage_pb2 as pb
from tests.helpers import other_uuid_spellings

SERVICES = (pb.DESCRIPTOR.services_by_name["StorageService"], mpb.DESCRIPTOR.services_by_name["MediaService"])
REQUESTS = sorted({method.input_type for service in SERVICES for method in service.methods}, key=lambda d: d.full_name)
NOT_DECLARED = (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_MESSAGE)


def reachable(descriptor: Descriptor) -> list[FieldDescriptor]:
    """Every field of the request and of the messages in it that no Domain declaration covers."""
    found = []
    for field in descriptor.fields:
        found.append(field)
        entered = not isinstance(fields.FIELDS.get(field.full_name), fields.Domain)
        if field.type == FieldDescriptor.TYPE_MESSAGE and entered:
            found += reachable(field.message_type)
    return found


def test_every_string_bytes_and_number_field_of_every_request_of_both_services_is_declared():
    assert len(REQUESTS) == sum(len(service.methods) for service in SERVICES)
    undeclared = [
        field.full_name
        for request in REQUESTS
        for field in reachable(request)
        if field.type not in NOT_DECLARED and field.full_name not in fields.FIELDS
    ]
    assert undeclared == []
    for request in REQUESTS:
        fields.checker(request)


def test_every_declaration_names_a_field_of_a_request():
    names = {field.full_name for request in REQUESTS for field in reachable(request)}
    assert sorted(set(fields.FIELDS) - names) == []


def test_a_request_with_an_undeclared_field_gets_no_check():
    key = "mediavault.storage.v1.BeginUploadRequest.idempotency_key"
    with pytest.raises(fields.Undeclared) as caught:
        fields.checker(pb.BeginUploadRequest.DESCRIPTOR, {k: v for k, v in fields.FIELDS.items() if k != key})
    assert caught.value.names == [key]


@pytest.mark.parametrize(
    ("descriptor", "declarations", "complaint"),
    [
        (pb.GetUploadRequest.DESCRIPTOR, {"mediavault.storage.v1.GetUploadRequest.upload_id": Int(0, 1)}, "cannot judge"),
        (pb.ListPurchasesRequest.DESCRIPTOR, {**fields.FIELDS, "mediavault.storage.v1.ListPurchasesRequest.page_size": Text(1)}, "cannot judge"),
        (struct_pb2.Struct.DESCRIPTOR, {}, "is a map"),
        (
            struct_pb2.ListValue.DESCRIPTOR,
            {
                "google.protobuf.Value.string_value": Text(max_len=1),
                "google.protobuf.Value.number_value": fields.Domain("test"),
                "google.protobuf.Value.struct_value": fields.Domain("test"),
            },
            "contains itself",
        ),
    ],
)
def test_a_declaration_the_check_cannot_apply_is_refused(descriptor, declarations, complaint):
    with pytest.raises(TypeError, match=complaint):
        fields.checker(descriptor, declarations)


def test_nested_and_repeated_fields_are_checked_and_named_by_their_path():
    # RecordEvents' events are the domain's to judge; entered here, they show how nested fields are named.
    check = fields.checker(
        mpb.RecordEventsRequest.DESCRIPTOR,
        {
            "mediavault.media.v1.RecordEventsRequest.idempotency_key": Text(max_len=3),
            "mediavault.media.v1.UsageEvent.media_id": fields.Uuid(),
            "mediavault.media.v1.UsageEvent.surface": Text(max_len=3),
            "mediavault.media.v1.UsageEvent.meta": fields.Domain("test"),
            "google.protobuf.Timestamp.seconds": Int(0, 10),
            "google.protobuf.Timestamp.nanos": Int(0, 0),
        },
    )
    good = mpb.UsageEvent(media_id=str(uuid.uuid4()), surface="abc", occurred_at=Timestamp(seconds=10))
    check(mpb.RecordEventsRequest(events=[good, good]))
    bad = mpb.UsageEvent(media_id="x", surface="a\x00", occurred_at=Timestamp(seconds=11, nanos=-1))
    with pytest.raises(InvalidArgument) as caught:
        check(mpb.RecordEventsRequest(events=[good, bad]))
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("events[1].media_id", UUID_VIOLATION),
        ("events[1].surface", "must not contain NUL characters"),
        ("events[1].occurred_at.seconds", "must be at most 10"),
        ("events[1].occurred_at.nanos", "must not be negative"),
    ]

    paths = fields.checker(field_mask_pb2.FieldMask.DESCRIPTOR, {"google.protobuf.FieldMask.paths": Text(max_len=2)})
    with pytest.raises(InvalidArgument) as caught:
        paths(field_mask_pb2.FieldMask(paths=["ab", "abc", "a\x00"]))
    assert [v.field for v in caught.value.violations] == ["paths[1]", "paths[2]"]


def test_a_repeated_message_with_nothing_to_check_in_it_is_not_walked():
    # Every field of a part is the domain's, which refuses a list of millions by its length alone.
    one = pb.PresignUploadPartsRequest(parts=[pb.UploadPartRequest()]).SerializeToString()
    request = pb.PresignUploadPartsRequest.FromString(pb.PresignUploadPartsRequest(upload_id=str(uuid.uuid4())).SerializeToString() + one * 2_000_000)
    check = fields.checker(pb.PresignUploadPartsRequest.DESCRIPTOR)
    started = time.perf_counter()
    check(request)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"checked in {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("rule", "value", "description"),
    [
        (Text(max_len=3), "abcd", "must be at most 3 characters"),
        (Text(max_len=3, min_len=1), "", "must be 1-3 characters"),
        (Text(max_len=3), "a\x00", "must not contain NUL characters"),
        (Text(max_len=3), "\U0001f600\u00e9a", None),
        (Int(0, 5), -1, "must not be negative"),
        (Int(1, 5), 0, "must be positive"),
        (Int(-3, 5), -4, "must be at least -3"),
        (Int(1, 2**50), 2**63 - 1, f"must be at most {2**50}"),
        (Int(1, 2**50), 2**50, None),
        (fields.Uuid(), "", UUID_VIOLATION),
        (fields.Uuid(optional=True), "", None),
        (fields.Uuid(optional=True), "\x00", UUID_VIOLATION),
        (fields.Uuid(), "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", None),
        (fields.Uuid(), "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", None),
        *((fields.Uuid(), spelling, UUID_VIOLATION) for spelling in other_uuid_spellings("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").values()),
    ],
)
def test_each_rule_says_why_a_value_breaks_it(rule, value, description):
    assert rule.violation(value) == description
