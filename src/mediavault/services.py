"""The domain services of one process, built once from its long-lived resources.

The server and the worker both build them here, so that a rule changed in a service
holds for the RPCs, the jobs and the cron runs alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from arq.connections import ArqRedis

from mediavault.blobs import BlobStore
from mediavault.config import Settings
from mediavault.domain.accounts import Accounts
from mediavault.domain.events import Events
from mediavault.domain.feed import Feed
from mediavault.domain.media import Library
from mediavault.domain.pages import PageTokens
from mediavault.domain.purchases import Purchases
from mediavault.domain.uploads import Resumable, Uploads
from mediavault.imaging.spec import DEFAULT_VARIANTS, on_request
from mediavault.jobs import TranscodeQueue


@dataclass(frozen=True)
class Services:
    accounts: Accounts
    purchases: Purchases
    uploads: Uploads
    resumable: Resumable
    library: Library
    feed: Feed
    events: Events
    transcodes: TranscodeQueue


def build_services(pool: asyncpg.Pool, blobs: BlobStore, redis: ArqRedis | None, settings: Settings) -> Services:
    accounts = Accounts(pool, settings.free_quota_bytes, settings.quota_counts_derived_bytes)
    tokens = PageTokens(settings.page_token_key)
    feed = Feed(pool, redis, settings.feed_cache_ttl_seconds, tokens)
    transcodes = TranscodeQueue(redis, settings.queue_name)
    resumable = Resumable(pool, blobs, settings)
    return Services(
        accounts=accounts,
        purchases=Purchases(pool, accounts, tokens),
        uploads=Uploads(pool, blobs, settings, transcodes, resumable),
        resumable=resumable,
        library=Library(pool, blobs, settings, transcodes, feed, on_request(DEFAULT_VARIANTS)),
        feed=feed,
        events=Events(pool),
        transcodes=transcodes,
    )
