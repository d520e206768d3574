"""What clients can send wrong, through the real server: every mistake is a client error, never INTERNAL."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest

from mediavault.media.v1 import media_pb2 as mpb
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import JWT_SECRET
from tests.helpers import error_info


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
