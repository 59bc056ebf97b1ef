"""The router's decisions, as a synchronous state machine: which request may go to its model now,
which waits, when a model must be loaded for its waiting requests, when a load that waits for
busy models drains them, and when a waiting request has waited too long.

It owns the lanes (per model: requests running, requests waiting with a ticket in arrival order,
the drains held on it, the on-demand load it wants) and nothing else. It reads a model's state
from the record it is given (the supervisor's `ModelRecord`, or the simulator's), never writes
it, and does nothing itself: it reads time from an injected clock and acts through `Effects`
(start a load, admit or fail a waiting request, call back at a time). lessord drives it on
asyncio (daemon/traffic.py); the policy simulator (bench/sim) drives the same object in
simulated time, so what the simulator measures is this code.

The rules. A request starts at once when its model is ready, nothing waits ahead of it and the
lane's `slots` (max_concurrency) allow; otherwise it waits, first come first served (at most
`max_queue` wait, then QueueFull). Waiting requests whose model is unloaded or failed want a
load: the driver asks for it and reports the outcome (`loaded`, `must_wait`, `busy`,
`load_failed`). When the load must wait for busy models (its blockers), it waits
`drain_after_s` from its first ask for them to go idle by themselves, and is asked again when
they do; once the patience is over they are *drained*: requests that reach them from then on
are held (their tickets are at or past the drain), the ones already running or waiting finish.
Drains end when the load that set them ends. Requests running or waiting un-held count as the
model's `in_flight`, so a model with work is never idle in the policy's eyes.

Effects must not call back into the core synchronously (lessord resolves futures and starts
tasks; the simulator schedules its load attempts on its event heap).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .config import RouterConfig
from .errors import LessorError, QueueFull, WaitTimedOut
from .lifecycle import ModelState

NEVER = math.inf
ASKING, QUEUED, HELD = "asking", "queued", "held"
# A policy's recheck (its answer ages) is looked at no later than this: memory that processes
# lessor does not manage free changes the answer without any model changing state.
RECHECK_CAP_S = 30.0
_SERVED_MEMORY = 256  # requests the measured service time remembers at full weight
_LOADABLE = (ModelState.UNLOADED, ModelState.FAILED)


class Effects(Protocol):
    def load(self, lane: Lane) -> None:
        """Load the lane's model; report with loaded / must_wait / busy / load_failed."""

    def admit(self, lane: Lane, request: Any) -> bool:
        """A waiting request may go now (it already counts as running). False: it has left."""

    def fail(self, request: Any, error: LessorError) -> None:
        """A waiting request ends with this error."""

    def call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        """Call back once the clock reads `when_s` (or later)."""


@dataclass(frozen=True)
class LaneRules:
    max_queue: int | None = None  # waiting requests per model; None: no limit
    wait_timeout_s: float = 900.0
    drain_after_s: float | None = 30.0  # None: never drain (a load waits for idle blockers)
    retry_s: float | None = None  # a waiting load is looked at again this often, besides at each change
    retry_after_loading_s: float = 5.0
    retry_after_busy_s: float = 1.0

    @classmethod
    def of(cls, config: RouterConfig, retry_s: float | None = 1.0) -> LaneRules:
        """lessord's rules; `retry_s` catches memory that frees without a model changing state
        (usage of processes lessor does not manage)."""
        return cls(config.max_queue, config.wait_timeout, config.drain_after, retry_s,
                   config.retry_after_loading_s, config.retry_after_busy_s)


class Waiter:
    __slots__ = ("ticket", "deadline_s", "request")

    def __init__(self, ticket: int, deadline_s: float, request: Any) -> None:
        self.ticket, self.deadline_s, self.request = ticket, deadline_s, request


class LoadWish:
    """The load a lane wants for its waiting requests, from its first ask to its end."""

    __slots__ = ("asked_s", "phase", "blockers", "patience_armed", "retry_armed")

    def __init__(self, asked_s: float) -> None:
        self.asked_s = asked_s  # the patience counts from here
        self.phase = HELD  # asking: the driver loads; queued: waits for blockers; held: for the model's state
        self.blockers: tuple[str, ...] = ()
        self.patience_armed = False
        self.retry_armed = False  # one retry timer per wish: asks from other causes never add a chain


class Lane:
    """One model's requests. `record` is the model's record (read-only here): its `state` and,
    for lessord, its engine handle."""

    __slots__ = ("record", "name", "slots", "active", "waiting", "next_ticket", "drains", "drain_from",
                 "last_used_s", "load", "expiry_s", "work_s", "work_at", "served", "load_s")

    def __init__(self, record: Any, name: str, slots: int | None) -> None:
        self.record, self.name, self.slots = record, name, slots
        self.active = 0
        self.waiting: deque[Waiter] = deque()
        self.next_ticket = 0
        self.drains: dict[str, int] = {}  # loading model -> first ticket held back for it
        self.drain_from = NEVER
        self.last_used_s = 0.0  # when its last request ended (or started, while one runs)
        self.load: LoadWish | None = None
        self.expiry_s = NEVER  # when the wait-deadline callback is due
        # What a wait here takes, measured (the Retry-After a refused request is given): the
        # requests running integrated over time and the requests finished, decayed together, so
        # work_s / served is the mean time one request holds a slot (Little's law); load_s, the
        # last on-demand load's time from its first ask to ready (waiting for room included).
        self.work_s = 0.0
        self.work_at = 0.0
        self.served = 0.0
        self.load_s: float | None = None

    def tally(self, now: float, started: int = 0, finished: int = 0) -> None:
        """Before `active` changes: the time run since the last change counts."""
        self.work_s += self.active * (now - self.work_at)
        self.work_at = now
        self.active += started - finished
        self.served += finished
        if self.served >= _SERVED_MEMORY:
            self.work_s, self.served = self.work_s / 2, self.served / 2

    def service_s(self) -> float | None:
        return self.work_s / self.served if self.served else None

    @property
    def in_flight(self) -> int:
        """Requests running or due to run: what makes the model busy in the policy's eyes."""
        if self.drain_from is NEVER:
            return self.active + len(self.waiting)
        return self.active + sum(1 for w in self.waiting if w.ticket < self.drain_from)

    @property
    def drained(self) -> bool:
        return self.drain_from is not NEVER

    def _due(self) -> bool:
        """The first waiting request may go (it is not held back by a drain)."""
        return bool(self.waiting) and self.waiting[0].ticket < self.drain_from


class Lanes:
    def __init__(self, rules: LaneRules, clock: Callable[[], float], effects: Effects,
                 resolve: Callable[[str], Lane], ready: Callable[[Any], bool]) -> None:
        self.rules = rules
        self._clock, self._effects, self._resolve, self._ready = clock, effects, resolve, ready
        self.lanes: dict[str, Lane] = {}  # canonical model name -> lane
        self._wishes: dict[int, Lane] = {}  # lanes that want a load, by id, in order of wanting

    def add(self, record: Any, name: str, slots: int | None) -> Lane:
        lane = self.lanes[name] = Lane(record, name, slots)
        return lane

    def _lane(self, name: str) -> Lane | None:
        lane = self.lanes.get(name)
        if lane is None:
            try:
                lane = self._resolve(name)
            except LessorError:  # gone in a config reload: nothing to drain
                return None
        return lane

    # -- a request's turn --------------------------------------------------------------------

    def try_start(self, lane: Lane) -> bool:
        """The hot path: start now if the model is ready, nothing waits ahead and a slot is free."""
        if (lane.waiting or lane.drain_from is not NEVER or (lane.slots is not None and lane.active >= lane.slots)
                or not self._ready(lane.record)):
            return False
        lane.last_used_s = now = self._clock()
        lane.tally(now, started=1)
        return True

    def wait(self, lane: Lane, request: Any) -> None:
        """Queue a request that could not start (QueueFull when the queue is full); it is
        admitted or failed through the effects, possibly at once."""
        rules = self.rules
        if rules.max_queue is not None and len(lane.waiting) >= rules.max_queue:
            raise QueueFull(lane.name, rules.max_queue, retry_after_s=self._retry_after(lane))
        deadline_s = self._clock() + rules.wait_timeout_s
        lane.waiting.append(Waiter(lane.next_ticket, deadline_s, request))
        lane.next_ticket += 1
        if lane.expiry_s is NEVER:
            self._arm_expiry(lane, deadline_s)
        self._serve(lane)

    def leave(self, lane: Lane, request: Any) -> None:
        """A waiting request gave up (its client left)."""
        for waiter in lane.waiting:
            if waiter.request is request:
                lane.waiting.remove(waiter)
                self._after_leaving(lane)
                return

    def finish(self, lane: Lane) -> None:
        lane.last_used_s = now = self._clock()  # idle time (keep_alive, LRU) counts from the end of the request
        lane.tally(now, finished=1)
        if lane.waiting:
            self._serve(lane)
        if self._wishes and not lane.active and not lane._due():
            self._idled(lane)

    def set_slots(self, lane: Lane, slots: int | None) -> None:
        lane.slots = slots
        if lane.waiting:
            self._serve(lane)

    def _retry_after(self, lane: Lane) -> float:
        """When a request refused now would likely get its turn: what is left of the model's load
        (its last measured one, else `retry_after_loading_s`), then the requests ahead of it
        over the slots at the measured time a request holds one (else `retry_after_busy_s`
        for the queue). Never over the wait timeout, never under a second."""
        now, rules = self._clock(), self.rules
        wait = 0.0
        if lane.record.state is not ModelState.READY:
            wish, measured = lane.load, lane.load_s
            if measured is None:
                wait = rules.retry_after_loading_s
            else:
                wait = max(0.0, measured - (now - wish.asked_s)) if wish is not None else measured
        service = lane.service_s()
        if service is None:
            wait += rules.retry_after_busy_s if lane.record.state is ModelState.READY else 0.0
        else:
            wait += (len(lane.waiting) + 1) * service / max(1, lane.slots or lane.active or 1)
        return min(max(1.0, wait), rules.wait_timeout_s)

    def waiting_for(self, lane: Lane) -> str:
        if lane.drain_from is not NEVER:
            return f"other models' turn ({', '.join(sorted(lane.drains))})"
        if lane.record.state is ModelState.READY:
            return f"a free slot (max_concurrency {lane.slots})"
        return f"its load (state {lane.record.state.value})"

    def _serve(self, lane: Lane) -> None:
        """Admit what may go; want a load when due requests wait for an unloaded model; end a
        wanted load that has nothing left to do (its drains with it)."""
        wish = lane.load
        if self._ready(lane.record):
            while lane._due() and (lane.slots is None or lane.active < lane.slots):
                if self._effects.admit(lane, lane.waiting.popleft().request):
                    lane.last_used_s = now = self._clock()
                    lane.tally(now, started=1)
            if wish is not None and wish.phase is not ASKING:
                self._end(lane)
            return
        if not lane._due():
            if wish is not None and wish.phase is not ASKING:
                self._end(lane)
            return
        if wish is None:
            wish = lane.load = LoadWish(self._clock())
            self._wishes[id(lane)] = lane
        if wish.phase is HELD and lane.record.state in _LOADABLE:
            self._ask(lane)

    def _after_leaving(self, lane: Lane) -> None:
        self._serve(lane)
        if self._wishes and not lane.active and not lane._due():
            self._idled(lane)

    # -- wait deadlines ----------------------------------------------------------------------

    def _arm_expiry(self, lane: Lane, when_s: float) -> None:
        lane.expiry_s = when_s
        self._effects.call_at(when_s, lambda: self._expire(lane))

    def _expire(self, lane: Lane) -> None:
        """Fail the requests past their deadline: deadlines follow tickets, so they lead the queue."""
        lane.expiry_s = NEVER
        now = self._clock()
        expired = False
        while lane.waiting and lane.waiting[0].deadline_s <= now:
            error = WaitTimedOut(lane.name, self.rules.wait_timeout_s, self.waiting_for(lane),
                                 retry_after_s=self._retry_after(lane))
            self._effects.fail(lane.waiting.popleft().request, error)
            expired = True
        if lane.waiting:
            self._arm_expiry(lane, lane.waiting[0].deadline_s)
        if expired:
            self._after_leaving(lane)

    # -- loading on demand -------------------------------------------------------------------

    def _ask(self, lane: Lane) -> None:
        lane.load.phase = ASKING
        self._effects.load(lane)

    def loaded(self, lane: Lane) -> None:
        """The load the driver was asked for ended with the model ready."""
        if lane.load is not None:
            lane.load_s = self._clock() - lane.load.asked_s
        self._outcome(lane, changed_memory=True)

    def busy(self, lane: Lane) -> None:
        """Someone else is loading or unloading the model: wait for its state to change."""
        self._outcome(lane, changed_memory=False)

    def load_failed(self, lane: Lane, error: LessorError) -> None:
        """The load failed: every request waiting on the lane gets the error."""
        while lane.waiting:
            self._effects.fail(lane.waiting.popleft().request, error)
        self._outcome(lane, changed_memory=True)
        if self._wishes and not lane.active:
            self._idled(lane)

    def _outcome(self, lane: Lane, changed_memory: bool) -> None:
        if lane.load is not None:
            lane.load.phase = HELD
            self._serve(lane)
        if changed_memory:
            self._retry_unblocked()

    def must_wait(self, lane: Lane, blockers: tuple[str, ...], recheck_s: float | None = None) -> None:
        """The load waits for busy models (`blockers`; none named: a load under way holds the
        memory, or the policy weighs it again in `recheck_s`). Drains them once the patience is
        over; asked again when they idle, and at the retry or the recheck, whichever is later
        (a recheck at most RECHECK_CAP_S away, so freed memory is still seen)."""
        wish = lane.load
        if wish is None:
            return
        wish.phase, wish.blockers = QUEUED, blockers
        if not lane._due() or self._ready(lane.record):
            self._serve(lane)  # nothing left to load for: the wish ends
            return
        drain_after_s, now = self.rules.drain_after_s, self._clock()
        if drain_after_s is not None:
            due_s = wish.asked_s + drain_after_s
            if now >= due_s:
                self._drain(lane, blockers)
            elif not wish.patience_armed:
                wish.patience_armed = True
                self._effects.call_at(due_s, lambda: self._look_again(lane, wish, patience_over=True))
        delay = self._retry_delay(recheck_s)
        if delay is not None and not wish.retry_armed:
            wish.retry_armed = True
            self._effects.call_at(now + delay, lambda: self._retry(lane, wish))

    def _retry_delay(self, recheck_s: float | None) -> float | None:
        retry_s = self.rules.retry_s
        if recheck_s is None:
            return retry_s
        recheck_s = min(recheck_s, RECHECK_CAP_S)
        return recheck_s if retry_s is None else max(retry_s, recheck_s)

    def _retry(self, lane: Lane, wish: LoadWish) -> None:
        wish.retry_armed = False
        self._look_again(lane, wish)

    def _look_again(self, lane: Lane, wish: LoadWish, patience_over: bool = False) -> None:
        if lane.load is wish and wish.phase is QUEUED and (patience_over or self._unblocked(wish)):
            self._ask(lane)

    def _unblocked(self, wish: LoadWish) -> bool:
        return all(self.in_flight(b) == 0 for b in wish.blockers)

    def _idled(self, idle: Lane) -> None:
        """`idle` has nothing running or due: loads waiting for it may go now."""
        for lane in list(self._wishes.values()):
            wish = lane.load
            if wish is not None and wish.phase is QUEUED and idle.name in wish.blockers and self._unblocked(wish):
                self._ask(lane)

    def _retry_unblocked(self) -> None:
        """Memory may have been freed or taken: loads that wait with no blocker named ask again."""
        for lane in list(self._wishes.values()):
            wish = lane.load
            if wish is not None and wish.phase is QUEUED and not wish.blockers:
                self._ask(lane)

    def _drain(self, loading: Lane, blockers: tuple[str, ...]) -> None:
        for name in blockers:
            lane = self._lane(name)
            if lane is None:
                continue
            lane.drains.setdefault(loading.name, lane.next_ticket)
            lane.drain_from = min(lane.drains.values())

    def _end(self, loading: Lane) -> None:
        loading.load = None
        self._wishes.pop(id(loading), None)
        for lane in list(self.lanes.values()):
            if lane.drains.pop(loading.name, None) is not None:
                lane.drain_from = min(lane.drains.values(), default=NEVER)
                if lane.waiting:
                    self._serve(lane)  # its held requests are due now

    # -- what others tell -------------------------------------------------------------------

    def changed(self, name: str | None = None) -> None:
        """A model's state changed (None: anything may have, e.g. a config reload)."""
        if name is None:
            for lane in list(self.lanes.values()):
                self._serve(lane)
            self._retry_unblocked()
            return
        lane = self.lanes.get(name)
        if lane is not None:
            self._serve(lane)
        if lane is None or lane.load is None or lane.load.phase is not ASKING:
            self._retry_unblocked()  # not a step of a load this core asked for (it reports its end)

    # -- reads -------------------------------------------------------------------------------

    def in_flight(self, name: str) -> int:
        lane = self.lanes.get(name)
        return lane.in_flight if lane is not None else 0

    def last_used_s(self, name: str) -> float:
        lane = self.lanes.get(name)
        return lane.last_used_s if lane is not None else 0.0

    def unused(self, name: str) -> bool:
        """Nothing running, due or held back: what keep_alive may unload."""
        lane = self.lanes.get(name)
        return lane is None or (not lane.active and not lane.waiting)

    def waiting_of(self, name: str) -> dict[str, float]:
        """Its requests waiting and how long the oldest has, as `ModelView` fields."""
        lane = self.lanes.get(name)
        if lane is None or not lane.waiting:
            return {"waiting": 0, "oldest_wait_s": 0.0}
        oldest = self._clock() - lane.waiting[0].deadline_s + self.rules.wait_timeout_s
        return {"waiting": len(lane.waiting), "oldest_wait_s": max(0.0, oldest)}

    def queued(self) -> dict[str, int]:
        return {lane.name: len(lane.waiting) for lane in self.lanes.values()}

    def loads_wanted(self) -> dict[str, str]:
        """Lanes that want a load, and its phase (asking, queued, held)."""
        return {lane.name: lane.load.phase for lane in self._wishes.values() if lane.load is not None}


def keep_alive_over(keep_alive_s: float, idle_since_s: float, now_s: float) -> bool:
    """An unused model idle this long is unloaded (keep_alive < 0: never)."""
    return keep_alive_s >= 0 and now_s - idle_since_s >= keep_alive_s
