import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mediavault.storage.v1 import storage_pb2 as _storage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]

class ProcessingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESSING_STATUS_UNSPECIFIED: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_PENDING: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_PROCESSING: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_COMPLETE: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_FAILED: _ClassVar[ProcessingStatus]

class UsageEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_EVENT_TYPE_UNSPECIFIED: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_IMPRESSION: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_DWELL_START: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_DWELL_END: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_CLICK: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_OPEN: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_SHARE: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_LIKE: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_SAVE: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_HIDE: _ClassVar[UsageEventType]
    USAGE_EVENT_TYPE_REPORT: _ClassVar[UsageEventType]
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind
PROCESSING_STATUS_UNSPECIFIED: ProcessingStatus
PROCESSING_STATUS_PENDING: ProcessingStatus
PROCESSING_STATUS_PROCESSING: ProcessingStatus
PROCESSING_STATUS_COMPLETE: ProcessingStatus
PROCESSING_STATUS_FAILED: ProcessingStatus
USAGE_EVENT_TYPE_UNSPECIFIED: UsageEventType
USAGE_EVENT_TYPE_IMPRESSION: UsageEventType
USAGE_EVENT_TYPE_DWELL_START: UsageEventType
USAGE_EVENT_TYPE_DWELL_END: UsageEventType
USAGE_EVENT_TYPE_CLICK: UsageEventType
USAGE_EVENT_TYPE_OPEN: UsageEventType
USAGE_EVENT_TYPE_SHARE: UsageEventType
USAGE_EVENT_TYPE_LIKE: UsageEventType
USAGE_EVENT_TYPE_SAVE: UsageEventType
USAGE_EVENT_TYPE_HIDE: UsageEventType
USAGE_EVENT_TYPE_REPORT: UsageEventType

class Variant(_message.Message):
    __slots__ = ("name", "url", "content_type", "width", "height", "size_bytes", "alternatives")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    content_type: str
    width: int
    height: int
    size_bytes: int
    alternatives: _containers.RepeatedCompositeFieldContainer[VariantFormat]
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., content_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., size_bytes: _Optional[int] = ..., alternatives: _Optional[_Iterable[_Union[VariantFormat, _Mapping]]] = ...) -> None: ...

class VariantFormat(_message.Message):
    __slots__ = ("content_type", "url", "width", "height", "size_bytes")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    url: str
    width: int
    height: int
    size_bytes: int
    def __init__(self, content_type: _Optional[str] = ..., url: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Rendition(_message.Message):
    __slots__ = ("name", "url", "content_type", "width", "height", "bitrate", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BITRATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    content_type: str
    width: int
    height: int
    bitrate: int
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., content_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., bitrate: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("media_id", "user_id", "kind", "content_type", "size_bytes", "sha256", "width", "height", "retention", "processing_status", "processing_error", "attempts", "variants", "feed_url", "original_url", "created_at", "saved_at", "expires_at", "view_count", "like_count", "share_count", "duration_seconds", "frame_rate", "has_audio", "source_codec", "renditions", "processing_progress", "thumbhash", "taken_at", "camera", "animated", "animation_duration_ms", "animation_plays")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_STATUS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    FEED_URL_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_URL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    VIEW_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIKE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    HAS_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CODEC_FIELD_NUMBER: _ClassVar[int]
    RENDITIONS_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    THUMBHASH_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    ANIMATED_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_PLAYS_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    user_id: str
    kind: MediaKind
    content_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int
    retention: _storage_pb2.Retention
    processing_status: ProcessingStatus
    processing_error: str
    attempts: int
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    feed_url: str
    original_url: str
    created_at: _timestamp_pb2.Timestamp
    saved_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    view_count: int
    like_count: int
    share_count: int
    duration_seconds: float
    frame_rate: float
    has_audio: bool
    source_codec: str
    renditions: _containers.RepeatedCompositeFieldContainer[Rendition]
    processing_progress: int
    thumbhash: bytes
    taken_at: str
    camera: str
    animated: bool
    animation_duration_ms: int
    animation_plays: int
    def __init__(self, media_id: _Optional[str] = ..., user_id: _Optional[str] = ..., kind: _Optional[_Union[MediaKind, str]] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., retention: _Optional[_Union[_storage_pb2.Retention, str]] = ..., processing_status: _Optional[_Union[ProcessingStatus, str]] = ..., processing_error: _Optional[str] = ..., attempts: _Optional[int] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., feed_url: _Optional[str] = ..., original_url: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., saved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., view_count: _Optional[int] = ..., like_count: _Optional[int] = ..., share_count: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., frame_rate: _Optional[float] = ..., has_audio: _Optional[bool] = ..., source_codec: _Optional[str] = ..., renditions: _Optional[_Iterable[_Union[Rendition, _Mapping]]] = ..., processing_progress: _Optional[int] = ..., thumbhash: _Optional[bytes] = ..., taken_at: _Optional[str] = ..., camera: _Optional[str] = ..., animated: _Optional[bool] = ..., animation_duration_ms: _Optional[int] = ..., animation_plays: _Optional[int] = ...) -> None: ...

class GetMediaRequest(_message.Message):
    __slots__ = ("media_id", "accept")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    accept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, media_id: _Optional[str] = ..., accept: _Optional[_Iterable[str]] = ...) -> None: ...

class GetMediaResponse(_message.Message):
    __slots__ = ("media",)
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    media: Media
    def __init__(self, media: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...

class ListFeedRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token", "if_none_match", "accept")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    if_none_match: str
    accept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., if_none_match: _Optional[str] = ..., accept: _Optional[_Iterable[str]] = ...) -> None: ...

class ListFeedResponse(_message.Message):
    __slots__ = ("media", "next_page_token", "etag", "not_modified")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    media: _containers.RepeatedCompositeFieldContainer[Media]
    next_page_token: str
    etag: str
    not_modified: bool
    def __init__(self, media: _Optional[_Iterable[_Union[Media, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., etag: _Optional[str] = ..., not_modified: _Optional[bool] = ...) -> None: ...

class DeleteMediaRequest(_message.Message):
    __slots__ = ("media_id",)
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    def __init__(self, media_id: _Optional[str] = ...) -> None: ...

class DeleteMediaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveMediaRequest(_message.Message):
    __slots__ = ("media_id",)
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    def __init__(self, media_id: _Optional[str] = ...) -> None: ...

class SaveMediaResponse(_message.Message):
    __slots__ = ("media",)
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    media: Media
    def __init__(self, media: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...

class ReprocessMediaRequest(_message.Message):
    __slots__ = ("media_id",)
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    def __init__(self, media_id: _Optional[str] = ...) -> None: ...

class ReprocessMediaResponse(_message.Message):
    __slots__ = ("media",)
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    media: Media
    def __init__(self, media: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("event_type", "media_id", "surface", "occurred_at", "meta")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    event_type: UsageEventType
    media_id: str
    surface: str
    occurred_at: _timestamp_pb2.Timestamp
    meta: _struct_pb2.Struct
    def __init__(self, event_type: _Optional[_Union[UsageEventType, str]] = ..., media_id: _Optional[str] = ..., surface: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., meta: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events", "idempotency_key")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    idempotency_key: str
    def __init__(self, events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...
