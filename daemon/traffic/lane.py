"""One model's lane in the router (daemon/traffic/lanes.py decides over them): its requests running and
waiting in ticket order, the drains held on it, the load it wants (`LoadWish`), and what a wait
on it measured (the time a request holds a slot, its last on-demand load); and the rules every
lane follows (`LaneRules`). Data and its own arithmetic only: no decisions, no effects."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..config.schema import RouterConfig

NEVER = math.inf
ASKING, QUEUED, HELD = "asking", "queued", "held"
_SERVED_MEMORY = 256  # requests the measured service time remembers at full weight


@dataclass(frozen=True)
class LaneRules:
    max_queue: int | None = None  # waiting requests per model; None: no limit
    wait_timeout_s: float = 900.0
    drain_after_s: float | None = 30.0  # None: never drain (a load waits for idle blockers)
    retry_s: float | None = None  # a waiting load is looked at again this often, besides at each change
    retry_after_loading_s: float = 5.0
    retry_after_busy_s: float = 1.0
    refuse_late: bool = False  # answer at once the requests a waiting load would reach too late
    # How long a drain waits for the requests running on the models it drained; then they are cut
    # (Effects.cut). None: for as long as they run.
    drain_timeout_s: float | None = None

    @classmethod
    def of(cls, config: RouterConfig, retry_s: float | None = 1.0) -> LaneRules:
        """lessord's rules; `retry_s` catches memory that frees without a model changing state
        (usage of processes lessor does not manage)."""
        return cls(config.max_queue, config.wait_timeout, config.drain_after, retry_s,
                   config.retry_after_loading_s, config.retry_after_busy_s, refuse_late=True,
                   drain_timeout_s=config.drain_timeout)


class Waiter:
    __slots__ = ("ticket", "deadline_s", "request")

    def __init__(self, ticket: int, deadline_s: float, request: Any) -> None:
        self.ticket, self.deadline_s, self.request = ticket, deadline_s, request


class LoadWish:
    """The load a lane wants for its waiting requests, from its first ask to its end."""

    __slots__ = ("asked_s", "phase", "blockers", "patience_armed", "retry_armed", "look_at_s", "held_busy",
                 "promised_s", "promised_in_s", "cut_armed")

    def __init__(self, asked_s: float) -> None:
        self.asked_s = asked_s  # the patience counts from here
        self.phase = HELD  # asking: the driver loads; queued: waits for blockers; held: for the model's state
        self.blockers: tuple[str, ...] = ()
        self.patience_armed = False
        self.retry_armed = False  # one retry timer per wish: asks from other causes never add a chain
        self.look_at_s: float | None = None  # when the retry timer weighs it again
        # Someone else's load or unload of the model is under way (admitting it shows no state of
        # its own): asked again when its state changes or after retry_after_busy_s, never at once.
        self.held_busy = False
        # The soonest start the policy's recheck promised (when, and how far ahead it said so): a
        # load weighed again at or after it that still waits, further off, is a moving target.
        self.promised_s: float | None = None
        self.promised_in_s = 0.0
        self.cut_armed = False  # the drain's bound is set: its blockers' running requests are cut then


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

    def drain_for(self, loading: str) -> None:
        """Hold back, for `loading`'s load, the requests that reach the lane from now on."""
        self.drains.setdefault(loading, self.next_ticket)
        self.drain_from = min(self.drains.values())

    def drain_waiting_for(self, loading: str) -> None:
        """Hold back for `loading` the requests already waiting too (the drain's bound passed)."""
        first = self.waiting[0].ticket if self.waiting else self.next_ticket
        self.drains[loading] = min(self.drains[loading], first)
        self.drain_from = min(self.drains.values())

    def undrain(self, loading: str) -> bool:
        """`loading`'s load ended: what it held back is due again. False: it held nothing here."""
        if self.drains.pop(loading, None) is None:
            return False
        self.drain_from = min(self.drains.values(), default=NEVER)
        return True

    def _due(self) -> bool:
        """The first waiting request may go (it is not held back by a drain)."""
        return bool(self.waiting) and self.waiting[0].ticket < self.drain_from
