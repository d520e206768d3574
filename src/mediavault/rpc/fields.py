"""The rule of every field a client sends, declared once by the field's proto name and checked before any handler.

Every string, bytes and number field of every request message has a declaration:
``checker`` refuses to build the check of a request with an undeclared field, so a
server with a new field nobody declared does not start (tests/rpc/test_fields.py names
them). Message fields are entered unless declared ``Domain``; enums and bools are not
declared: the servicers map them through their dictionaries.

A declaration either states the limits here (``Text``, ``Int``, ``Uuid``), from the
constants of the domain and the column sizes in db/migrations, or says that the whole
rule is the domain's (``Domain``), which then refuses a bad value with a field violation
itself. Each rule lives in one of the two places, never in both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from mediavault.auth import MAX_USER_ID_LENGTH, USER_ID
from mediavault.domain import accounts, purchases
from mediavault.domain.uploads import validation as uploads
from mediavault.errors import FieldViolation, InvalidArgument
from mediavault.limits import BIGINT_MAX, INT32_MAX, UUID_VIOLATION, Int, Text, parse_uuid


@dataclass(frozen=True, slots=True)
class Uuid:
    """A UUID written as limits.parse_uuid reads it; when optional, also the empty string (not set)."""

    optional: bool = False

    def violation(self, value: str) -> str | None:
        if (self.optional and not value) or parse_uuid(value) is not None:
            return None
        return UUID_VIOLATION


@dataclass(frozen=True, slots=True)
class Domain:
    """The field's whole rule is the domain's, named in ``rule``; a message field so declared is not entered."""

    rule: str


Rule = Text | Int | Uuid | Domain

_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
    }
)
_STRING = frozenset({FieldDescriptor.TYPE_STRING})
# Which field types each kind of rule can judge; Domain takes any.
_JUDGES: dict[type, frozenset[int]] = {Text: _STRING, Uuid: _STRING, Int: _INTEGERS}
_UNDECLARED = frozenset({FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_BOOL})

# An empty user id names the caller.
_CALLER_OR_USER_ID = Text(max_len=MAX_USER_ID_LENGTH)
# 0 asks for the default page size and anything above the maximum gets the maximum.
_PAGE_SIZE = Int(0, INT32_MAX)
_PAGE_TOKEN = Domain("a token the same list issued (domain.pages)")
_IDEMPOTENCY_KEY = Text(max_len=uploads.MAX_IDEMPOTENCY_KEY)
# A hint, as an HTTP Accept header is: what the server does not make is ignored, never an error.
_ACCEPT = Domain("image media ranges as in Accept header lines; unknown ones and ranges past the 16th ignored (domain.formats)")

_STORAGE = "mediavault.storage.v1."
_MEDIA = "mediavault.media.v1."

FIELDS: dict[str, Rule] = {
    _STORAGE + "BeginUploadRequest.filename": Domain(f"1-{uploads.MAX_FILENAME} printable characters (uploads.validate_begin)"),
    _STORAGE + "BeginUploadRequest.content_type": Domain("one of the allowed types (domain.content_types)"),
    _STORAGE + "BeginUploadRequest.size_bytes": Domain("1 to the configured maximum of its content type (uploads.validate_begin)"),
    _STORAGE + "BeginUploadRequest.sha256": Domain("empty, or 64 lowercase hex characters (uploads.validate_begin)"),
    _STORAGE + "BeginUploadRequest.idempotency_key": _IDEMPOTENCY_KEY,
    _STORAGE + "FinalizeUploadRequest.upload_id": Uuid(),
    _STORAGE + "FailUploadRequest.upload_id": Uuid(),
    _STORAGE + "FailUploadRequest.reason": Text(max_len=uploads.MAX_FAIL_REASON),
    _STORAGE + "GetUploadRequest.upload_id": Uuid(),
    _STORAGE + "PresignUploadPartsRequest.upload_id": Uuid(),
    _STORAGE + "UploadPartRequest.part_number": Domain("1 to the upload's part count (at most 10000), not repeated, 1 to 100 parts a call (uploads.resumable)"),
    _STORAGE + "UploadPartRequest.sha256": Domain("empty, or 64 lowercase hex characters (uploads.resumable)"),
    # Only the first message of the stream carries it (rpc.storage checks which).
    _STORAGE + "UploadContentRequest.upload_id": Uuid(optional=True),
    _STORAGE + "UploadContentRequest.chunk": Domain("the object's bytes, bounded by the upload's declared size (uploads.streaming)"),
    _STORAGE + "UploadContentRequest.offset": Domain("at least 0, in the first message only; a TUS upload's received_bytes (uploads.validation.check_stream_offset, uploads.resumable)"),
    _STORAGE + "GetStorageSummaryRequest.user_id": _CALLER_OR_USER_ID,
    _STORAGE + "AddStorageCreditsRequest.user_id": USER_ID,
    _STORAGE + "AddStorageCreditsRequest.payment_reference": Text(min_len=1, max_len=purchases.MAX_PAYMENT_REFERENCE),
    _STORAGE + "AddStorageCreditsRequest.credit_bytes": Int(1, purchases.MAX_CREDIT_BYTES),
    _STORAGE + "AddStorageCreditsRequest.amount_minor": Int(0, BIGINT_MAX),
    _STORAGE + "AddStorageCreditsRequest.currency": Domain("an upper-case currency code (domain.purchases)"),
    _STORAGE + "ListPurchasesRequest.user_id": _CALLER_OR_USER_ID,
    _STORAGE + "ListPurchasesRequest.page_size": _PAGE_SIZE,
    _STORAGE + "ListPurchasesRequest.page_token": _PAGE_TOKEN,
    _STORAGE + "FreezeAccountRequest.user_id": USER_ID,
    # Not blank is the domain's: it strips the reason first.
    _STORAGE + "FreezeAccountRequest.reason": Text(max_len=accounts.MAX_FREEZE_REASON),
    _STORAGE + "UnfreezeAccountRequest.user_id": USER_ID,
    _MEDIA + "GetMediaRequest.media_id": Uuid(),
    _MEDIA + "GetMediaRequest.accept": _ACCEPT,
    _MEDIA + "ListFeedRequest.user_id": _CALLER_OR_USER_ID,
    _MEDIA + "ListFeedRequest.page_size": _PAGE_SIZE,
    _MEDIA + "ListFeedRequest.page_token": _PAGE_TOKEN,
    _MEDIA + "ListFeedRequest.if_none_match": Domain("only compared with the page's etag, never stored; never an error"),
    _MEDIA + "ListFeedRequest.accept": _ACCEPT,
    _MEDIA + "DeleteMediaRequest.media_id": Uuid(),
    _MEDIA + "SaveMediaRequest.media_id": Uuid(),
    _MEDIA + "ReprocessMediaRequest.media_id": Uuid(),
    _MEDIA + "RecordEventsRequest.events": Domain("each event judged alone, a bad one counted in rejected (domain.events)"),
    _MEDIA + "RecordEventsRequest.idempotency_key": _IDEMPOTENCY_KEY,
}


class Undeclared(LookupError):
    """Fields of a request that have no declaration."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"declare these fields in mediavault.rpc.fields.FIELDS: {', '.join(names)}")
        self.names = names


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to check on one message type, worked out once: (name, rule) of its scalars; its entered messages."""

    scalars: tuple[tuple[str, Text | Int | Uuid], ...]
    repeated_scalars: tuple[tuple[str, Text | Int | Uuid], ...]
    messages: tuple[tuple[str, _Plan, bool], ...]


_NOTHING = _Plan((), (), ())


def _plan(descriptor: Descriptor, declarations: Mapping[str, Rule], entered: tuple[str, ...] = ()) -> _Plan:
    if descriptor.full_name in entered:
        raise TypeError(f"{descriptor.full_name} contains itself: declare the field that does Domain")
    scalars: list[tuple[str, Text | Int | Uuid]] = []
    repeated_scalars: list[tuple[str, Text | Int | Uuid]] = []
    messages: list[tuple[str, _Plan, bool]] = []
    missing: list[str] = []
    for field in descriptor.fields:
        if field.type in _UNDECLARED:
            continue
        rule = declarations.get(field.full_name)
        if isinstance(rule, Domain):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            try:
                inner = _message_plan(field, rule, declarations, (*entered, descriptor.full_name))
            except Undeclared as undeclared:
                missing += undeclared.names
                continue
            # A message with nothing to check in it is not walked: a repeated one may hold
            # millions of items, which the domain refuses by their count alone.
            if inner != _NOTHING:
                messages.append((field.name, inner, field.is_repeated))
            continue
        if rule is None:
            missing.append(field.full_name)
            continue
        if field.type not in _JUDGES[type(rule)]:
            raise TypeError(f"{field.full_name}: a {type(rule).__name__} rule cannot judge a field of this type")
        (repeated_scalars if field.is_repeated else scalars).append((field.name, rule))
    if missing:
        raise Undeclared(missing)
    return _Plan(tuple(scalars), tuple(repeated_scalars), tuple(messages))


def _message_plan(field: FieldDescriptor, rule: Rule | None, declarations: Mapping[str, Rule], entered: tuple[str, ...]) -> _Plan:
    """The plan of a message field not declared Domain, which the check enters."""
    if rule is not None:
        raise TypeError(f"{field.full_name} is a message: it is entered, or declared Domain")
    message_type = field.message_type
    assert message_type is not None  # a message field names its type
    if message_type.GetOptions().map_entry:
        raise TypeError(f"{field.full_name} is a map, which the check does not enter: declare it Domain")
    return _plan(message_type, declarations, entered)


def _violations(message: Message, plan: _Plan, prefix: str, found: list[FieldViolation]) -> None:
    for name, rule in plan.scalars:
        problem = rule.violation(getattr(message, name))
        if problem is not None:
            found.append(FieldViolation(prefix + name, problem))
    for name, rule in plan.repeated_scalars:
        for index, value in enumerate(getattr(message, name)):
            problem = rule.violation(value)
            if problem is not None:
                found.append(FieldViolation(f"{prefix}{name}[{index}]", problem))
    for name, inner, repeated in plan.messages:
        if repeated:
            for index, item in enumerate(getattr(message, name)):
                _violations(item, inner, f"{prefix}{name}[{index}].", found)
        elif message.HasField(name):
            _violations(getattr(message, name), inner, f"{prefix}{name}.", found)


def checker(descriptor: Descriptor, declarations: Mapping[str, Rule] = FIELDS) -> Callable[[Message], None]:
    """The check of one request type: raises InvalidArgument naming every field that breaks its rule.

    Raises Undeclared when a field of the request has no declaration.
    """
    plan = _plan(descriptor, declarations)

    def check(message: Message) -> None:
        found: list[FieldViolation] = []
        _violations(message, plan, "", found)
        if found:
            raise InvalidArgument(found)

    return check
