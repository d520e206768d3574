"""What operators rely on: reflection (grpcurl), health, and a graceful drain."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mediavault.domain import ledger
from mediavault.domain.uploads.records import object_key_for
from mediavault.media.v1 import media_pb2, media_pb2_grpc
from mediavault.rpc import drain
from mediavault.server import Server
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import POOLERS, running
from tests.faults import database_through, proxied
from tests.helpers import begin, error_info, exported_by, fake_jpeg, fetch, put


async def reflect(channel, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(request)
    await call.done_writing()
    return await call.read()


async def test_reflection_lists_both_services_and_serves_their_descriptors(channel):
    listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"mediavault.storage.v1.StorageService", "mediavault.media.v1.MediaService", "grpc.health.v1.Health"} <= names

    found = await reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="mediavault.storage.v1.StorageService"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in found.file_descriptor_response.file_descriptor_proto]
    storage_file = next(f for f in files if f.name == "mediavault/storage/v1/storage.proto")
    assert [m.name for m in storage_file.service[0].method][:2] == ["BeginUpload", "FinalizeUpload"]
    annotations = await reflect(channel, reflection_pb2.ServerReflectionRequest(file_by_filename="google/api/annotations.proto"))
    assert annotations.file_descriptor_response.file_descriptor_proto, "grpcurl resolves imports through reflection"


@pytest.mark.parametrize("service", ["", "mediavault.storage.v1.StorageService", "mediavault.media.v1.MediaService"])
async def test_health_is_serving(channel, service):
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_media_service_needs_a_token(channel):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await media_pb2_grpc.MediaServiceStub(channel).ListFeed(media_pb2.ListFeedRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_shutdown_drains_in_flight_calls_and_refuses_new_ones(make_settings, auth, user_id, storage):
    async with (
        running(make_settings(shutdown_grace_seconds=10)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        draining_storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        data = fake_jpeg(200_000)
        begun = await begin(draining_storage, md, data)
        call = draining_storage.UploadContent(metadata=md)
        await call.write(pb.UploadContentRequest(upload_id=begun.upload.upload_id))
        await call.write(pb.UploadContentRequest(chunk=data[:100_000]))
        # A written message may still sit in the transport: the drain must find the call admitted.
        async with asyncio.timeout(10):
            while server.calls.admitted == 0:
                await asyncio.sleep(0.01)

        draining = asyncio.create_task(server.shutdown(10))
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await draining_storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused.value).reason == "SERVER_SHUTTING_DOWN"
        checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING, "health answers through the drain"
        summary = await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)
        assert summary.summary.reserved_bytes == len(data), "another server in the process serves on"

        await call.write(pb.UploadContentRequest(chunk=data[100_000:]))
        await call.done_writing()
        response = await call
        assert response.upload.state == pb.UPLOAD_STATE_FINALIZED
        await draining


async def test_a_client_calling_steadily_does_not_hold_the_drain_for_the_grace_period(make_settings, auth, user_id):
    md = auth(user_id)
    answers: list[grpc.StatusCode] = []
    async with (
        running(make_settings(shutdown_grace_seconds=10)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        steady = storage_pb2_grpc.StorageServiceStub(channel)
        stop = asyncio.Event()

        async def call_every_50_ms() -> None:
            while not stop.is_set():
                try:
                    await steady.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md, timeout=5)
                    answers.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    answers.append(error.code())
                await asyncio.sleep(0.05)

        caller = asyncio.create_task(call_every_50_ms())
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        await server.shutdown(10)
        took = asyncio.get_running_loop().time() - started
        stop.set()
        await caller
    assert took < drain.SETTLE_SECONDS + 1.0, f"the drain took {took:.2f} s with no call running"
    assert grpc.StatusCode.OK in answers
    assert grpc.StatusCode.UNAVAILABLE in answers, "calls arriving during the drain are refused"


async def test_calls_still_running_when_the_grace_period_ends_are_answered_unavailable(
    make_settings, auth, user_id, storage, pool
):
    md = auth(user_id)
    data = fake_jpeg(50_000)
    begun = await begin(storage, md, data)
    assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
    async with running(make_settings()) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        # A transaction holding the account keeps the finalize waiting past the grace period.
        async with pool.acquire() as conn:
            holding = conn.transaction()
            await holding.start()
            await conn.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user_id)
            try:
                finalizing = storage_pb2_grpc.StorageServiceStub(channel).FinalizeUpload(
                    pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md
                )
                await asyncio.sleep(0.2)
                draining = asyncio.create_task(server.shutdown(0.3))
                with pytest.raises(grpc.aio.AioRpcError) as shed:
                    await finalizing
            finally:
                await holding.rollback()
        await draining
    assert shed.value.code() == grpc.StatusCode.UNAVAILABLE, "clients retry UNAVAILABLE, not CANCELLED"
    assert error_info(shed.value).reason == "SERVER_SHUTTING_DOWN"

    retried = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert retried.upload.state == pb.UPLOAD_STATE_FINALIZED
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.used_bytes, summary.reserved_bytes, summary.media_count) == (len(data), 0, 1)
    assert [m for m in await ledger.audit(pool) if m.user_id == user_id] == []


@pytest.mark.parametrize(("http_addr", "also_ipv4"), [("[::1]:0", False), ("[::]:0", True)])
async def test_the_http_listener_serves_on_ipv6(make_settings, auth, user_id, http_addr, also_ipv4):
    md = auth(user_id)
    data = fake_jpeg(3_000)
    async with (
        running(make_settings(http_addr=http_addr)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        begun = await begin(storage, md, data)
        assert begun.upload_url.startswith(f"http://{http_addr.rpartition(':')[0]}:{server.http_port}/")
        assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
        done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert (await fetch(f"http://[::1]:{server.http_port}/healthz"))[0] == 200
        if also_ipv4:
            assert (await fetch(f"http://127.0.0.1:{server.http_port}/healthz"))[0] == 200


async def test_metrics_count_calls_by_outcome(make_settings, auth, user_id):
    async with running(make_settings(metrics_addr="127.0.0.1:0")) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
            with pytest.raises(grpc.aio.AioRpcError):
                await storage.GetStorageSummary(pb.GetStorageSummaryRequest())
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.metrics.port}/metrics") as response:
            text = await response.text()
    assert 'mediavault_rpc_total{method="GetStorageSummary",outcome="OK",service="StorageService"}' in text
    assert 'mediavault_rpc_total{method="GetStorageSummary",outcome="UNAUTHORIZED",service="StorageService"}' in text
    assert "mediavault_rpc_duration_seconds_bucket" in text


async def rpc_totals(server: Server, method: str) -> dict[str, float]:
    """The server's /metrics: mediavault_rpc_total of one method, by outcome."""
    return await exported_by(server.metrics.port, "mediavault_rpc_total", "outcome", method=method)


async def test_a_call_whose_deadline_passes_while_the_server_works_is_counted_cancelled(make_settings, auth, user_id, pool):
    md = auth(user_id)
    request = pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=100)
    async with (
        running(make_settings(metrics_addr="127.0.0.1:0")) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        await storage.BeginUpload(request, metadata=md)
        before = await rpc_totals(server, "BeginUpload")
        # A transaction holding the account keeps the next reservation waiting past the call's deadline.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user_id)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await storage.BeginUpload(request, metadata=md, timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            async with asyncio.timeout(10):
                while sum((after := await rpc_totals(server, "BeginUpload")).values()) == sum(before.values()):
                    await asyncio.sleep(0.05)
    assert after.get("CANCELLED", 0) == before.get("CANCELLED", 0) + 1
    assert after["OK"] == before["OK"], "a call the client gave up on is not counted OK"


async def becomes(health: health_pb2_grpc.HealthStub, expected: int) -> None:
    """Returns once health answers expected, within 10 s."""
    for _ in range(100):
        if (await health.Check(health_pb2.HealthCheckRequest())).status == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {expected}")


async def test_health_follows_postgres(make_settings, tmp_path):
    import pgserver

    from mediavault.db import migrate

    data_dir = tmp_path / "pg"
    postgres = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        await migrate(postgres.get_uri())
        settings = make_settings(database_url=postgres.get_uri(), health_probe_seconds=0.2, db_pool_min_size=1)
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await becomes(health, health_pb2.HealthCheckResponse.SERVING)
            await asyncio.to_thread(postgres.cleanup)
            await becomes(health, health_pb2.HealthCheckResponse.NOT_SERVING)
            postgres = await asyncio.to_thread(pgserver.get_server, data_dir, cleanup_mode="stop")
            await becomes(health, health_pb2.HealthCheckResponse.SERVING)
    finally:
        postgres.cleanup()


@pytest.mark.parametrize("pooler", POOLERS)
async def test_health_answers_not_serving_soon_after_postgres_stops_answering(
    make_settings, postgres_admin_url, database_url, pooler
):
    """PostgreSQL hangs, or the network to it: the probe's statement is never answered, nor is its
    cancel (PgBouncer 1.18 ignores the cancel of a statement waiting for a server connection)."""
    async with proxied(postgres_admin_url) as proxy:
        with database_through(pooler, proxy, postgres_admin_url, database_url) as url:
            settings = make_settings(database_url=url, database_pooler=pooler, health_probe_seconds=0.2, db_pool_min_size=1)
            async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await becomes(health, health_pb2.HealthCheckResponse.SERVING)
                proxy.freeze()
                try:
                    await becomes(health, health_pb2.HealthCheckResponse.NOT_SERVING)
                finally:
                    await proxy.down()
                    await proxy.up()
                await becomes(health, health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("pooler", POOLERS)
async def test_shutdown_ends_while_postgres_stops_answering(make_settings, postgres_admin_url, database_url, auth, user_id, pooler):
    """A call whose statement PostgreSQL never answers is shed at the end of the grace period, and
    the server stops all the same, its connections closed without a goodbye."""
    async with proxied(postgres_admin_url) as proxy:
        with database_through(pooler, proxy, postgres_admin_url, database_url) as url:
            server = Server(make_settings(database_url=url, database_pooler=pooler))
            await server.startup()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                    storage = storage_pb2_grpc.StorageServiceStub(channel)
                    proxy.freeze()
                    call = storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))
                    async with asyncio.timeout(10):
                        while server.calls.admitted == 0:
                            await asyncio.sleep(0.01)
                    async with asyncio.timeout(server.settings.shutdown_grace_seconds + 10):
                        await server.shutdown(server.settings.shutdown_grace_seconds)
                    with pytest.raises(grpc.aio.AioRpcError) as shed:
                        await call
                    assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await proxy.down()
                await server.shutdown(0)


async def test_serve_takes_long_lived_objects_out_of_the_collector(make_settings):
    gc.unfreeze()
    server = Server(make_settings())
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not gc.get_freeze_count():
                await asyncio.sleep(0.05)
        assert server.pool is not None
        assert not any(obj is server.pool for obj in gc.get_objects()), "every collection still walks the pool"
        reply = await health_check(server.grpc_port)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.shutdown(0)
        await serving
        gc.unfreeze()


async def health_check(port: int) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(4096) == b""
    except ConnectionResetError:
        return True


async def test_the_http_listener_closes_connections_that_send_no_request_or_trickle_its_headers(server):
    # Each connection an anonymous client keeps costs the process a file descriptor: one that never
    # finishes a request's headers must not keep it for long (as the gateway's read-header timeout).
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    trickling_reader, trickling_writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    trickling_writer.write(b"GET /healthz HTTP/1.1\r\nHost: mediavault\r\n")

    async def trickle() -> None:
        for number in range(60):
            await asyncio.sleep(0.5)
            trickling_writer.write(b"X-Slow-%d: 1\r\n" % number)

    trickling = asyncio.create_task(trickle())
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(25):
            assert await _closed_by_server(silent_reader)
            assert await _closed_by_server(trickling_reader)
        assert asyncio.get_running_loop().time() - started < 25
    finally:
        trickling.cancel()
        silent_writer.close()
        trickling_writer.close()


async def test_a_signed_put_whose_body_stalls_is_ended_and_keeps_nothing(make_settings, auth, user_id):
    # A PUT whose body stops coming (a client gone without closing, or one that holds its
    # connections on purpose) held its connection and a temp file for as long as it stayed open.
    md = auth(user_id)
    data = fake_jpeg(1_000_000)
    async with (
        running(make_settings(tus_idle_timeout_seconds=1)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        begun = await begin(storage, md, data)
        url = urlsplit(begun.upload_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        head = f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in begun.upload_headers.items())
        writer.write(head.encode() + b"\r\n" + data[:1000])
        temp_dir = Path(server.blobs.new_temp_file()).parent
        try:
            async with asyncio.timeout(15):
                status_line = await reader.readline()
            assert status_line.startswith(b"HTTP/1.1 400"), status_line
            assert not any(temp_dir.iterdir()), "the stalled body's temp file is gone"
        finally:
            writer.close()
        assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
        done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert done.upload.state == pb.UPLOAD_STATE_FINALIZED


async def test_a_single_upload_content_stream_that_stalls_is_refused_and_keeps_nothing(make_settings, auth, user_id):
    # A SINGLE upload's stream had no pace rule: one gone silent, or sending empty chunks, held
    # its call, a file descriptor and a temp file for as long as the client kept it open.
    md = auth(user_id)
    data = fake_jpeg(300_000)
    stop = asyncio.Event()

    async def silent(upload_id: str) -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id)
        yield pb.UploadContentRequest(chunk=data[:1000])
        await stop.wait()

    async def empty_chunks(upload_id: str) -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id)
        yield pb.UploadContentRequest(chunk=data[:1000])
        while not stop.is_set():
            yield pb.UploadContentRequest(chunk=b"")
            await asyncio.sleep(0.05)

    async def refusal(call) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, timeout=15)
        return caught.value

    async with (
        running(make_settings(tus_idle_timeout_seconds=1)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        begun = [await begin(storage, md, data) for _ in range(2)]
        temp_dir = Path(server.blobs.new_temp_file()).parent
        try:
            refused = await asyncio.gather(
                refusal(storage.UploadContent(silent(begun[0].upload.upload_id), metadata=md)),
                refusal(storage.UploadContent(empty_chunks(begun[1].upload.upload_id), metadata=md)),
            )
        finally:
            stop.set()
        for error in refused:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert error_info(error).reason == "STREAM_STALLED"
        assert not any(temp_dir.iterdir()), "the stalled streams' temp files are gone"
        for each in begun:
            assert not server.blobs.path(object_key_for(uuid.UUID(each.upload.upload_id))).exists()
            got = await storage.GetUpload(pb.GetUploadRequest(upload_id=each.upload.upload_id), metadata=md)
            assert got.upload.state == pb.UPLOAD_STATE_PENDING, "a stalled stream leaves the upload retryable"
            whole = [pb.UploadContentRequest(upload_id=each.upload.upload_id), pb.UploadContentRequest(chunk=data)]
            done = await storage.UploadContent(iter(whole), metadata=md)
            assert done.upload.state == pb.UPLOAD_STATE_FINALIZED


async def test_calls_beyond_a_connections_stream_limit_wait_for_one_to_end(make_settings):
    # Each open call may hold a request message before it is authenticated: one connection may
    # not open more calls than the limit at once.
    async with (
        running(make_settings(grpc_max_concurrent_streams=1)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        check = asyncio.ensure_future(health.Check(health_pb2.HealthCheckRequest()))
        done, _ = await asyncio.wait([check], timeout=1)
        assert not done, "a second call on the connection waits while the first is open"
        watch.cancel()
        async with asyncio.timeout(10):
            answered = await check
        assert answered.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_connections_without_calls_are_closed(make_settings):
    # Each connection costs the process a file descriptor; one that carries no call is let go.
    async with running(make_settings(grpc_idle_connection_seconds=1)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.grpc_port)
        try:
            # The HTTP/2 preface and an empty SETTINGS frame: a connection, and no call on it.
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            await writer.drain()
            async with asyncio.timeout(15):
                while await reader.read(65536):
                    pass
        finally:
            writer.close()
