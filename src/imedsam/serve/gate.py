"""At most ``N`` inferences at once and a bounded number waiting: beyond that the server answers 503 with
Retry-After at once (a client retries later) instead of queueing without bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

T = TypeVar("T")


class Busy(Exception):
    """The queue is full: answer 503 and ask the client to retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy ({retry_after} s); retry later")
        self.retry_after = retry_after


class TimedOut(Exception):
    """An inference waited or ran longer than the request time limit."""


class InferenceGate:
    """Admission control for blocking model work run in worker threads.

    Args:
        max_inflight: calls running at once.
        max_queue: calls allowed to wait for a running slot.
        timeout_s: limit on waiting + running; the call's thread finishes its current work but its answer is
            dropped and the client gets 504.
    """

    def __init__(self, max_inflight: int, max_queue: int, timeout_s: float) -> None:
        self.max_inflight, self.max_queue, self.timeout_s = int(max_inflight), int(max_queue), float(timeout_s)
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._admitted = 0
        self.rejected = 0

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        return self._admitted

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` in a worker thread once a slot is free. A call that times out while running keeps
        its slot until its thread returns, so that no more than ``max_inflight`` threads ever compute."""
        if self._admitted >= self.max_inflight + self.max_queue:
            self.rejected += 1
            raise Busy(retry_after=1)
        self._admitted += 1
        started = asyncio.Event()
        task = asyncio.ensure_future(self._run(started, fn, *args))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a late failure is not "unretrieved"
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            if not started.is_set():
                task.cancel()  # still waiting for a slot: it never runs
            raise TimedOut(f"the request took longer than {self.timeout_s:g} s; try again or raise "
                           "--request-timeout") from None

    async def _run(self, started: asyncio.Event, fn: Callable[..., T], *args) -> T:
        try:
            async with self._slots:
                started.set()
                return await anyio.to_thread.run_sync(fn, *args)
        finally:
            self._admitted -= 1
