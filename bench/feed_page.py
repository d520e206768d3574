"""ListFeed throughput with the page in Redis against the same call computing it from PostgreSQL.

One server (bench/stack.py), seeded in its database with --owners accounts of 20 media each
(with a thumbnail variant each, straight by SQL as bench/sql_throughput.py seeds), then two
phases in the same run with the same client (--concurrency asyncio workers over 4 grpc.aio
channels in one process, --warmup then --duration seconds each, every call timed):

  cached    ListFeed(page_size=20) of 64 owners over and over: after the warmup every call
            is a Redis hit (feed:v + the page key) and the signing of the media URLs
  uncached  ListFeed(page_size=20) of an owner nobody asked for yet, a new one every call:
            every call misses, reads the page from PostgreSQL (media + counters + variants)
            and writes it to Redis

Each phase reports rps, p50/p99 ms and errors. `owners_left` says whether the uncached phase
ran out of fresh owners (then its last calls were hits and the figure is too high: raise
--owners). Prints one JSON line; exits 1 on any failed call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time

import asyncpg
import grpc
from sql_throughput import SEED, SEED_VARIANTS
from stack import bench_stack

from mediavault.auth import Authenticator
from mediavault.media.v1 import media_pb2, media_pb2_grpc

PAGE = 20
HOT_OWNERS = 64
CHANNELS = 4


async def seed(url: str, owners: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SEED, owners, PAGE)
        await conn.execute(SEED_VARIANTS)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def _percentile_ms(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered), max(1, math.ceil(p / 100 * len(ordered)))) - 1] * 1000, 2)


async def phase(target: str, owners: itertools.count | itertools.cycle, tokens: dict[str, str], args: argparse.Namespace) -> dict:
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]
    stubs = [media_pb2_grpc.MediaServiceStub(c) for c in channels]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    window = (start + args.warmup, start + args.warmup + args.duration)

    async def worker(index: int) -> None:
        nonlocal errors
        stub = stubs[index % CHANNELS]
        while (t0 := time.perf_counter()) < window[1]:
            owner = f"bench-{next(owners)}"
            try:
                reply = await stub.ListFeed(media_pb2.ListFeedRequest(user_id=owner, page_size=PAGE),
                                            metadata=(("authorization", f"Bearer {tokens[owner]}"),), timeout=30)
                assert len(reply.media) == PAGE
            except (grpc.aio.AioRpcError, AssertionError, KeyError):
                errors += 1
                continue
            t1 = time.perf_counter()
            if window[0] <= t1 < window[1]:
                latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    ordered = sorted(latencies)
    return {"rps": round(len(ordered) / args.duration, 1), "p50_ms": _percentile_ms(ordered, 50),
            "p99_ms": _percentile_ms(ordered, 99), "requests": len(ordered), "errors": errors}


async def measure(target: str, jwt_secret: str, args: argparse.Namespace) -> dict:
    authenticator = Authenticator(jwt_secret)
    ttl = 3600
    tokens = {f"bench-{i}": authenticator.issue(f"bench-{i}", ["user"], ttl_seconds=ttl) for i in range(1, args.owners + 1)}
    cached = await phase(target, itertools.cycle(range(1, HOT_OWNERS + 1)), tokens, args)
    fresh = itertools.count(HOT_OWNERS + 1)
    uncached = await phase(target, fresh, tokens, args)
    owners_left = next(fresh) <= args.owners
    return {"cached": cached, "uncached": uncached, "owners_left": owners_left}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, default=30000, help="seeded owners, 20 media each (default 30000)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    with bench_stack() as stack:
        print(f"[feed_page] seeding {args.owners} owners", file=sys.stderr, flush=True)
        asyncio.run(seed(stack.database_url, args.owners))
        figures = asyncio.run(measure(stack.target, stack.jwt_secret, args))
    cached, uncached = figures["cached"], figures["uncached"]
    result = {
        "benchmark": "feed_page",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "owners": args.owners,
        "load_average_1m": load_before,
        **figures,
        "cached_to_uncached": round(cached["rps"] / uncached["rps"], 2) if uncached["rps"] else None,
        "goals": {
            "no_errors": cached["errors"] == uncached["errors"] == 0,
            "uncached_calls_all_misses": figures["owners_left"],
            "cache_faster_than_database": cached["rps"] > uncached["rps"],
        },
    }
    print(json.dumps(result), flush=True)
    return 0 if result["goals"]["no_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
