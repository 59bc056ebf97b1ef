"""The router's decisions, as a synchronous state machine: which request may go to its model now,
which waits, when a model must be loaded for its waiting requests, when a load that waits for
busy models drains them, and when a waiting request has waited too long.

It owns the lanes (per model: requests running, requests waiting with a ticket in arrival order,
the drains held on it, the on-demand load it wants) and nothing else. It reads a model's state
from the record it is given (the supervisor's `ModelRecord`, or the simulator's), never writes
it, and does nothing itself: it reads time from an injected clock and acts through `Effects`
(start a load, admit or fail a waiting request, call back at a time). lessord drives it on
asyncio (daemon/traffic/control.py); the policy simulator (bench/sim) drives the same object in
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
model's `in_flight`, so a model with work is never idle in the policy's eyes. A drain is bounded
(`drain_timeout_s`): past it, every request still waiting on a drained model is held too, and the
ones still running are cut (`Effects.cut`), so the load goes on even if one of them would never end.

When a load must wait, the lanes answer at once, with `refuse_late`, the requests its load would
reach only after their wait timeout (daemon/traffic/estimates.py says when that is).

Effects must not call back into the core synchronously (lessord resolves futures and starts
tasks; the simulator schedules its load attempts on its event heap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import LessorError
from ..models.lifecycle import ModelState
from .estimates import moved, recheck_in_s, retry_after_s, retry_delay_s, start_in_s, too_late, waiting_for
from .lane import ASKING, HELD, NEVER, QUEUED, Lane, LaneRules, LoadWish, Waiter
from .request_errors import DrainTimedOut, QueueFull, WaitTimedOut

__all__ = ["Effects", "Lane", "LaneRules", "Lanes", "keep_alive_over"]

_LOADABLE = (ModelState.UNLOADED, ModelState.FAILED, ModelState.WAITING)


class Effects(Protocol):
    def load(self, lane: Lane) -> None:
        """Load the lane's model; report with loaded / must_wait / busy / load_failed."""

    def admit(self, lane: Lane, request: Any) -> bool:
        """A waiting request may go now (it already counts as running). False: it has left."""

    def fail(self, request: Any, error: LessorError) -> None:
        """A waiting request ends with this error."""

    def call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        """Call back once the clock reads `when_s` (or later)."""

    def cut(self, lane: Lane, error: LessorError) -> None:
        """End the requests running on the lane with this error; each reports `finish` once ended.
        Only asked with `LaneRules.drain_timeout_s` set."""


class Lanes:
    def __init__(self, rules: LaneRules, clock: Callable[[], float], effects: Effects,
                 resolve: Callable[[str], Lane], ready: Callable[[Any], bool],
                 load_time: Callable[[str], float | None] = lambda name: None,
                 wish_ended: Callable[[Lane], None] | None = None) -> None:
        """`load_time`: a model's measured load; `wish_ended`: told when a lane stops wanting a load
        (loaded, or no request waits for it any more), after the lanes are consistent again."""
        self.rules = rules
        self._clock, self._effects, self._resolve, self._ready = clock, effects, resolve, ready
        self._load_time, self._wish_ended = load_time, wish_ended
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
        return retry_after_s(lane, self.rules, self._clock())

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
        if wish.phase is HELD and not wish.held_busy and lane.record.state in _LOADABLE:
            self._ask(lane, wish)

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
            error = WaitTimedOut(lane.name, self.rules.wait_timeout_s, waiting_for(lane),
                                 retry_after_s=self._retry_after(lane))
            self._effects.fail(lane.waiting.popleft().request, error)
            expired = True
        if lane.waiting:
            self._arm_expiry(lane, lane.waiting[0].deadline_s)
        if expired:
            self._after_leaving(lane)

    # -- loading on demand -------------------------------------------------------------------

    def _ask(self, lane: Lane, wish: LoadWish) -> None:
        wish.phase = ASKING
        self._effects.load(lane)

    def loaded(self, lane: Lane) -> None:
        """The load the driver was asked for ended with the model ready."""
        if lane.load is not None:
            lane.load_s = self._clock() - lane.load.asked_s
        self._outcome(lane, changed_memory=True)

    def busy(self, lane: Lane) -> None:
        """Someone else is loading or unloading the model: wait for its state to change (or, as an
        admission shows no state of its own, for retry_after_busy_s)."""
        wish = lane.load
        if wish is not None:
            wish.held_busy = True
            self._effects.call_at(self._clock() + self.rules.retry_after_busy_s, lambda: self._unbusy(lane, wish))
        self._outcome(lane, changed_memory=False)

    def _unbusy(self, lane: Lane, wish: LoadWish) -> None:
        if lane.load is wish and wish.held_busy:
            wish.held_busy = False
            self._serve(lane)

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

    def must_wait(self, lane: Lane, blockers: tuple[str, ...], recheck_s: float | None = None,
                  reason: str = "") -> None:
        """The load waits for busy models (`blockers`; none named: a load under way holds the
        memory, or the policy weighs it again in `recheck_s`). Requests it would reach past their
        wait timeout are answered now (refuse_late). Drains the blockers once the patience is
        over; asked again when they idle, and at the retry or the recheck, whichever is later
        (estimates.retry_delay_s)."""
        wish = lane.load
        if wish is None:
            return
        wish.phase, wish.blockers = QUEUED, blockers
        if self.rules.refuse_late and not self._ready(lane.record):
            self._refuse_late(lane, wish, blockers, recheck_s, reason)
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
        delay = retry_delay_s(self.rules, recheck_s)
        if delay is not None and not wish.retry_armed:
            wish.retry_armed, wish.look_at_s = True, now + delay
            self._effects.call_at(now + delay, lambda: self._retry(lane, wish))

    # -- answering at once what a wait cannot serve in time ----------------------------------

    def _refuse_late(self, lane: Lane, wish: LoadWish, blockers: tuple[str, ...], recheck_s: float | None,
                     reason: str) -> None:
        """Refuse the requests the load would reach past their deadline; all of them at a moving
        target, which would otherwise hold them to the edge of their patience."""
        start_s = start_in_s(self.lanes, blockers, recheck_s)
        if start_s is None:
            return
        now = self._clock()
        missed_s = moved(wish, now, start_s if not blockers else None)
        ready_s = now + start_s + (self._load_time(lane.name) or 0.0)
        while lane._due() and (missed_s is not None or lane.waiting[0].deadline_s < ready_s):
            waiter = lane.waiting.popleft()
            self._effects.fail(waiter.request, too_late(lane.name, self.rules, now, waiter.deadline_s, start_s,
                                                        ready_s, missed_s, blockers, reason))

    def _retry(self, lane: Lane, wish: LoadWish) -> None:
        wish.retry_armed, wish.look_at_s = False, None
        self._look_again(lane, wish)

    def _look_again(self, lane: Lane, wish: LoadWish, patience_over: bool = False) -> None:
        if lane.load is wish and wish.phase is QUEUED and (patience_over or self._unblocked(wish)):
            self._ask(lane, wish)

    def _unblocked(self, wish: LoadWish) -> bool:
        return all(self.in_flight(b) == 0 for b in wish.blockers)

    def _idled(self, idle: Lane) -> None:
        """`idle` has nothing running or due: loads waiting for it may go now."""
        for lane in list(self._wishes.values()):
            wish = lane.load
            if wish is not None and wish.phase is QUEUED and idle.name in wish.blockers and self._unblocked(wish):
                self._ask(lane, wish)

    def _retry_unblocked(self) -> None:
        """Memory may have been freed or taken: loads that wait with no blocker named ask again."""
        for lane in list(self._wishes.values()):
            wish = lane.load
            if wish is not None and wish.phase is QUEUED and not wish.blockers:
                self._ask(lane, wish)

    def _drain(self, loading: Lane, blockers: tuple[str, ...]) -> None:
        for name in blockers:
            lane = self._lane(name)
            if lane is None:
                continue
            lane.drain_for(loading.name)
        wish, bound_s = loading.load, self.rules.drain_timeout_s
        if wish is not None and bound_s is not None and not wish.cut_armed:
            wish.cut_armed = True
            self._effects.call_at(self._clock() + bound_s, lambda: self._drain_over(loading, wish))

    def _drain_over(self, loading: Lane, wish: LoadWish) -> None:
        """The drain's bound passed and its load still waits: what still waits on the drained models
        waits for the swap too, and what still runs is cut."""
        if loading.load is not wish:  # the load ended (served, or nobody waits): its drains went with it
            return
        for lane in list(self.lanes.values()):
            if loading.name not in lane.drains:
                continue
            lane.drain_waiting_for(loading.name)
            if lane.active:
                self._effects.cut(lane, DrainTimedOut(lane.name, loading.name, self.rules.drain_timeout_s or 0.0,
                                                      retry_after_s=self.rules.retry_after_loading_s))
            else:
                self._idled(lane)

    def _end(self, loading: Lane) -> None:
        loading.load = None
        self._wishes.pop(id(loading), None)
        for lane in list(self.lanes.values()):
            if lane.undrain(loading.name) and lane.waiting:
                self._serve(lane)  # its held requests are due now
        if self._wish_ended is not None and loading.load is None:
            self._wish_ended(loading)

    # -- what others tell -------------------------------------------------------------------

    def changed(self, name: str | None = None) -> None:
        """A model's state changed (None: anything may have, e.g. a config reload)."""
        if name is None:
            for each in list(self.lanes.values()):
                if each.load is not None:
                    each.load.held_busy = False
                self._serve(each)
            self._retry_unblocked()
            return
        lane = self.lanes.get(name)
        if lane is not None:
            if lane.load is not None:
                lane.load.held_busy = False  # the load or unload it was busy with moved on
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

    def waiting(self, name: str) -> dict[str, Any] | None:
        """A lane whose load waits: its requests waiting, and in how many seconds it is weighed
        again by itself (its blockers' drain patience, or the retry; None: when something changes)."""
        lane = self.lanes.get(name)
        if lane is None:
            return None
        wish = lane.load
        if wish is None or wish.phase is not QUEUED:
            return {"requests": len(lane.waiting), "recheck_in_s": None} if lane.waiting else None
        return {"requests": len(lane.waiting), "recheck_in_s": recheck_in_s(wish, self.rules, self._clock())}

    def queued(self) -> dict[str, int]:
        return {lane.name: len(lane.waiting) for lane in self.lanes.values()}

    def loads_wanted(self) -> dict[str, str]:
        """Lanes that want a load, and its phase (asking, queued, held)."""
        return {lane.name: lane.load.phase for lane in self._wishes.values() if lane.load is not None}


def keep_alive_over(keep_alive_s: float, idle_since_s: float, now_s: float) -> bool:
    """An unused model idle this long is unloaded (keep_alive < 0: never)."""
    return keep_alive_s >= 0 and now_s - idle_since_s >= keep_alive_s
