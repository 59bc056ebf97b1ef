"""Crashes and what follows them: when the next try is due, when lessor gives up, and the tasks
that wait to load a crashed model again (its retries; a restart of lessord itself is adoption's,
daemon/models/adoption.py).

Every engine that ends on its own while serving counts as a crash, and so does a load that lessor
or a request started and whose engine failed: otherwise a model that dies on its first request
would be loaded again by every request (a crash loop driven by traffic). A model's `restart`
settings decide: with `policy: on-failure` lessor loads it again after `backoff`, doubled for each
crash within `window_s`, at most `max_backoff_s`; with `never` only a request does. Either way,
once it has crashed more than `max_restarts` times in the window lessor gives up: it stays failed,
and requests are refused with the reason, until an operator loads it or the config is reloaded.
`close()` cancels what waits, and nothing is scheduled after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .lifecycle import ModelRecord, ModelState

log = logging.getLogger("lessor.supervisor")

# The cause of a crash's retry load, as a policy reads it (policies/snapshot.py's Request.cause):
# the policies' API says "restart", so the value stays that word.
CRASH_RETRY = "restart"


class Crashes:
    """The one owner of crash times and give-ups (per model) and of the tasks that wait to retry."""

    def __init__(self, clock: Callable[[], float], load: Callable[[str], Awaitable[object]]) -> None:
        self._clock, self._load = clock, load
        self._tasks: set[asyncio.Task] = set()
        self._times: dict[str, list[float]] = {}
        self._given_up: dict[str, str] = {}
        self._closed = False

    def count(self, model: str) -> int:
        """Crashes within the window, as of the last crash."""
        return len(self._times.get(model, ()))

    def given_up(self, model: str) -> str | None:
        """Why lessor gave up on the model (it is not loaded on demand), or None."""
        return self._given_up.get(model)

    def forget(self, model: str | None = None) -> None:
        """An operator's load, or a config reload (None: every model): the crashes start over."""
        for table in (self._times, self._given_up):
            table.clear() if model is None else table.pop(model, None)

    def crashed(self, record: ModelRecord, reason: str) -> float | None:
        """Count a crash now: seconds until lessor's retry, or None (its policy is never, or it gave up)."""
        name, policy, now = record.spec.name, record.spec.restart, self._clock()
        times = self._times[name] = [t for t in self._times.get(name, ()) if now - t < policy.window_s] + [now]
        if len(times) > policy.max_restarts:
            self._given_up[name] = (f"{reason} ({len(times)} crashes within {policy.window_s:g} s, more than "
                                    f"restart.max_restarts {policy.max_restarts})")
            return None
        return None if policy.policy == "never" else min(policy.backoff * 2 ** (len(times) - 1), policy.max_backoff_s)

    def log_crash(self, record: ModelRecord, reason: str, retry_in: float | None) -> None:
        """One line for a crash just counted: ERROR once lessor gave up, else a WARNING with what
        follows (`retry_in`: lessor's retry is scheduled)."""
        name, policy = record.spec.name, record.spec.restart
        extra = {"model": name, "crashes": self.count(name), "max_restarts": policy.max_restarts}
        if name in self._given_up:
            log.error("%s: gave up: %s; `lessor load %s` or a config reload tries again", name,
                      self._given_up[name], name, extra={**extra, "step": "gave_up"})
            return
        within = f"within {policy.window_s:g} s"
        then = (f"restarting in {retry_in:g} s (restart {self.count(name)} of {policy.max_restarts} {within})"
                if retry_in is not None else
                f"not restarted by lessor, the next request loads it (crash {self.count(name)} of "
                f"{policy.max_restarts} allowed {within})")
        log.warning("%s: crashed: %s; %s", name, reason, then,
                    extra={**extra, "step": "crashed", "restart_in_s": retry_in})

    def schedule(self, record: ModelRecord, delay_s: float) -> None:
        self.spawn(self._retry(record, delay_s))

    def spawn(self, coro) -> None:
        if self._closed:  # lessord is stopping: nothing new starts
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, record: ModelRecord, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if record.state != ModelState.FAILED or record.spec.name in self._given_up:
            return  # someone loaded or unloaded it meanwhile, or a request's load crashed it for good
        try:
            await self._load(record.spec.name)
        except Exception as exc:  # a load that failed counted the crash, said so and scheduled what follows
            if record.state is not ModelState.FAILED:  # it did not start (no room now, busy): say why, once
                log.warning("%s: restart did not load it: %s", record.spec.name, exc,
                            extra={"model": record.spec.name, "step": "restart_skipped"})

    async def settled(self) -> None:
        """Return once every exit report and retry under way has run its course."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
