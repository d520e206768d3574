"""What the rate limiter costs per call: GetStorageSummary with limits off and on, same run.

Two stacks side by side (bench/stack.py): one with MEDIAVAULT_RATE_LIMITS=off, one with the
limiter on and limits raised so that nothing is refused (the burst buckets and the Redis
GCRA script still run for every call). Phases alternate between the stacks in slices so
machine noise hits both alike. Prints one JSON line: p50/p99 ms of sequential calls from one
client (the added latency) and requests/s at --concurrency (the added CPU), and the p50
overhead per call; the goal is under 0.3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time

import asyncpg
import grpc
from stack import bench_stack

from mediavault.auth import Authenticator
from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc

GOAL_P50_OVERHEAD_MS = 0.3


async def raise_limits(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE rate_limit_config SET per_hour = 2000000000, burst_per_second = 1000000")
    finally:
        await conn.close()


async def sequential(target: str, secret: str, seconds: float) -> list[float]:
    metadata = (("authorization", f"Bearer {Authenticator(secret).issue('bench-sequential', ['user'])}"),)
    latencies = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        await stub.GetStorageSummary(storage_pb2.GetStorageSummaryRequest(), metadata=metadata)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await stub.GetStorageSummary(storage_pb2.GetStorageSummaryRequest(), metadata=metadata)
            latencies.append(time.perf_counter() - started)
    return latencies


async def concurrent(target: str, secret: str, seconds: float, clients: int) -> float:
    authenticator = Authenticator(secret)
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)

        async def client(n: int) -> None:
            nonlocal done
            metadata = (("authorization", f"Bearer {authenticator.issue(f'bench-{n}', ['user'])}"),)
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                await stub.GetStorageSummary(storage_pb2.GetStorageSummaryRequest(), metadata=metadata)
                done += 1

        await asyncio.gather(*(client(n) for n in range(clients)))
    return done / seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per slice and stack")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    rps: dict[str, list[float]] = {"off": [], "on": []}
    with contextlib.ExitStack() as stacks:
        off = stacks.enter_context(bench_stack())
        on = stacks.enter_context(bench_stack(extra_env={"MEDIAVAULT_RATE_LIMITS": "on"}))
        asyncio.run(raise_limits(on.database_url))
        time.sleep(6)  # the servers reload limits every 5 s
        for _ in range(args.rounds):
            for mode, stack in (("off", off), ("on", on)):
                latencies[mode] += asyncio.run(sequential(stack.target, stack.jwt_secret, args.seconds))
                rps[mode].append(asyncio.run(concurrent(stack.target, stack.jwt_secret, args.seconds, args.concurrency)))
    result = {"bench": "ratelimit_overhead", "rpc": "GetStorageSummary"}
    for mode in ("off", "on"):
        result[f"limits_{mode}"] = {
            "p50_ms": round(statistics.median(latencies[mode]) * 1000, 3),
            "p99_ms": round(percentile(latencies[mode], 0.99) * 1000, 3),
            "calls": len(latencies[mode]),
            "rps_at_concurrency": round(statistics.median(rps[mode]), 1),
        }
    overhead = result["limits_on"]["p50_ms"] - result["limits_off"]["p50_ms"]
    result["p50_overhead_ms"] = round(overhead, 3)
    result["rps_ratio_on_to_off"] = round(result["limits_on"]["rps_at_concurrency"] / result["limits_off"]["rps_at_concurrency"], 3)
    result["goals"] = {f"p50_overhead_lt_{GOAL_P50_OVERHEAD_MS}ms": overhead < GOAL_P50_OVERHEAD_MS}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
