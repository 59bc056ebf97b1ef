"""Restarts after a crash: when the next try is due, and the tasks that wait for it.

A model's `restart` settings decide: `policy: never` leaves it failed; otherwise it is loaded
again after `backoff`, doubled for each crash within `window_s`, at most `max_backoff_s`, until
`max_restarts` crashes in the window. `close()` cancels what waits, and nothing is scheduled after.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .lifecycle import ModelRecord, ModelState

log = logging.getLogger("lessor.supervisor")


class Restarts:
    """The one owner of restart times (per model) and of the tasks that wait to restart."""

    def __init__(self, clock: Callable[[], float], load: Callable[[str], Awaitable[object]]) -> None:
        self._clock, self._load = clock, load
        self._tasks: set[asyncio.Task] = set()
        self._times: dict[str, list[float]] = {}
        self._closed = False

    def count(self, model: str) -> int:
        """Restarts within the window, as of the last crash."""
        return len(self._times.get(model, ()))

    def forget(self, model: str) -> None:
        self._times.pop(model, None)

    def delay(self, record: ModelRecord) -> float | None:
        """Seconds until the next restart, or None to give up. Forgets crashes outside the window."""
        policy, now = record.spec.restart, self._clock()
        times = self._times[record.spec.name] = [t for t in self._times.get(record.spec.name, ())
                                                 if now - t < policy.window_s]
        if policy.policy == "never" or len(times) >= policy.max_restarts:
            return None
        return min(policy.backoff * 2 ** len(times), policy.max_backoff_s)

    def schedule(self, record: ModelRecord, delay_s: float) -> None:
        self.spawn(self._restart(record, delay_s))

    def spawn(self, coro) -> None:
        if self._closed:  # lessord is stopping: nothing new starts
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, record: ModelRecord, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if record.state != ModelState.FAILED:  # someone loaded or unloaded it meanwhile
            return
        self._times.setdefault(record.spec.name, []).append(self._clock())
        try:
            await self._load(record.spec.name)
        except Exception as exc:
            log.error("restart of %s failed: %s", record.spec.name, exc)
            delay = self.delay(record)
            if delay is not None:
                self.schedule(record, delay)

    async def settled(self) -> None:
        """Return once every exit report and restart under way has run its course."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
