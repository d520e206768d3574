"""MediaService: proto in, domain call, proto out."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, MutableMapping

from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from mediavault.admission import Admission
from mediavault.auth import Principal
from mediavault.domain import events as events_domain
from mediavault.domain import media as media_domain
from mediavault.media.v1 import media_pb2 as pb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.rpc.handler import Servicer, rpc
from mediavault.rpc.repeated import Converted
from mediavault.rpc.storage import RETENTION_TO_PB, timestamp

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["MediaService"]

_KINDS = {"image": pb.MEDIA_KIND_IMAGE, "video": pb.MEDIA_KIND_VIDEO}
_STATUSES = {
    "pending": pb.PROCESSING_STATUS_PENDING,
    "processing": pb.PROCESSING_STATUS_PROCESSING,
    "complete": pb.PROCESSING_STATUS_COMPLETE,
    "failed": pb.PROCESSING_STATUS_FAILED,
}
_EVENT_TYPES = {
    value: name.removeprefix("USAGE_EVENT_TYPE_").lower()
    for name, value in pb.UsageEventType.items()
    if value != pb.USAGE_EVENT_TYPE_UNSPECIFIED
}


class _Fields(Mapping[str, object]):
    """A Struct's fields as plain data, each value made as the domain reads it: a Struct may hold
    millions of values where the domain keeps a few dozen."""

    def __init__(self, fields: MutableMapping[str, struct_pb2.Value]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> object:
        return _plain(self._fields[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def _plain(value: struct_pb2.Value) -> object:
    """A Struct value as plain data, whatever it holds: judging it is the events domain's work."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _Fields(value.struct_value.fields)
    if kind == "list_value":
        return Converted(value.list_value.values, _plain)
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def _micros(timestamp: Timestamp) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1_000


def _event(event: pb.UsageEvent) -> events_domain.Event:
    return events_domain.Event(
        event_type=_EVENT_TYPES.get(event.event_type, ""),
        media_id=event.media_id,
        surface=event.surface,
        occurred_at_micros=_micros(event.occurred_at) if event.HasField("occurred_at") else None,
        meta=_Fields(event.meta.fields),
    )


def _variant_pb(offered: media_domain.Offered) -> pb.Variant:
    chosen = offered.chosen.variant
    return pb.Variant(
        name=chosen.name,
        url=offered.chosen.url,
        content_type=chosen.content_type,
        width=chosen.width,
        height=chosen.height,
        size_bytes=chosen.size_bytes,
        alternatives=[
            pb.VariantFormat(
                content_type=a.variant.content_type, url=a.url, width=a.variant.width, height=a.variant.height,
                size_bytes=a.variant.size_bytes,
            )
            for a in offered.alternatives
        ],
    )


def _rendition_pb(located: media_domain.Located) -> pb.Rendition:
    v = located.variant
    return pb.Rendition(
        name=v.name,
        url=located.url,
        content_type=v.content_type,
        width=v.width,
        height=v.height,
        bitrate=v.bitrate or 0,
        size_bytes=v.size_bytes,
    )


def media_pb(shown: media_domain.Shown) -> pb.Media:
    media = shown.media
    return pb.Media(
        media_id=str(media.media_id),
        user_id=media.owner_id,
        kind=_KINDS[media.kind],
        content_type=media.content_type,
        size_bytes=media.size_bytes,
        sha256=media.sha256 or "",
        width=media.width or 0,
        height=media.height or 0,
        retention=RETENTION_TO_PB[media.retention],
        processing_status=_STATUSES[media.processing_status],
        processing_error=media.processing_error or "",
        attempts=media.attempts,
        variants=[_variant_pb(offered) for offered in shown.variants if not offered.chosen.variant.is_rendition],
        renditions=[
            _rendition_pb(offered.chosen)
            for offered in sorted(shown.variants, key=lambda o: o.chosen.variant.width * o.chosen.variant.height)
            if offered.chosen.variant.is_rendition
        ],
        duration_seconds=media.duration_seconds or 0.0,
        frame_rate=media.frame_rate or 0.0,
        has_audio=bool(media.has_audio),
        source_codec=media.source_codec or "",
        processing_progress=media.processing_progress or 0,
        feed_url=shown.feed_url,
        original_url=shown.original_url,
        created_at=timestamp(media.created_at),
        saved_at=timestamp(media.saved_at),
        expires_at=timestamp(media.expires_at),
        view_count=media.view_count,
        like_count=media.like_count,
        share_count=media.share_count,
        thumbhash=media.thumbhash or b"",
        taken_at=media.taken_at_iso,
        camera=media.camera or "",
        animated=media.animated,
        animation_duration_ms=media.animation_duration_ms or 0,
        animation_plays=media.animation_plays or 0,
    )


class MediaServicer(Servicer, media_pb2_grpc.MediaServiceServicer):
    service = SERVICE

    def __init__(self, admission: Admission, *, library: media_domain.Library, events: events_domain.Events) -> None:
        super().__init__(admission)
        self.library = library
        self.events = events

    @rpc(SERVICE)
    async def GetMedia(self, request: pb.GetMediaRequest, context, principal: Principal) -> pb.GetMediaResponse:
        shown = await self.library.get(principal, uuid.UUID(request.media_id), request.accept)
        return pb.GetMediaResponse(media=media_pb(shown))

    @rpc(SERVICE)
    async def ListFeed(self, request: pb.ListFeedRequest, context, principal: Principal) -> pb.ListFeedResponse:
        page = await self.library.feed_page(
            principal, request.user_id, request.page_size, request.page_token, request.if_none_match, request.accept
        )
        return pb.ListFeedResponse(
            media=[media_pb(shown) for shown in page.items],
            next_page_token=page.next_page_token,
            etag=page.etag,
            not_modified=page.not_modified,
        )

    @rpc(SERVICE)
    async def DeleteMedia(self, request: pb.DeleteMediaRequest, context, principal: Principal) -> pb.DeleteMediaResponse:
        await self.library.delete(principal, uuid.UUID(request.media_id))
        return pb.DeleteMediaResponse()

    @rpc(SERVICE)
    async def SaveMedia(self, request: pb.SaveMediaRequest, context, principal: Principal) -> pb.SaveMediaResponse:
        shown = await self.library.save(principal, uuid.UUID(request.media_id))
        return pb.SaveMediaResponse(media=media_pb(shown))

    @rpc(SERVICE)
    async def ReprocessMedia(self, request: pb.ReprocessMediaRequest, context, principal: Principal) -> pb.ReprocessMediaResponse:
        shown = await self.library.reprocess(principal, uuid.UUID(request.media_id))
        return pb.ReprocessMediaResponse(media=media_pb(shown))

    @rpc(SERVICE)
    async def RecordEvents(self, request: pb.RecordEventsRequest, context, principal: Principal) -> pb.RecordEventsResponse:
        batch = Converted(request.events, _event)
        accepted, rejected = await self.events.record(principal.user_id, batch, request.idempotency_key)
        return pb.RecordEventsResponse(accepted=accepted, rejected=rejected)
