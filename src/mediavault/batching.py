"""Concurrent calls to one statement or script, run together as one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from opentelemetry.trace import SpanContext

from mediavault import tracing

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Runs concurrent submissions together: one batch in flight, the next takes what arrived meanwhile.

    `run` gets up to max_batch items and returns one result per item, in order. When
    it raises, every submission of that batch raises the same exception. Under load,
    N calls then cost one round trip and one commit instead of N; an idle server runs
    a batch of one at once, so a lone call waits for nothing.

    With spacing, a batch that follows one of several calls starts at least that many
    seconds after that one started. A batch's fixed cost (pool checkout, round trip,
    commit, the wake-ups around them) is most of a small batch's: when concurrent calls
    keep batches back to back, waiting out the spacing lets more calls join, each paying
    less. A lone caller's calls in sequence never wait (nobody would join them), nor does
    a call that arrives later than the spacing after the last batch started.

    A cancelled submitter leaves its item in the batch: callers submit work that is
    safe to complete without them (the caller's retry finds it done).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        max_batch: int = 256,
        spacing: float = 0.0,
        *,
        name: str = "batch",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if spacing < 0:
            raise ValueError("spacing must not be negative")
        self._run = run
        self.max_batch = max_batch
        self.spacing = spacing
        self._last_start = float("-inf")
        self._last_size = 0
        # The batch's span is "batch {name}" (mediavault.tracing).
        self._name = name
        # Each submission with the span it was made in (None while tracing is off).
        self._waiting: list[tuple[Item, asyncio.Future[Result], SpanContext | None]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, tracing.submitter()))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
            self._draining.add_done_callback(self._drained)
        return await future

    def _drained(self, task: asyncio.Task[None]) -> None:
        # A drain task cancelled before it ran (loop shutdown) never reached its finally.
        if self._draining is task:
            self._draining = None
        # Calls that were still waiting for a batch would otherwise wait forever.
        if task.cancelled() and self._draining is None:
            waiting, self._waiting = self._waiting, []
            for _, future, _ in waiting:
                future.cancel()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                if self.spacing:
                    loop = asyncio.get_running_loop()
                    if self._last_size > 1 and (wait := self._last_start + self.spacing - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    self._last_start = loop.time()
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                self._last_size = len(batch)
                await self._run_batch(batch)
        finally:
            self._draining = None

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future[Result], SpanContext | None]]) -> None:
        try:
            if tracing.tracer is None:
                results = await self._run([item for item, _, _ in batch])
            else:
                with tracing.batch_span(self._name, [submitter for _, _, submitter in batch]):
                    results = await self._run([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except asyncio.CancelledError:
            # The loop is shutting down: the batch's callers must not wait for it forever.
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future, _), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
