"""The router's traffic control, apart from HTTP: which request may go to its model now, which
waits, which model loads on demand, and which idle model is unloaded by its keep_alive.

Per model there is one lane: requests running (`active`) and requests waiting, each with a
ticket in arrival order. A request starts at once when its model is ready, nothing waits ahead
of it and `max_concurrency` allows; otherwise it waits (at most `router.max_queue` of them, then
429). A waiting request whose model is not loaded starts the lane's loader, which asks the
supervisor to load (the policy admits, evicting idle models).

No starvation, little swap ping-pong: when the policy says a load must wait for busy models
(MustWait), the load first waits `router.drain_after` seconds for them to go idle by
themselves. If they are still busy then, they are *drained*: requests that reach them from now
on wait, while the ones already running or waiting finish. Once drained they are idle, the load
evicts them, and the waiting requests of the loaded model are served together. The drained
model's held requests then load it back, and it gets its turn the same way. The patience keeps a
stream of requests to a popular model from being cut for every rare one (the policy simulator,
bench/sim, measured draining at once as the worst of all its strategies under steady traffic).
Requests running or waiting their turn count as the model's `in_flight`, so a model with work is
never idle in the policy's eyes and never evicted.

The hot path (a ready model with a free slot) is synchronous: a dict lookup, two counters and
the last-use time, in memory only; nothing is written to the ledger per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import Callable

from .config import RouterConfig
from .errors import InvariantBroken, LessorError, ModelBusy, QueueFull, WaitTimedOut
from .events import ConfigReloaded, Event, ModelStateChanged
from .lifecycle import ModelRecord, ModelState
from .supervisor import MustWait, Supervisor

log = logging.getLogger("lessor.routing")

NEVER = math.inf


class Lane:
    """One model's requests at the router."""

    def __init__(self, record: ModelRecord) -> None:
        self.record = record
        self.active = 0
        self.waiting: deque[int] = deque()  # tickets of waiting requests, in arrival order
        self.next_ticket = 0
        self.drains: dict[str, int] = {}  # loading model -> first ticket held back for it
        self.drain_from = NEVER
        self.loader: asyncio.Task | None = None
        self.failure: tuple[int, LessorError] | None = None  # tickets below the first failed a load
        self.last_used_s = 0.0  # when its last request ended (or started, while one runs)

    @property
    def name(self) -> str:
        return self.record.spec.name

    @property
    def in_flight(self) -> int:
        """Requests running or due to run: what makes the model busy in the policy's eyes."""
        return self.active + self.eligible_waiting()

    def eligible_waiting(self) -> int:
        if self.drain_from is NEVER:
            return len(self.waiting)
        return sum(1 for t in self.waiting if t < self.drain_from)

    def has_room(self) -> bool:
        limit = self.record.spec.max_concurrency
        return limit is None or self.active < limit


class Router:
    def __init__(self, supervisor: Supervisor, config: RouterConfig,
                 listen: Callable[[Callable[[Event], None]], None] | None = None) -> None:
        self._supervisor, self._config = supervisor, config
        self._clock = supervisor.clock
        self._lanes: dict[str, Lane] = {}  # canonical model name -> lane
        self._by_name: dict[str, Lane] = {}  # name or alias -> lane (cleared on config reload)
        self._pulse = asyncio.Event()
        self._loaders = 0  # on-demand loads under way
        self.requests: dict[tuple[str, int], int] = {}  # (model, HTTP status) -> count, for metrics
        if listen is not None:
            listen(self._on_event)

    # -- lanes -------------------------------------------------------------------------------

    def lane(self, name: str) -> Lane:
        """The lane of a model name or alias; UnknownModel lists the known names."""
        lane = self._by_name.get(name)
        if lane is not None:
            return lane
        record = self._supervisor.resolve(name)
        lane = self._lanes.get(record.spec.name)
        if lane is None or lane.record is not record:  # new, or removed and added back by a reload
            lane = self._lanes[record.spec.name] = Lane(record)
        self._by_name[name] = lane
        return lane

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ConfigReloaded):
            self._by_name.clear()
        if isinstance(event, (ModelStateChanged, ConfigReloaded)):
            self._wake()

    def _wake(self) -> None:
        self._pulse.set()
        self._pulse = asyncio.Event()

    # -- what the supervisor reads (lifecycle.Traffic) ----------------------------------------

    def in_flight(self, model: str) -> int:
        lane = self._lanes.get(model)
        return lane.in_flight if lane is not None else 0

    def last_used_s(self, model: str) -> float:
        lane = self._lanes.get(model)
        return lane.last_used_s if lane is not None else 0.0

    # -- a request's turn --------------------------------------------------------------------

    def try_start(self, lane: Lane) -> str | None:
        """The fast path: the engine's base URL if the request may go now, else None (then wait_turn)."""
        record = lane.record
        if (record.state is ModelState.READY and not lane.waiting and lane.drain_from is NEVER
                and lane.has_room() and record.handle is not None):
            return self._begin(lane)
        return None

    def _begin(self, lane: Lane) -> str:
        lane.active += 1
        lane.last_used_s = self._clock()
        return lane.record.handle.base_url

    def finish(self, lane: Lane) -> None:
        lane.active -= 1
        lane.last_used_s = self._clock()  # idle time (keep_alive, LRU) counts from the end of the request
        if lane.waiting or self._loaders:  # someone may start, or a load may stop waiting for idle models
            self._wake()

    async def wait_turn(self, lane: Lane) -> str:
        """Wait until the model is ready with room for this request, loading it if needed."""
        if len(lane.waiting) >= self._config.max_queue:
            raise QueueFull(lane.name, self._config.max_queue, retry_after_s=self._retry_after(lane))
        ticket = lane.next_ticket
        lane.next_ticket += 1
        lane.waiting.append(ticket)
        deadline = self._clock() + self._config.wait_timeout
        try:
            while True:
                pulse = self._pulse
                url = self._start_waiting(lane, ticket)
                if url is not None:
                    return url
                if lane.failure is not None and ticket < lane.failure[0]:
                    raise lane.failure[1]
                self._ensure_loader(lane)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise WaitTimedOut(lane.name, self._config.wait_timeout, self._waiting_for(lane))
                try:
                    await asyncio.wait_for(pulse.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            if ticket in lane.waiting:
                lane.waiting.remove(ticket)
                self._wake()

    def _start_waiting(self, lane: Lane, ticket: int) -> str | None:
        record = lane.record
        if (record.state is not ModelState.READY or record.handle is None or ticket >= lane.drain_from
                or not lane.has_room()):
            return None
        lane.waiting.remove(ticket)  # a waiting request was counted as due: it becomes a running one
        return self._begin(lane)

    def _waiting_for(self, lane: Lane) -> str:
        if lane.drain_from is not NEVER:
            return f"other models' turn ({', '.join(sorted(lane.drains))})"
        if lane.record.state is ModelState.READY:
            return f"a free slot (max_concurrency {lane.record.spec.max_concurrency})"
        return f"its load (state {lane.record.state.value})"

    def _retry_after(self, lane: Lane) -> float:
        return 5.0 if lane.record.state is not ModelState.READY else 1.0

    # -- loading on demand -------------------------------------------------------------------

    def _ensure_loader(self, lane: Lane) -> None:
        if lane.loader is None and lane.record.state in (ModelState.UNLOADED, ModelState.FAILED):
            lane.loader = asyncio.ensure_future(self._load(lane))

    async def _load(self, lane: Lane) -> None:
        self._loaders += 1
        drain_at = self._clock() + self._config.drain_after
        try:
            while lane.waiting and lane.record.state is not ModelState.READY:
                pulse = self._pulse
                if lane.record.state in (ModelState.LOADING, ModelState.UNLOADING):
                    await pulse.wait()  # someone else's load or unload: see how it ends
                    continue
                try:
                    outcome = await self._supervisor.try_load(lane.name)
                    if isinstance(outcome, MustWait):
                        patience = drain_at - self._clock()
                        if patience <= 0:
                            self._drain(lane, outcome.blockers)
                        await self._until_idle(outcome.blockers, patience if patience > 0 else None)
                except ModelBusy:
                    await pulse.wait()
                except LessorError as exc:
                    lane.failure = (lane.next_ticket, exc)
                    return
                except Exception as exc:  # a bug: fail the waiting requests rather than hang them
                    log.exception("on-demand load of %s failed", lane.name)
                    lane.failure = (lane.next_ticket, InvariantBroken(f"loading '{lane.name}' on demand: {exc!r}"))
                    return
        finally:
            self._loaders -= 1
            lane.loader = None
            self._undrain(lane)
            self._wake()

    async def _until_idle(self, blockers: tuple[str, ...], at_most: float | None = None) -> None:
        """Wait until every blocker has nothing running or due, or `at_most` seconds (then the
        load is retried); without named blockers, retry at each change, at least every second."""
        def idle() -> bool:
            return all(self.lane(b).in_flight == 0 for b in blockers)

        give_up = None if at_most is None else self._clock() + at_most
        while True:
            pulse = self._pulse
            step = 1.0 if give_up is None else max(0.0, min(1.0, give_up - self._clock()))
            try:
                await asyncio.wait_for(pulse.wait(), step)
            except TimeoutError:
                pass
            if not blockers or idle() or (give_up is not None and self._clock() >= give_up):
                return

    def _drain(self, loading: Lane, blockers: tuple[str, ...]) -> None:
        for name in blockers:
            lane = self.lane(name)
            lane.drains.setdefault(loading.name, lane.next_ticket)
            lane.drain_from = min(lane.drains.values())

    def _undrain(self, loading: Lane) -> None:
        for lane in self._lanes.values():
            if lane.drains.pop(loading.name, None) is not None:
                lane.drain_from = min(lane.drains.values(), default=NEVER)

    # -- idle unload -------------------------------------------------------------------------

    def idle_expired(self) -> list[str]:
        """Models past their keep_alive with nothing running or waiting (pinned ones never)."""
        now = self._clock()
        out = []
        for record in self._supervisor.records():
            spec = record.spec
            lane = self._lanes.get(spec.name)
            if (record.state is ModelState.READY and not spec.pinned and spec.keep_alive >= 0
                    and self.in_flight(spec.name) == 0 and not (lane and lane.waiting)
                    and now - self._supervisor.last_used_s(record) >= spec.keep_alive):
                out.append(spec.name)
        return out

    async def unload_idle(self) -> list[str]:
        unloaded = []
        for name in self.idle_expired():
            try:
                keep_alive = self._supervisor.resolve(name).spec.keep_alive
                if await self._supervisor.evict(name, reason=f"idle for {keep_alive:g} s (keep_alive)"):
                    unloaded.append(name)
            except LessorError as exc:  # mid-transition, or gone in a reload: next round
                log.info("keep_alive unload of %s skipped: %s", name, exc)
        return unloaded

    async def run_keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._config.keep_alive_check)
            try:
                await self.unload_idle()
            except Exception:  # a bug must not end idle unloading for good
                log.exception("keep_alive check failed")

    # -- reads -------------------------------------------------------------------------------

    def count(self, model: str, status: int) -> None:
        key = (model, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def queued(self) -> dict[str, int]:
        return {lane.name: len(lane.waiting) for lane in self._lanes.values()}
