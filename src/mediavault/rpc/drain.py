"""The calls one server admits, and how it lets them end when it shuts down."""

from __future__ import annotations

import asyncio
import contextvars

# A call that has reached the transport but no handler yet when grpc's stop() begins is
# answered CANCELLED, which clients do not retry. So a draining server keeps its transport
# open, refuses what still arrives (fast, UNAVAILABLE), and stops the transport only once no
# call has arrived for this long since the drain began.
QUIET_SECONDS = 0.1
# ...but no longer than this once the admitted calls have ended: a client calling steadily on
# one connection (the REST gateway's) never pauses, and its calls, all refused, go to another
# server only after the transport's GOAWAY.
SETTLE_SECONDS = 1.0
_POLL_SECONDS = 0.01
# Shed calls only have their refusal left to send.
_SHED_SECONDS = 1.0


class CallGate:
    """Admits calls until the drain begins, then refuses new ones and waits for the admitted ones.

    The rpc decorator enters every call here; refused calls are answered UNAVAILABLE. Calls
    still running when the grace period ends are shed: cancelled, and answered UNAVAILABLE
    by the decorator, never CANCELLED.
    """

    def __init__(self) -> None:
        self._open = True
        self._running: set[asyncio.Task] = set()
        self._shed: set[asyncio.Task] = set()
        self._last_arrival = float("-inf")

    def enter(self, task: asyncio.Task) -> bool:
        """Admits the task's call, or returns False once the drain has begun."""
        self._last_arrival = asyncio.get_running_loop().time()
        if not self._open:
            return False
        self._running.add(task)
        return True

    def leave(self, task: asyncio.Task) -> None:
        self._running.discard(task)

    @property
    def admitted(self) -> int:
        """How many admitted calls are running now."""
        return len(self._running)

    def was_shed(self, task: asyncio.Task) -> bool:
        return task in self._shed

    async def drain(self, grace: float) -> None:
        """Refuses new calls; returns once the admitted ones have ended and arrivals have paused
        (for at most SETTLE_SECONDS more).

        What is still running after grace seconds is shed.
        """
        self._open = False
        loop = asyncio.get_running_loop()
        # The transport may hold calls it has not handed to a handler yet: the quiet
        # window starts no earlier than the drain.
        self._last_arrival = loop.time()
        deadline = self._last_arrival + grace
        while self._running:
            if loop.time() >= deadline:
                await self._shed_running()
                return
            await asyncio.sleep(_POLL_SECONDS)
        settled = min(deadline, loop.time() + SETTLE_SECONDS)
        while loop.time() - self._last_arrival < QUIET_SECONDS and loop.time() < settled:
            await asyncio.sleep(_POLL_SECONDS)

    async def _shed_running(self) -> None:
        running = set(self._running)
        if not running:
            return
        self._shed |= running
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=_SHED_SECONDS)


# The gate of the server whose call this is. Each call runs in a task that the grpc server's
# serving task starts, and a task starts with a copy of its starter's context: Server sets the
# variable while it starts its grpc server, so every call of that server, and only those, see
# its gate, without the servicers carrying it.
current_gate: contextvars.ContextVar[CallGate] = contextvars.ContextVar("current_gate")
