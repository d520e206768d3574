"""MediaService: proto in, domain call, proto out."""

from __future__ import annotations

import logging
from datetime import UTC

from google.protobuf import json_format

from mediavault import metrics
from mediavault.auth import Principal
from mediavault.domain import events
from mediavault.domain import media as media_domain
from mediavault.media.v1 import media_pb2 as pb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.rpc.handler import Servicer, rpc
from mediavault.rpc.storage import RETENTION_TO_PB, timestamp

log = logging.getLogger(__name__)

SERVICE = "MediaService"
DISPLAY_ORDER = ("thumbnail", "preview", "display")

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


class MediaServicer(Servicer, media_pb2_grpc.MediaServiceServicer):
    async def _url(self, object_key: str, content_type: str) -> str:
        if self.settings.public_base_url:
            return f"{self.settings.public_base_url.rstrip('/')}/{object_key}"
        return await self.blobs.presign_get(object_key, expires_in=self.settings.media_url_ttl, content_type=content_type)

    async def media_pb(self, media: media_domain.Media) -> pb.Media:
        variants = [
            pb.Variant(
                name=v.name,
                url=await self._url(v.object_key, v.content_type),
                content_type=v.content_type,
                width=v.width,
                height=v.height,
                size_bytes=v.size_bytes,
            )
            for v in media.variants
        ]
        by_name = {v.name: v for v in variants}
        original_url = await self._url(media.object_key, media.content_type)
        shown = next((by_name[n].url for n in DISPLAY_ORDER if n in by_name), original_url)
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
            variants=variants,
            feed_url=shown,
            original_url=original_url,
            created_at=timestamp(media.created_at),
            saved_at=timestamp(media.saved_at),
            expires_at=timestamp(media.expires_at),
            view_count=media.view_count,
            like_count=media.like_count,
            share_count=media.share_count,
        )

    @rpc(SERVICE)
    async def GetMedia(self, request: pb.GetMediaRequest, context, principal: Principal) -> pb.GetMediaResponse:
        media = await media_domain.get(self.pool, principal, media_domain.parse_media_id(request.media_id))
        return pb.GetMediaResponse(media=await self.media_pb(media))

    @rpc(SERVICE)
    async def ListFeed(self, request: pb.ListFeedRequest, context, principal: Principal) -> pb.ListFeedResponse:
        owner_id = principal.user_or_self(request.user_id, *media_domain.READERS)
        page = await self.feed.page(owner_id, request.page_size, request.page_token)
        if request.if_none_match and request.if_none_match == page.etag:
            return pb.ListFeedResponse(etag=page.etag, not_modified=True, next_page_token=page.next_page_token)
        return pb.ListFeedResponse(
            media=[await self.media_pb(m) for m in page.items], next_page_token=page.next_page_token, etag=page.etag
        )

    @rpc(SERVICE)
    async def DeleteMedia(self, request: pb.DeleteMediaRequest, context, principal: Principal) -> pb.DeleteMediaResponse:
        media = await media_domain.delete(
            self.pool, principal, media_domain.parse_media_id(request.media_id), self.settings.jobs.purge_deleted_media.age_seconds
        )
        await self.feed.changed(media.owner_id)
        return pb.DeleteMediaResponse()

    @rpc(SERVICE)
    async def SaveMedia(self, request: pb.SaveMediaRequest, context, principal: Principal) -> pb.SaveMediaResponse:
        media = await media_domain.save(self.pool, principal, media_domain.parse_media_id(request.media_id))
        await self.feed.changed(media.owner_id)
        return pb.SaveMediaResponse(media=await self.media_pb(media))

    @rpc(SERVICE)
    async def ReprocessMedia(self, request: pb.ReprocessMediaRequest, context, principal: Principal) -> pb.ReprocessMediaResponse:
        media_id = media_domain.parse_media_id(request.media_id)
        version = await media_domain.request_reprocess(self.pool, principal, media_id)
        media = await media_domain.get(self.pool, principal, media_id)
        await self.transcodes.enqueue(media_id, version, feed_owner=media.owner_id)
        return pb.ReprocessMediaResponse(media=await self.media_pb(media))

    @rpc(SERVICE)
    async def RecordEvents(self, request: pb.RecordEventsRequest, context, principal: Principal) -> pb.RecordEventsResponse:
        batch = [
            events.Event(
                event_type=_EVENT_TYPES.get(e.event_type, ""),
                media_id=e.media_id,
                surface=e.surface,
                occurred_at=e.occurred_at.ToDatetime(tzinfo=UTC) if e.HasField("occurred_at") else None,
                meta=json_format.MessageToDict(e.meta) if e.HasField("meta") else {},
            )
            for e in request.events
        ]
        accepted, rejected = await events.record(self.pool, principal.user_id, batch)
        metrics.EVENTS_RECORDED.labels("accepted").inc(accepted)
        metrics.EVENTS_RECORDED.labels("rejected").inc(rejected)
        return pb.RecordEventsResponse(accepted=accepted, rejected=rejected)
