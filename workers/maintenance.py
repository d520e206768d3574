"""Cron jobs. Each is a thin loop over a domain function, one bounded batch per transaction."""

from __future__ import annotations

import logging
import time
from typing import Any

from mediavault.domain import uploads

log = logging.getLogger(__name__)

RECLAIM_BATCH_SIZE = 1000
RECLAIM_MAX_BATCHES = 200


async def reclaim_stale_uploads(ctx: dict[str, Any]) -> dict[str, int]:
    """Expires pending uploads past expires_at and releases their reserved bytes."""
    started = time.perf_counter()
    expired = freed = 0
    for _ in range(RECLAIM_MAX_BATCHES):
        batch = await uploads.expire_due(ctx["pool"], ctx["blobs"], RECLAIM_BATCH_SIZE)
        expired += batch.expired
        freed += batch.freed_bytes
        if batch.expired < RECLAIM_BATCH_SIZE:
            break
    result = {"expired": expired, "freed_bytes": freed}
    log.info(
        "job finished",
        extra={"job": "reclaim_stale_uploads", **result, "duration_ms": round((time.perf_counter() - started) * 1000, 1)},
    )
    return result
