"""Telemetry retention: dropping day partitions past retention against DELETE in batches.

Seeds --events usage events (default 1,000,000; --events 10000000 for the issue's figure)
received evenly over the last --days days (40), in received_at order as production writes
them, into two tables of one database migrated to the current schema:

  usage_events              partitioned by day (migration 0011)
  usage_events_unpartitioned the table before 0011 (0002's definition: identity primary key,
                            indexes on (user_id, occurred_at), (media_id, event_type), received_at)

Both hold the very same rows (the second is filled from the first). Seeding is set-based
SQL, then VACUUM ANALYZE and CHECKPOINT; it is timed (seed_s) but not measured.

Then, with a 30-day retention (the job's default):

  partitions  workers.maintenance.prune_telemetry, the job itself: the day partitions whose
              every event is past retention go, each as one DROP TABLE
  delete      the statement prune_telemetry ran before 0011, batch after batch of 5000 rows
              (its default batch size), each batch its own transaction, until a short batch

Each measurement runs while one client inserts an event into the table being pruned every
--insert-every-ms (the RecordEvents path's insert); insert_p50_ms/insert_max_ms are its
latencies over the prune, so a lock that stalls the inserts shows there.

Verified after both: the partitioned table holds exactly the seeded rows received on or after
the cutoff's UTC day (the partition holding the cutoff stays whole), the other exactly the
rows received on or after its cutoff, and neither any older row. Table sizes before and after
(pg_total_relation_size, indexes included) show what each leaves on disk.

Database as bench/stack.py: MEDIAVAULT_BENCH_DATABASE_URL (else MEDIAVAULT_TEST_DATABASE_URL)
as admin URL, else an embedded pgserver. Prints one JSON line; exits 1 unless verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import asyncpg
from stack import bench_database, bench_postgres

from mediavault.config import JobConfig
from mediavault.db import migrate
from workers.maintenance import RunReport, prune_telemetry

RETENTION = timedelta(days=30)
DELETE_BATCH = 5000

UNPARTITIONED = """
CREATE TABLE usage_events_unpartitioned (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text NOT NULL,
    media_id    uuid NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN
                ('impression', 'dwell_start', 'dwell_end', 'click', 'open', 'share', 'like', 'save', 'hide', 'report')),
    surface     text NOT NULL DEFAULT '' CHECK (length(surface) <= 64),
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    meta        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX usage_events_unpartitioned_user_timeline ON usage_events_unpartitioned (user_id, occurred_at DESC);
CREATE INDEX usage_events_unpartitioned_item ON usage_events_unpartitioned (media_id, event_type);
CREATE INDEX usage_events_unpartitioned_received ON usage_events_unpartitioned (received_at);
"""

# The rows, oldest first: event_id follows received_at as it does when clients send them.
SEED = """
INSERT INTO usage_events (user_id, media_id, event_type, surface, occurred_at, received_at, meta)
SELECT 'user-' || (i % 20000), md5((i % 200000)::text)::uuid,
       (ARRAY['impression', 'impression', 'impression', 'dwell_start', 'dwell_end', 'click', 'like', 'share'])[i % 8 + 1],
       'feed', t - interval '2 seconds', t, jsonb_build_object('position', i % 50)
FROM generate_series(1, $1::bigint) AS i,
     LATERAL (SELECT $2::timestamptz + ($3::float8 * i / $1) * interval '1 second' AS t) AS at
"""

COPY = """
INSERT INTO usage_events_unpartitioned (event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta)
OVERRIDING SYSTEM VALUE
SELECT event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta FROM usage_events ORDER BY event_id
"""

# prune_telemetry's statement before migration 0011, on the table of that time.
DELETE_OLD = """
WITH old AS (
    SELECT event_id FROM usage_events_unpartitioned
    WHERE received_at < now() - make_interval(secs => $2)
    ORDER BY event_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM usage_events_unpartitioned e USING old WHERE e.event_id = old.event_id
RETURNING e.event_id
"""

INSERT_ONE = (
    "INSERT INTO {table} (user_id, media_id, event_type, surface, occurred_at, meta) "
    "VALUES ('user-live', gen_random_uuid(), 'impression', 'feed', now(), '{{}}')"
)

SIZE = "SELECT pg_total_relation_size(c.oid) + coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) " \
       "FROM pg_class c LEFT JOIN pg_inherits i ON i.inhparent = c.oid WHERE c.relname = $1 GROUP BY c.oid"


def _log(message: str) -> None:
    print(f"[telemetry_prune] {message}", file=sys.stderr, flush=True)


async def seed(url: str, events: int, days: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.execute(UNPARTITIONED)
        first = await conn.fetchval("SELECT now() - make_interval(days => $1)", days)
        await conn.execute("SELECT usage_events_add_partitions(($1::timestamptz AT TIME ZONE 'UTC')::date, current_date)", first)
        await conn.execute(SEED, events, first, float(days * 86400))
        await conn.execute(COPY)
        await conn.execute("SELECT setval(pg_get_serial_sequence('usage_events_unpartitioned', 'event_id'), max(event_id)) FROM usage_events")
        await conn.execute("VACUUM ANALYZE usage_events_unpartitioned")
        await conn.execute("VACUUM ANALYZE usage_events")
        await conn.execute("CHECKPOINT")
        partitions = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'usage_events'::regclass")
        return {"seed_s": round(time.perf_counter() - started, 1), "partitions": partitions}
    finally:
        await conn.close()


class Inserter:
    """Inserts one event every interval into a table while a prune runs; keeps the latencies."""

    def __init__(self, url: str, table: str, interval_s: float) -> None:
        self._url, self._sql, self._interval = url, INSERT_ONE.format(table=table), interval_s
        self.latencies_ms: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Inserter:
        self._conn = await asyncpg.connect(self._url)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            await self._conn.execute(self._sql)
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(self._interval)

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        await self._conn.close()

    def figures(self) -> dict[str, float | int]:
        ordered = sorted(self.latencies_ms)
        return {"inserts": len(ordered), "insert_p50_ms": round(statistics.median(ordered), 2), "insert_max_ms": round(ordered[-1], 1)}


async def measure_partitions(url: str, insert_every_s: float) -> dict[str, Any]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        size_before = await pool.fetchval(SIZE, "usage_events")
        report = RunReport(job="prune_telemetry", dry_run=False)
        config = JobConfig(every_seconds=86400, age_seconds=int(RETENTION.total_seconds()), batch_size=DELETE_BATCH)
        async with Inserter(url, "usage_events", insert_every_s) as inserter:
            started = time.perf_counter()
            await prune_telemetry({"pool": pool}, report, config)
            seconds = time.perf_counter() - started
        return {
            "seconds": round(seconds, 3),
            "partitions_dropped": len(report.details["partitions_dropped"]),
            "size_before_mb": round(size_before / 2**20),
            "size_after_mb": round(await pool.fetchval(SIZE, "usage_events") / 2**20),
            **inserter.figures(),
        }
    finally:
        await pool.close()


async def measure_delete(url: str, insert_every_s: float) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        size_before = await conn.fetchval(SIZE, "usage_events_unpartitioned")
        deleted = batches = 0
        async with Inserter(url, "usage_events_unpartitioned", insert_every_s) as inserter:
            started = time.perf_counter()
            while True:
                async with conn.transaction():
                    rows = await conn.fetch(DELETE_OLD, DELETE_BATCH, RETENTION.total_seconds())
                deleted += len(rows)
                batches += 1
                if len(rows) < DELETE_BATCH:
                    break
            seconds = time.perf_counter() - started
        return {
            "seconds": round(seconds, 3),
            "rows_deleted": deleted,
            "batches": batches,
            "rows_per_s": round(deleted / seconds),
            "size_before_mb": round(size_before / 2**20),
            "size_after_mb": round(await conn.fetchval(SIZE, "usage_events_unpartitioned") / 2**20),
            **inserter.figures(),
        }
    finally:
        await conn.close()


async def verify(url: str, seeded_before: asyncpg.Record) -> list[str]:
    """What is wrong with the rows left, if anything."""
    conn = await asyncpg.connect(url)
    problems = []
    try:
        cutoff = await conn.fetchval("SELECT now() - make_interval(secs => $1)", RETENTION.total_seconds())
        cutoff_day_start = await conn.fetchval("SELECT (($1::timestamptz AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'", cutoff)
        seeded = "user_id <> 'user-live'"
        left_partitioned = await conn.fetchval(f"SELECT count(*) FROM usage_events WHERE {seeded}")
        if left_partitioned != seeded_before["from_cutoff_day"]:
            problems.append(f"partitioned: {left_partitioned} rows left, {seeded_before['from_cutoff_day']} received from the cutoff's day on")
        if await conn.fetchval("SELECT count(*) FROM usage_events WHERE received_at < $1", cutoff_day_start):
            problems.append("partitioned: rows older than the cutoff's day left")
        # The delete ran after the partition drop: its cutoff is later than the one sampled before both.
        left_deleted = await conn.fetchval(f"SELECT count(*) FROM usage_events_unpartitioned WHERE {seeded}")
        if await conn.fetchval("SELECT count(*) FROM usage_events_unpartitioned WHERE received_at < $1", seeded_before["cutoff"]):
            problems.append("delete: rows older than the cutoff left")
        if left_deleted < await conn.fetchval(
                f"SELECT count(*) FROM usage_events_unpartitioned WHERE {seeded} AND received_at >= $1", cutoff):
            problems.append("delete: rows newer than the cutoff gone")
        if await conn.fetchval("SELECT count(*) FROM usage_events WHERE user_id = 'user-live'") == 0:
            problems.append("no insert during the partition drop")
    finally:
        await conn.close()
    return problems


async def counts_before(url: str) -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE received_at >= ((c AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC') AS from_cutoff_day,"
            " count(*) FILTER (WHERE received_at < c) AS past_retention, count(*) AS total, c AS cutoff"
            " FROM usage_events, (SELECT now() - make_interval(secs => $1) AS c) AS cut GROUP BY c",
            RETENTION.total_seconds())
    finally:
        await conn.close()


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    _log(f"migrating and seeding {args.events} events over {args.days} days")
    await migrate(url)
    seeded = await seed(url, args.events, args.days)
    before = await counts_before(url)
    _log(f"seeded in {seeded['seed_s']} s; {before['past_retention']} events past retention")
    interval = args.insert_every_ms / 1000
    partitions = await measure_partitions(url, interval)
    _log(f"partitions: {partitions}")
    delete = await measure_delete(url, interval)
    _log(f"delete: {delete}")
    problems = await verify(url, before)
    for problem in problems:
        _log(f"NOT VERIFIED: {problem}")
    speedup = delete["seconds"] / partitions["seconds"] if partitions["seconds"] else None
    return {
        "benchmark": "telemetry_prune",
        "events": args.events,
        "days": args.days,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "events_past_retention": before["past_retention"],
        **seeded,
        "partitions": partitions,
        "delete": delete,
        "speedup": round(speedup, 1) if speedup else None,
        "verified": not problems,
        "goals": {
            "partition_prune_10x_faster_than_delete": speedup is not None and speedup >= 10,
            "partition_prune_frees_the_space": partitions["size_after_mb"] < partitions["size_before_mb"],
            "verified": not problems,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events seeded (the issue's figure: 10000000)")
    parser.add_argument("--days", type=int, default=40, help="days they were received over, ending now")
    parser.add_argument("--insert-every-ms", type=float, default=20.0, help="the live inserter's pause between inserts")
    args = parser.parse_args()
    with bench_postgres() as admin_url, bench_database(admin_url) as url:
        result = asyncio.run(run(args, url))
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
