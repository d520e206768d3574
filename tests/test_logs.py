from __future__ import annotations

import json
import logging

import grpc
import pytest

from mediavault import logs
from mediavault.storage.v1 import storage_pb2 as pb


def test_json_line_carries_request_id_and_extras():
    token = logs.request_id.set("req-42")
    try:
        record = logging.LogRecord("mediavault.rpc", logging.INFO, __file__, 1, "rpc", None, None)
        record.outcome = "OK"
        line = logs.JsonFormatter().format(record)
    finally:
        logs.request_id.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "req-42"
    assert entry["outcome"] == "OK"
    assert entry["msg"] == "rpc"


async def test_request_id_is_echoed_in_trailers(storage, auth, user_id):
    call = storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(*auth(user_id), ("x-request-id", "abc-123")))
    await call
    assert ("x-request-id", "abc-123") in tuple(await call.trailing_metadata())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("x-request-id", "def-456"),))
    assert ("x-request-id", "def-456") in tuple(caught.value.trailing_metadata())


async def test_a_call_without_request_id_gets_a_new_one(storage, auth, user_id):
    seen = set()
    for _ in range(3):
        call = storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
        await call
        ids = [value for key, value in await call.trailing_metadata() if key == "x-request-id"]
        assert len(ids) == 1
        assert len(ids[0]) == 32
        seen.add(ids[0])
    assert len(seen) == 3


async def test_tokens_never_reach_the_logs(storage, auth, user_id, caplog):
    import logging

    md = auth(user_id)
    token = md[0][1].split(" ", 1)[1]
    with caplog.at_level(logging.DEBUG):
        await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError):
            await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=(("authorization", f"Bearer {token}x"),))
    lines = [logs.JsonFormatter().format(record) for record in caplog.records]
    assert any('"rpc": "StorageService/GetStorageSummary"' in line for line in lines)
    assert not any(token in line for line in lines)
