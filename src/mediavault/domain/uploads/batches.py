"""One statement for concurrent calls: one round trip and one commit for the lot."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from mediavault.batching import Batcher

Row = tuple[Any, ...]


def columns_of(rows: Sequence[Row]) -> list[list[Any]]:
    """The statement's unnest() arrays for these parameter rows."""
    return [list(column) for column in zip(*rows, strict=True)]


class StatementBatches:
    """Runs the batched form of a statement for concurrent calls.

    Each call's row is one row of the statement's unnest() columns, upload_id first;
    the call gets back the row the statement returned for its upload, or None.
    """

    def __init__(
        self, pool: asyncpg.Pool, statement: str, *, max_batch: int = 256, spacing: float = 0.0, name: str = "statement"
    ) -> None:
        self._pool = pool
        self._statement = statement
        self._batches: Batcher[Row, asyncpg.Record | None] = Batcher(self._run_many, max_batch, spacing, name=name)

    async def submit(self, row: Row) -> asyncpg.Record | None:
        return await self._batches.submit(row)

    async def _run_many(self, batch: list[Row]) -> list[asyncpg.Record | None]:
        # The statements join on upload_id, so one upload twice in a statement (a client
        # finalizing again before its first call returned) would insert its media twice.
        # Repeats run in a later statement of their own, which sees the first one's outcome.
        results: list[asyncpg.Record | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        while pending:
            seen: set[uuid.UUID] = set()
            now: list[int] = []
            later: list[int] = []
            for i in pending:
                upload_id = batch[i][0]
                (later if upload_id in seen else now).append(i)
                seen.add(upload_id)
            rows = await self._pool.fetch(self._statement, *columns_of([batch[i] for i in now]))
            by_upload = {row["upload_id"]: row for row in rows}
            for i in now:
                results[i] = by_upload.get(batch[i][0])
            pending = later
        return results
