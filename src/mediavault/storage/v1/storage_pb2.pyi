import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import wrappers_pb2 as _wrappers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Retention(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETENTION_UNSPECIFIED: _ClassVar[Retention]
    RETENTION_PERMANENT: _ClassVar[Retention]
    RETENTION_EPHEMERAL: _ClassVar[Retention]

class UploadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_STATE_UNSPECIFIED: _ClassVar[UploadState]
    UPLOAD_STATE_PENDING: _ClassVar[UploadState]
    UPLOAD_STATE_FINALIZED: _ClassVar[UploadState]
    UPLOAD_STATE_FAILED: _ClassVar[UploadState]
    UPLOAD_STATE_EXPIRED: _ClassVar[UploadState]

class UploadProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_PROTOCOL_UNSPECIFIED: _ClassVar[UploadProtocol]
    UPLOAD_PROTOCOL_SINGLE: _ClassVar[UploadProtocol]
    UPLOAD_PROTOCOL_TUS: _ClassVar[UploadProtocol]
    UPLOAD_PROTOCOL_S3_MULTIPART: _ClassVar[UploadProtocol]

class PaymentProvider(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_PROVIDER_UNSPECIFIED: _ClassVar[PaymentProvider]
    PAYMENT_PROVIDER_STRIPE: _ClassVar[PaymentProvider]
    PAYMENT_PROVIDER_SOLANA: _ClassVar[PaymentProvider]
    PAYMENT_PROVIDER_MANUAL: _ClassVar[PaymentProvider]
RETENTION_UNSPECIFIED: Retention
RETENTION_PERMANENT: Retention
RETENTION_EPHEMERAL: Retention
UPLOAD_STATE_UNSPECIFIED: UploadState
UPLOAD_STATE_PENDING: UploadState
UPLOAD_STATE_FINALIZED: UploadState
UPLOAD_STATE_FAILED: UploadState
UPLOAD_STATE_EXPIRED: UploadState
UPLOAD_PROTOCOL_UNSPECIFIED: UploadProtocol
UPLOAD_PROTOCOL_SINGLE: UploadProtocol
UPLOAD_PROTOCOL_TUS: UploadProtocol
UPLOAD_PROTOCOL_S3_MULTIPART: UploadProtocol
PAYMENT_PROVIDER_UNSPECIFIED: PaymentProvider
PAYMENT_PROVIDER_STRIPE: PaymentProvider
PAYMENT_PROVIDER_SOLANA: PaymentProvider
PAYMENT_PROVIDER_MANUAL: PaymentProvider

class Upload(_message.Message):
    __slots__ = ("upload_id", "user_id", "filename", "content_type", "size_bytes", "sha256", "state", "retention", "media_id", "failure_reason", "created_at", "expires_at", "protocol", "received_bytes")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    user_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    state: UploadState
    retention: Retention
    media_id: str
    failure_reason: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    protocol: UploadProtocol
    received_bytes: int
    def __init__(self, upload_id: _Optional[str] = ..., user_id: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., state: _Optional[_Union[UploadState, str]] = ..., retention: _Optional[_Union[Retention, str]] = ..., media_id: _Optional[str] = ..., failure_reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., protocol: _Optional[_Union[UploadProtocol, str]] = ..., received_bytes: _Optional[int] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("filename", "content_type", "size_bytes", "sha256", "idempotency_key", "retention", "protocol")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    idempotency_key: str
    retention: Retention
    protocol: UploadProtocol
    def __init__(self, filename: _Optional[str] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., retention: _Optional[_Union[Retention, str]] = ..., protocol: _Optional[_Union[UploadProtocol, str]] = ...) -> None: ...

class BeginUploadResponse(_message.Message):
    __slots__ = ("upload", "upload_url", "upload_method", "upload_headers", "chunk_size_bytes")
    class UploadHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_METHOD_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_HEADERS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    upload: Upload
    upload_url: str
    upload_method: str
    upload_headers: _containers.ScalarMap[str, str]
    chunk_size_bytes: int
    def __init__(self, upload: _Optional[_Union[Upload, _Mapping]] = ..., upload_url: _Optional[str] = ..., upload_method: _Optional[str] = ..., upload_headers: _Optional[_Mapping[str, str]] = ..., chunk_size_bytes: _Optional[int] = ...) -> None: ...

class FinalizeUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class FinalizeUploadResponse(_message.Message):
    __slots__ = ("upload", "media_id")
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    upload: Upload
    media_id: str
    def __init__(self, upload: _Optional[_Union[Upload, _Mapping]] = ..., media_id: _Optional[str] = ...) -> None: ...

class FailUploadRequest(_message.Message):
    __slots__ = ("upload_id", "reason")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    reason: str
    def __init__(self, upload_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FailUploadResponse(_message.Message):
    __slots__ = ("upload",)
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    upload: Upload
    def __init__(self, upload: _Optional[_Union[Upload, _Mapping]] = ...) -> None: ...

class PresignUploadPartsRequest(_message.Message):
    __slots__ = ("upload_id", "parts")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    parts: _containers.RepeatedCompositeFieldContainer[UploadPartRequest]
    def __init__(self, upload_id: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[UploadPartRequest, _Mapping]]] = ...) -> None: ...

class UploadPartRequest(_message.Message):
    __slots__ = ("part_number", "sha256")
    PART_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    part_number: int
    sha256: str
    def __init__(self, part_number: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PresignUploadPartsResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[PresignedPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[PresignedPart, _Mapping]]] = ...) -> None: ...

class PresignedPart(_message.Message):
    __slots__ = ("part_number", "url", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PART_NUMBER_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    part_number: int
    url: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, part_number: _Optional[int] = ..., url: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class GetUploadResponse(_message.Message):
    __slots__ = ("upload",)
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    upload: Upload
    def __init__(self, upload: _Optional[_Union[Upload, _Mapping]] = ...) -> None: ...

class UploadContentRequest(_message.Message):
    __slots__ = ("upload_id", "chunk", "offset")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    chunk: bytes
    offset: _wrappers_pb2.Int64Value
    def __init__(self, upload_id: _Optional[str] = ..., chunk: _Optional[bytes] = ..., offset: _Optional[_Union[_wrappers_pb2.Int64Value, _Mapping]] = ...) -> None: ...

class UploadContentResponse(_message.Message):
    __slots__ = ("upload",)
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    upload: Upload
    def __init__(self, upload: _Optional[_Union[Upload, _Mapping]] = ...) -> None: ...

class GetStorageSummaryRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class GetStorageSummaryResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: StorageSummary
    def __init__(self, summary: _Optional[_Union[StorageSummary, _Mapping]] = ...) -> None: ...

class StorageSummary(_message.Message):
    __slots__ = ("user_id", "quota_bytes", "used_bytes", "reserved_bytes", "available_bytes", "media_count", "pending_uploads", "frozen", "derived_bytes")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEDIA_COUNT_FIELD_NUMBER: _ClassVar[int]
    PENDING_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    DERIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    quota_bytes: int
    used_bytes: int
    reserved_bytes: int
    available_bytes: int
    media_count: int
    pending_uploads: int
    frozen: bool
    derived_bytes: int
    def __init__(self, user_id: _Optional[str] = ..., quota_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., media_count: _Optional[int] = ..., pending_uploads: _Optional[int] = ..., frozen: _Optional[bool] = ..., derived_bytes: _Optional[int] = ...) -> None: ...

class AddStorageCreditsRequest(_message.Message):
    __slots__ = ("user_id", "provider", "payment_reference", "credit_bytes", "amount_minor", "currency")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    provider: PaymentProvider
    payment_reference: str
    credit_bytes: int
    amount_minor: int
    currency: str
    def __init__(self, user_id: _Optional[str] = ..., provider: _Optional[_Union[PaymentProvider, str]] = ..., payment_reference: _Optional[str] = ..., credit_bytes: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class AddStorageCreditsResponse(_message.Message):
    __slots__ = ("purchase", "already_processed", "summary")
    PURCHASE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    purchase: Purchase
    already_processed: bool
    summary: StorageSummary
    def __init__(self, purchase: _Optional[_Union[Purchase, _Mapping]] = ..., already_processed: _Optional[bool] = ..., summary: _Optional[_Union[StorageSummary, _Mapping]] = ...) -> None: ...

class Purchase(_message.Message):
    __slots__ = ("purchase_id", "user_id", "provider", "payment_reference", "credit_bytes", "amount_minor", "currency", "created_at")
    PURCHASE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    purchase_id: str
    user_id: str
    provider: PaymentProvider
    payment_reference: str
    credit_bytes: int
    amount_minor: int
    currency: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, purchase_id: _Optional[str] = ..., user_id: _Optional[str] = ..., provider: _Optional[_Union[PaymentProvider, str]] = ..., payment_reference: _Optional[str] = ..., credit_bytes: _Optional[int] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListPurchasesRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPurchasesResponse(_message.Message):
    __slots__ = ("purchases", "next_page_token")
    PURCHASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    purchases: _containers.RepeatedCompositeFieldContainer[Purchase]
    next_page_token: str
    def __init__(self, purchases: _Optional[_Iterable[_Union[Purchase, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class FreezeAccountRequest(_message.Message):
    __slots__ = ("user_id", "reason")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    reason: str
    def __init__(self, user_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FreezeAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class UnfreezeAccountRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class UnfreezeAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("user_id", "frozen", "frozen_reason", "frozen_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    FROZEN_REASON_FIELD_NUMBER: _ClassVar[int]
    FROZEN_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    frozen: bool
    frozen_reason: str
    frozen_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., frozen: _Optional[bool] = ..., frozen_reason: _Optional[str] = ..., frozen_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
