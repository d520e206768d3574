"""Finalize -> COMPLETE latency of a 3264x2448 phone JPEG on a running stack (server + one worker).

Prints one JSON line: p50/p99 ms from the FinalizeUpload response until GetMedia shows
COMPLETE, and, measured in the same run on the same bytes, the floor: the transcode alone
(mediavault.imaging.Transcoder in this process), so the difference is what the queue, the
blob reads and writes and the status updates cost.

Workers poll the queue every WORKER_POLL_DELAY_SECONDS (50 ms), and a client that uploads
again as soon as the last one completed falls into step with those polls: every run then
waits the same part of a poll. A random pause of up to two polls before each Finalize
makes the runs land anywhere in the poll cycle, as independent uploads do.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import grpc
from stack import bench_stack

from mediavault.auth import Authenticator
from mediavault.imaging import Transcoder
from mediavault.media.v1 import media_pb2, media_pb2_grpc
from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "images" / "camera" / "jolla.jpg"
POLL_SECONDS = 0.005
PHASE_SPREAD_SECONDS = 0.1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        "n": len(values),
    }


async def end_to_end(target: str, secret: str, data: bytes, runs: int) -> list[float]:
    metadata = (("authorization", f"Bearer {Authenticator(secret).issue('bench-latency', ['user'])}"),)
    digest = hashlib.sha256(data).hexdigest()
    latencies = []
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as http:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)
        for _ in range(runs):
            begun = await storage.BeginUpload(
                storage_pb2.BeginUploadRequest(filename="jolla.jpg", content_type="image/jpeg", size_bytes=len(data), sha256=digest),
                metadata=metadata,
            )
            async with http.put(begun.upload_url, data=data, headers=dict(begun.upload_headers)) as response:
                response.raise_for_status()
            await asyncio.sleep(random.uniform(0, PHASE_SPREAD_SECONDS))
            done = await storage.FinalizeUpload(storage_pb2.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=metadata)
            started = time.perf_counter()
            while True:
                item = (await media.GetMedia(media_pb2.GetMediaRequest(media_id=done.media_id), metadata=metadata)).media
                if item.processing_status == media_pb2.PROCESSING_STATUS_COMPLETE:
                    break
                if item.processing_status == media_pb2.PROCESSING_STATUS_FAILED:
                    raise RuntimeError(f"processing failed: {item.processing_error}")
                await asyncio.sleep(POLL_SECONDS)
            latencies.append(time.perf_counter() - started)
    return latencies


async def transcode_only(data: bytes, runs: int) -> list[float]:
    times = []
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(data, "image/jpeg")
        for _ in range(runs):
            started = time.perf_counter()
            await transcoder.run(data, "image/jpeg")
            times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--target", help="HOST:PORT of a running server with a worker")
    parser.add_argument("--jwt-secret")
    args = parser.parse_args()
    data = PHOTO.read_bytes()
    floor = asyncio.run(transcode_only(data, args.runs))
    if args.target:
        measured = asyncio.run(end_to_end(args.target, args.jwt_secret, data, args.runs))
    else:
        with bench_stack(with_worker=True) as stack:
            measured = asyncio.run(end_to_end(stack.target, stack.jwt_secret, data, args.runs))
    result = {
        "bench": "processing_latency",
        "photo": "jolla.jpg 3264x2448",
        "finalize_to_complete": summary(measured),
        "transcode_only": summary(floor),
        "overhead_p50_ms": round((statistics.median(measured) - statistics.median(floor)) * 1000, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
