"""MediaService: declared with its full contract; every RPC answers UNIMPLEMENTED until the media issue lands."""

from __future__ import annotations

import grpc

from mediavault.media.v1 import media_pb2_grpc

_MESSAGE = "MediaService is declared but not served yet"


class MediaServicer(media_pb2_grpc.MediaServiceServicer):
    async def GetMedia(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)

    async def ListFeed(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)

    async def DeleteMedia(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)

    async def SaveMedia(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)

    async def ReprocessMedia(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)

    async def RecordEvents(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _MESSAGE)
