"""StorageService: proto in, domain call, proto out."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from mediavault.admission import Admission
from mediavault.auth import Principal
from mediavault.domain import accounts as accounts_domain
from mediavault.domain import purchases as purchases_domain
from mediavault.domain import uploads as uploads_domain
from mediavault.errors import InvalidArgument
from mediavault.rpc.handler import Servicer, rpc
from mediavault.rpc.repeated import Converted
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["StorageService"]

_UPLOAD_STATES = {
    "pending": pb.UPLOAD_STATE_PENDING,
    "finalized": pb.UPLOAD_STATE_FINALIZED,
    "failed": pb.UPLOAD_STATE_FAILED,
    "expired": pb.UPLOAD_STATE_EXPIRED,
}
RETENTION_TO_PB = {"permanent": pb.RETENTION_PERMANENT, "ephemeral": pb.RETENTION_EPHEMERAL}
_RETENTION_FROM_PB = {
    pb.RETENTION_UNSPECIFIED: "permanent",
    pb.RETENTION_PERMANENT: "permanent",
    pb.RETENTION_EPHEMERAL: "ephemeral",
}
_PROTOCOL_TO_PB = {
    "single": pb.UPLOAD_PROTOCOL_SINGLE,
    "tus": pb.UPLOAD_PROTOCOL_TUS,
    "s3_multipart": pb.UPLOAD_PROTOCOL_S3_MULTIPART,
}
_PROTOCOL_FROM_PB = {pb.UPLOAD_PROTOCOL_UNSPECIFIED: "single", **{v: k for k, v in _PROTOCOL_TO_PB.items()}}
_PROVIDER_TO_PB = {
    "stripe": pb.PAYMENT_PROVIDER_STRIPE,
    "solana": pb.PAYMENT_PROVIDER_SOLANA,
    "manual": pb.PAYMENT_PROVIDER_MANUAL,
}
_PROVIDER_FROM_PB = {v: k for k, v in _PROVIDER_TO_PB.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    """As Timestamp.FromDatetime (naive means UTC), without its slow calendar arithmetic."""
    if value is None:
        return None
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000)


def upload_pb(upload: uploads_domain.Upload) -> pb.Upload:
    return pb.Upload(
        upload_id=str(upload.upload_id),
        user_id=upload.user_id,
        filename=upload.filename,
        content_type=upload.content_type,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256 or "",
        state=_UPLOAD_STATES[upload.state],
        retention=RETENTION_TO_PB[upload.retention],
        media_id=str(upload.media_id) if upload.media_id else "",
        failure_reason=upload.failure_reason or "",
        created_at=timestamp(upload.created_at),
        expires_at=timestamp(upload.expires_at),
        protocol=_PROTOCOL_TO_PB[upload.protocol],
        received_bytes=upload.received_bytes,
    )


def summary_pb(summary: accounts_domain.StorageSummary) -> pb.StorageSummary:
    return pb.StorageSummary(
        user_id=summary.user_id,
        quota_bytes=summary.quota_bytes,
        used_bytes=summary.used_bytes,
        reserved_bytes=summary.reserved_bytes,
        available_bytes=summary.available_bytes,
        media_count=summary.media_count,
        pending_uploads=summary.pending_uploads,
        frozen=summary.frozen,
        derived_bytes=summary.derived_bytes,
    )


def purchase_pb(purchase: purchases_domain.Purchase) -> pb.Purchase:
    return pb.Purchase(
        purchase_id=str(purchase.purchase_id),
        user_id=purchase.user_id,
        provider=_PROVIDER_TO_PB[purchase.provider],
        payment_reference=purchase.payment_reference,
        credit_bytes=purchase.credit_bytes,
        amount_minor=purchase.amount_minor,
        currency=purchase.currency,
        created_at=timestamp(purchase.created_at),
    )


def account_pb(account: accounts_domain.Account) -> pb.Account:
    return pb.Account(
        user_id=account.user_id,
        frozen=account.frozen,
        frozen_reason=account.frozen_reason or "",
        frozen_at=timestamp(account.frozen_at),
    )


def _part_request(part: pb.UploadPartRequest) -> uploads_domain.PartRequest:
    return uploads_domain.PartRequest(part.part_number, part.sha256 or None)


class StorageServicer(Servicer, storage_pb2_grpc.StorageServiceServicer):
    service = SERVICE

    def __init__(
        self,
        admission: Admission,
        *,
        uploads: uploads_domain.Uploads,
        accounts: accounts_domain.Accounts,
        purchases: purchases_domain.Purchases,
    ) -> None:
        super().__init__(admission)
        self.uploads = uploads
        self.accounts = accounts
        self.purchases = purchases

    @rpc(SERVICE)
    async def BeginUpload(self, request: pb.BeginUploadRequest, context, principal: Principal) -> pb.BeginUploadResponse:
        retention = _RETENTION_FROM_PB.get(request.retention)
        if retention is None:
            raise InvalidArgument.single("retention", "unknown retention")
        protocol = _PROTOCOL_FROM_PB.get(request.protocol)
        if protocol is None:
            raise InvalidArgument.single("protocol", "unknown protocol")
        result = await self.uploads.begin(
            principal,
            uploads_domain.BeginRequest(
                filename=request.filename,
                content_type=request.content_type,
                size_bytes=request.size_bytes,
                sha256=request.sha256 or None,
                idempotency_key=request.idempotency_key or None,
                retention=retention,
                protocol=protocol,
            ),
        )
        return pb.BeginUploadResponse(
            upload=upload_pb(result.upload),
            upload_url=result.upload_url,
            upload_method=result.upload_method,
            upload_headers=result.upload_headers,
            chunk_size_bytes=result.chunk_size_bytes,
        )

    @rpc(SERVICE)
    async def FinalizeUpload(self, request: pb.FinalizeUploadRequest, context, principal: Principal) -> pb.FinalizeUploadResponse:
        upload = await self.uploads.finalize(principal, uuid.UUID(request.upload_id))
        return pb.FinalizeUploadResponse(upload=upload_pb(upload), media_id=str(upload.media_id))

    @rpc(SERVICE)
    async def FailUpload(self, request: pb.FailUploadRequest, context, principal: Principal) -> pb.FailUploadResponse:
        upload = await self.uploads.fail(principal, uuid.UUID(request.upload_id), request.reason)
        return pb.FailUploadResponse(upload=upload_pb(upload))

    @rpc(SERVICE)
    async def PresignUploadParts(
        self, request: pb.PresignUploadPartsRequest, context, principal: Principal
    ) -> pb.PresignUploadPartsResponse:
        parts = Converted(request.parts, _part_request)
        signed = await self.uploads.presign_parts(principal, uuid.UUID(request.upload_id), parts)
        return pb.PresignUploadPartsResponse(
            parts=[pb.PresignedPart(part_number=s.part_number, url=s.url, headers=s.headers) for s in signed]
        )

    @rpc(SERVICE)
    async def GetUpload(self, request: pb.GetUploadRequest, context, principal: Principal) -> pb.GetUploadResponse:
        upload = await self.uploads.get(principal, uuid.UUID(request.upload_id))
        return pb.GetUploadResponse(upload=upload_pb(upload))

    @rpc(SERVICE)
    async def UploadContent(
        self, request_iterator: AsyncIterator[pb.UploadContentRequest], context, principal: Principal
    ) -> pb.UploadContentResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.upload_id:
            raise InvalidArgument.single("upload_id", "the first message must carry upload_id")

        async def chunks() -> AsyncIterator[bytes]:
            if first.chunk:
                raise InvalidArgument.single("chunk", "the first message carries only upload_id and offset")
            async for message in request_iterator:
                if message.upload_id:
                    raise InvalidArgument.single("upload_id", "only the first message may carry upload_id")
                if message.HasField("offset"):
                    raise InvalidArgument.single("offset", "only the first message may carry offset")
                yield message.chunk

        offset = first.offset.value if first.HasField("offset") else None
        upload = await self.uploads.upload_content(principal, uuid.UUID(first.upload_id), chunks(), offset=offset)
        return pb.UploadContentResponse(upload=upload_pb(upload))

    @rpc(SERVICE)
    async def GetStorageSummary(
        self, request: pb.GetStorageSummaryRequest, context, principal: Principal
    ) -> pb.GetStorageSummaryResponse:
        user_id = principal.user_or_self(request.user_id, "admin", "service")
        summary = await self.accounts.summary(user_id, create=user_id == principal.user_id)
        return pb.GetStorageSummaryResponse(summary=summary_pb(summary))

    @rpc(SERVICE)
    async def AddStorageCredits(
        self, request: pb.AddStorageCreditsRequest, context, principal: Principal
    ) -> pb.AddStorageCreditsResponse:
        principal.require_any("billing", "admin")
        result = await self.purchases.add_credits(
            purchases_domain.CreditRequest(
                user_id=request.user_id,
                provider=_PROVIDER_FROM_PB.get(request.provider, ""),
                payment_reference=request.payment_reference,
                credit_bytes=request.credit_bytes,
                amount_minor=request.amount_minor,
                currency=request.currency,
            )
        )
        return pb.AddStorageCreditsResponse(
            purchase=purchase_pb(result.purchase),
            already_processed=result.already_processed,
            summary=summary_pb(result.summary),
        )

    @rpc(SERVICE)
    async def ListPurchases(self, request: pb.ListPurchasesRequest, context, principal: Principal) -> pb.ListPurchasesResponse:
        user_id = principal.user_or_self(request.user_id, "admin", "billing", "service")
        page, next_token = await self.purchases.list_page(user_id, request.page_size, request.page_token)
        return pb.ListPurchasesResponse(purchases=[purchase_pb(p) for p in page], next_page_token=next_token)

    @rpc(SERVICE)
    async def FreezeAccount(self, request: pb.FreezeAccountRequest, context, principal: Principal) -> pb.FreezeAccountResponse:
        principal.require_any("admin")
        return pb.FreezeAccountResponse(account=account_pb(await self.accounts.freeze(request.user_id, request.reason)))

    @rpc(SERVICE)
    async def UnfreezeAccount(
        self, request: pb.UnfreezeAccountRequest, context, principal: Principal
    ) -> pb.UnfreezeAccountResponse:
        principal.require_any("admin")
        return pb.UnfreezeAccountResponse(account=account_pb(await self.accounts.unfreeze(request.user_id)))
