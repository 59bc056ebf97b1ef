"""Readiness: probing an engine while it loads, woken by its log's ready line. What the adapters'
`wait_loaded` / `wait_ready` wait on (through `EngineProcess.wait_until` and `wait_http`). Owns the
probes' pacing (Backoff) and their HTTP session; not what is probed (each adapter says) nor the
process (engines/process.py).

aiohttp is imported where a probe is made, not at the top of the engines' modules: the planner
imports engines/ for the engines' arguments and loads no HTTP client (tests/unit/test_layering.py);
in lessord it is loaded already, so the import costs a dictionary look-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .logwatch import LogWatch

if TYPE_CHECKING:
    import aiohttp

    from .process import EngineProcess


def probe_session(total_s: float) -> aiohttp.ClientSession:
    """A session for probing an engine on a load's path: no keep-alive, so closing it waits on no
    open connection (a kept one made the close, and the load, wait 10-100 ms on vLLM)."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total_s),
                                 connector=aiohttp.TCPConnector(force_close=True))


@dataclass(frozen=True)
class Backoff:
    """The waits between readiness probes with no log line to wake them: from `first_s`, doubling
    up to `cap_s`. 5 ms first, since the torch engine's KV step and a warm llama.cpp are ready at
    once; 100 ms at most, so an engine whose ready line lessor does not know is noticed within
    that, at about ten refused connections a second while it loads."""

    first_s: float = 0.005
    cap_s: float = 0.1

    def intervals(self) -> Iterator[float]:
        interval = self.first_s
        while True:
            yield interval
            interval = min(self.cap_s, interval * 2)


async def _first_of(exited: asyncio.Event, seen: asyncio.Event, timeout_s: float) -> None:
    """Return when the process ends, a ready line is seen, or `timeout_s` passes."""
    waits = [asyncio.ensure_future(exited.wait()), asyncio.ensure_future(seen.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def wait_until(process: EngineProcess, check: Callable[[], Awaitable[bool] | bool], doing: str,
                     timeout_s: float, markers: Sequence[str] = (), backoff: Backoff | None = None) -> None:
    """Probe `check` until true; raise ProcessEnded at once if the process ends, TimeoutError after `timeout_s`.

    Between probes it waits on the engine's log: one of `markers` written there probes at once
    (engines/logwatch.py) and starts the backoff over, since the line may come just before the
    engine answers (uvicorn logs "Application startup complete." before it serves); otherwise
    `backoff`'s growing intervals, so a fast engine is noticed within milliseconds and a slow
    one costs a probe every `cap_s` at most."""
    backoff = backoff or Backoff()
    deadline = time.monotonic() + timeout_s
    with LogWatch(process.log_path, markers) as watch:
        watch.start()
        intervals = backoff.intervals()
        while True:
            interval = next(intervals)
            if process.exited.is_set():
                raise process.exited_error(doing)
            watch.seen.clear()  # a marker already in the log has woken this probe
            process.probes += 1
            result = check()
            if asyncio.iscoroutine(result):
                # Bounded by the time left: a probe that hangs (a health URL that accepts and never
                # answers) must not carry the wait past `timeout_s` by its own timeout.
                try:
                    result = await asyncio.wait_for(result, max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    result = False
            if result:
                process.ready_line_at = watch.seen_at
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"engine (pid {process.pid}) still not done {doing} after {timeout_s:g} s")
            await _first_of(process.exited, watch.seen, min(interval, left))
            if watch.seen.is_set():
                intervals = backoff.intervals()


async def wait_http(process: EngineProcess, url: str, timeout_s: float, doing: str, markers: Sequence[str] = ()) -> None:
    """Readiness: the port accepts, then `url` answers 200."""
    import aiohttp

    async with probe_session(5) as session:
        async def ok() -> bool:
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                return False
        await wait_until(process, ok, doing, timeout_s, markers)
