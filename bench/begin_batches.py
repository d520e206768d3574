"""What a reservation costs the server process by batch size: why upload batches are spaced.

Calls mediavault.domain.uploads.Uploads.begin (validation, the batched reservation statement
through asyncpg, the signed upload URL) in this process, no gRPC,
from --concurrency-levels closed-loop workers, each its own user. With N workers every
batch carries the N calls, so N is the batch size. Per level it reports this process's
CPU time per call (time.process_time: the Python, asyncpg and event-loop work a server
process pays, PostgreSQL's own CPU excluded), wall time per call, and the batches counted
in the database: every upload of one batch got the same created_at (now() of its
transaction), so calls_per_batch = uploads / distinct created_at.

After each level it checks that every call got a pending upload and that the ledger
audit passes. Database as bench/stack.py. Prints exactly one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

BODY_SIZE = 64 * 1024
SHA256 = "a" * 64


async def _measure(database_url: str, levels: list[int], calls: int) -> dict:
    from mediavault.auth import Principal
    from mediavault.blobs import open_blob_store
    from mediavault.config import Settings
    from mediavault.db import create_pool, migrate
    from mediavault.domain import ledger, uploads
    from mediavault.jobs import TranscodeQueue

    await migrate(database_url)
    with tempfile.TemporaryDirectory(prefix="mediavault-bench-batches-") as blob_dir:
        settings = Settings(
            database_url=database_url, blob_dir=Path(blob_dir), jwt_secret=secrets.token_hex(32), upload_batch_spacing_seconds=0
        )
        pool = await create_pool(settings)
        blobs = await open_blob_store(settings)
        try:
            service = uploads.Uploads(pool, blobs, settings, TranscodeQueue(None), uploads.Resumable(pool, blobs, settings))
            request = uploads.BeginRequest("bench.jpg", "image/jpeg", BODY_SIZE, SHA256, None, "permanent")
            result: dict = {"cpu_us_per_call": {}, "wall_us_per_call": {}, "calls_per_batch": {}}
            for level in levels:
                run_id = secrets.token_hex(4)
                principals = [Principal(f"batches-{run_id}-{i}", frozenset({"user"})) for i in range(level)]
                per_worker = max(1, calls // level)

                async def worker(principal: Principal, count: int) -> None:
                    for _ in range(count):
                        await service.begin(principal, request)

                # Warm-up: accounts exist, statements are prepared.
                await asyncio.gather(*(worker(p, 2) for p in principals))
                started_wall = time.perf_counter()
                started_cpu = time.process_time()
                measured_from = await pool.fetchval("SELECT clock_timestamp()")
                await asyncio.gather(*(worker(p, per_worker) for p in principals))
                cpu = time.process_time() - started_cpu
                wall = time.perf_counter() - started_wall
                done = per_worker * level
                uploads_made, batches = await pool.fetchrow(
                    "SELECT count(*), count(DISTINCT created_at) FROM uploads"
                    " WHERE user_id LIKE $1 AND created_at >= $2 AND state = 'pending'",
                    f"batches-{run_id}-%",
                    measured_from,
                )
                if uploads_made != done:
                    raise RuntimeError(f"{done} calls at concurrency {level} but {uploads_made} pending uploads")
                result["cpu_us_per_call"][str(level)] = round(cpu / done * 1e6, 1)
                result["wall_us_per_call"][str(level)] = round(wall / done * 1e6, 1)
                result["calls_per_batch"][str(level)] = round(uploads_made / batches, 2)
                print(f"[begin_batches] concurrency {level}: {json.dumps({k: v[str(level)] for k, v in result.items()})}",
                      file=sys.stderr, flush=True)
            mismatches = await ledger.audit(pool)
            if mismatches:
                raise RuntimeError(f"ledger audit found {len(mismatches)} mismatched accounts")
            result["ledger_audit"] = "ok"
            return result
        finally:
            await blobs.close()
            await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency-levels", default="1,3,8,32", help="comma-separated (default 1,3,8,32)")
    parser.add_argument("--calls", type=int, default=6000, help="measured calls per level (default 6000)")
    parser.add_argument("--target", help="ignored: this benchmark runs the domain code in-process (bench/run.py passes it to all)")
    parser.add_argument("--jwt-secret", help="ignored, as --target")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency_levels.split(",")]
    if not levels or min(levels) < 1 or args.calls < 1:
        parser.error("concurrency levels and --calls must be >= 1")

    import uvloop
    from stack import bench_database, bench_postgres

    with bench_postgres() as admin_url, bench_database(admin_url) as database_url:
        result = uvloop.run(_measure(database_url, levels, args.calls))
    print(json.dumps({"bench": "begin_batches", "calls": args.calls, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
