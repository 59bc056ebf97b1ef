"""Health of ready engines: at each reconciler check every ready engine's health URL is asked,
all side by side, each within `reconciler.health_timeout`; an engine that gives no answer at
`reconciler.hung_checks` checks in a row is hung, and the supervisor stops it as a crash (its
restart policy decides what follows). Without this, an engine that stops answering while its
process runs (a deadlock, SIGSTOP, a wedged driver) would hold its model and its memory for ever.

Only silence counts: any HTTP answer, 503 included, says the server is alive (a busy engine, or
one resizing its KV cache, may say it is not ready), and an engine whose process exits is seen
the moment it is reaped (engines/process.py), not here. Not here either: what a request waits for
(the router bounds that itself, api/proxy.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from ...engines.readiness import probe_session
from ..config.schema import ReconcilerConfig
from .lifecycle import ModelRecord
from .supervisor import Supervisor

log = logging.getLogger("lessor.reconciler")


async def silence(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str | None:
    """What the health URL gave instead of an answer within `timeout_s` (never longer), or None."""
    try:
        await asyncio.wait_for(_ask(session, url), timeout_s)
    except asyncio.TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        return f"no answer ({type(exc).__name__}: {exc})"
    return None


async def _ask(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        return response.status


class HealthWatch:
    """The one owner of each ready engine's unanswered checks in a row."""

    def __init__(self, config: ReconcilerConfig, supervisor: Supervisor) -> None:
        self._config, self._supervisor = config, supervisor
        self._unanswered: dict[str, int] = {}

    def unanswered(self, model: str) -> int:
        return self._unanswered.get(model, 0)

    async def check(self, ready: list[ModelRecord]) -> None:
        # Checks in a row of one engine: a model that is not ready now starts again at zero.
        names = {r.spec.name for r in ready}
        self._unanswered = {m: n for m, n in self._unanswered.items() if m in names}
        asked = [(r, r.handle, url) for r in ready if (url := getattr(r.handle, "health_url", None))]
        if not asked:
            return
        timeout_s = self._config.health_timeout
        async with probe_session(timeout_s) as session:
            found = await asyncio.gather(*(silence(session, url, timeout_s) for _, _, url in asked))
        for (record, handle, url), said in zip(asked, found):
            await self._judge(record, handle, url, said)

    async def _judge(self, record: ModelRecord, handle: Any, url: str, said: str | None) -> None:
        name, needed = record.spec.name, self._config.hung_checks
        if said is None:
            self._unanswered.pop(name, None)
            return
        count = self._unanswered[name] = self._unanswered.get(name, 0) + 1
        if count < needed:
            log.info("%s: its engine's health check (%s) got %s (%d of reconciler.hung_checks %d in a row before "
                     "it counts as hung)", name, url, said, count, needed, extra={"model": name, "step": "unanswered"})
            return
        self._unanswered.pop(name, None)
        reason = (f"engine hung: its health check ({url}) got {said}, {count} checks in a row "
                  f"(reconciler.health_timeout, reconciler.hung_checks)")
        await self._supervisor.engine_hung(name, handle, reason)
