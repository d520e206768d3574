"""Fixtures of the domain tests that talk to PostgreSQL and a blob store."""

from __future__ import annotations

import pytest

from mediavault.blobs import open_blob_store


@pytest.fixture
async def blobs(settings):
    """The blob store of the test module's `settings`."""
    store = await open_blob_store(settings)
    yield store
    await store.close()
