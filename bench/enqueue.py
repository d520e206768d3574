"""What one round trip for "media created" is worth: the enqueue script against arq's enqueue_job plus a feed bump.

A new media's transcode run and its owner's feed-version bump go to Redis as one script call
(mediavault.jobs). The alternative is arq's own enqueue_job (WATCH, EXISTS, MULTI/EXEC) followed
by Feed.changed. Both are timed on the same Redis in the same run, alternating rounds:
`sequential` is one caller awaiting each call (a lone FinalizeUpload's added latency), `concurrent`
is --concurrency callers at once (the TranscodeQueue batches the script's runs; the baseline gets
no batching, as arq has none). Prints one JSON line: medians per call and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from arq.connections import ArqRedis, RedisSettings, create_pool
from stack import bench_redis

from mediavault import jobs
from mediavault.domain.feed import Feed
from mediavault.domain.pages import PageTokens


async def _one_round(redis: ArqRedis, feed: Feed, script: jobs.TranscodeQueue, calls: int, concurrency: int) -> dict[str, float]:
    owners = [f"bench-enqueue-{uuid.uuid4().hex[:8]}" for _ in range(concurrency)]

    async def ours(owner: str) -> None:
        await script.enqueue(uuid.uuid4(), 0, feed_owner=owner)

    async def arqs(owner: str) -> None:
        media_id = uuid.uuid4()
        await redis.enqueue_job(jobs.TRANSCODE, str(media_id), 0, _job_id=jobs.transcode_job_id(media_id, 0))
        await feed.changed(owner)

    timings: dict[str, float] = {}
    for name, call in (("script", ours), ("arq_and_feed", arqs)):
        started = time.perf_counter()
        for _ in range(calls):
            await call(owners[0])
        timings[f"sequential_{name}_us"] = (time.perf_counter() - started) / calls * 1e6
        started = time.perf_counter()
        per_caller = max(1, calls // concurrency)

        async def caller(owner: str, call=call, per_caller=per_caller) -> None:
            for _ in range(per_caller):
                await call(owner)

        await asyncio.gather(*(caller(owner) for owner in owners))
        timings[f"concurrent_{name}_us"] = (time.perf_counter() - started) / (per_caller * concurrency) * 1e6
    return timings


async def _measure(redis_url: str, rounds: int, calls: int, concurrency: int) -> dict[str, object]:
    queue_name = f"bench-enqueue:{uuid.uuid4().hex}"
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue_name)
    try:
        # Feed.changed touches only Redis: no database, and no page tokens are made.
        feed = Feed(None, redis, 30, PageTokens(b"bench"))  # type: ignore[arg-type]
        script = jobs.TranscodeQueue(redis)
        results = [await _one_round(redis, feed, script, calls, concurrency) for _ in range(rounds)]
    finally:
        keys = [key async for key in redis.scan_iter("arq:job:transcode:*")]
        keys += [key async for key in redis.scan_iter("feed:v:bench-enqueue-*")]
        for start in range(0, len(keys), 1000):
            await redis.delete(*keys[start : start + 1000])
        await redis.delete(queue_name)
        await redis.aclose()
    medians = {key: round(statistics.median(r[key] for r in results), 1) for key in results[0]}
    return {
        "bench": "enqueue",
        "rounds": rounds,
        "calls_per_round": calls,
        "concurrency": concurrency,
        **medians,
        "sequential_ratio_arq_over_script": round(medians["sequential_arq_and_feed_us"] / medians["sequential_script_us"], 2),
        "concurrent_ratio_arq_over_script": round(medians["concurrent_arq_and_feed_us"] / medians["concurrent_script_us"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with bench_redis() as redis_url:
        print(json.dumps(asyncio.run(_measure(redis_url, args.rounds, args.calls, args.concurrency))))


if __name__ == "__main__":
    main()
