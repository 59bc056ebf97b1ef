"""lessord's traffic control: the router's lanes (daemon/traffic/lanes.py, the decisions) driven on
asyncio. It owns what the decisions leave out: a future per waiting request, a task per on-demand
load (the supervisor's `try_load`, whose outcome it reports back), timers on the event loop, the
keep_alive loop that unloads idle models (a request's own keep_alive within router.request_keep_alive_max),
and the end of a model's WAITING state once no request waits for it. It is what the supervisor
reads of the router's traffic (traffic_counters.Traffic: requests in flight and last use per model).

The hot path (a ready model with a free slot) is synchronous: a dict lookup, two counters and
the last-use time, in memory only; nothing is written to the ledger per request.

Why loads wait for busy models before draining them (router.drain_after): the policy simulator
(bench/sim) runs these same lanes, and measured draining at once as the worst of its strategies
under steady traffic; the patience keeps a stream of requests to a popular model from being cut
for every rare one. A drain is bounded (router.drain_timeout): the requests still running on a
drained model then are cut through the `Running` each one registered when it started (the front
door's, api/router.py), so a request that never ends cannot keep another model out for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..config.schema import RouterConfig
from ..errors import InvariantBroken, LessorError
from ..events import ConfigReloaded, Event, ModelStateChanged
from ..models.lifecycle import ModelRecord, ModelState
from ..models.load_errors import ModelAdopting, ModelBusy
from ..models.supervisor import Supervisor
from ..planning.admission import MustWait
from .lanes import Lane, LaneRules, Lanes, keep_alive_over
from .stats import TrafficStats

log = logging.getLogger("lessor.traffic")

STATS_SAVE_EVERY_S = 60.0  # what a crash of lessord can lose of the learned traffic


class Timers(Protocol):
    def call_at(self, when_s: float, callback: Callable[[], None]) -> None: ...


class Running(Protocol):
    """A request running on its model, as the front door holds it: cut ends it with the error."""

    def cut(self, error: LessorError) -> None: ...


class LoopTimers:
    """Callbacks at times of `clock`, on the running event loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(max(0.0, when_s - self._clock()), callback)


def _serving(record: ModelRecord) -> bool:
    # An engine that exited leaves the record READY without a handle until the supervisor has
    # released its leases: requests wait for what comes next.
    return record.state is ModelState.READY and record.handle is not None


def _planned_batch(lane: Lane) -> int | None:
    """The sequences its engine was planned to run together (None: unknown)."""
    record = lane.record
    return record.plan.params.get(record.spec.engine.batch_param) if record.plan is not None else None


def _ready_arrival(lane: Lane, started: bool) -> tuple[bool, int, int | None]:
    """What a request that reached a ready model tells the policy: whether its engine runs it at
    once (fewer are running than the planned batch; unknown batch: it does), and how many
    requests are ahead of it waiting for a slot of that batch (inside the engine, or in the lane):
    fewer than a batch ahead, the model kept up with it though it did not start at once."""
    batch = _planned_batch(lane)
    if started:
        return (not batch or lane.active <= batch), max(0, lane.active - 1 - (batch or 0)), batch
    return False, max(0, lane.active - (batch or 0)) + len(lane.waiting), batch


class TrafficControl:
    def __init__(self, supervisor: Callable[[], Supervisor], clock: Callable[[], float], config: RouterConfig,
                 listen: Callable[[Callable[[Event], None]], None] | None = None,
                 timers: Timers | None = None, stats_path: Path | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        """`supervisor` names the supervisor, which is built after this (it reads this one's counters:
        daemon/runtime.py); it is first called for a request or a keep_alive round, never here.
        `clock`: the supervisor's, on which the last-use times are compared."""
        self._supervisor_of, self._config = supervisor, config
        self._clock = clock
        self._timers = timers or LoopTimers(self._clock)
        self._lanes = Lanes(LaneRules.of(config), self._clock, self, self.lane, _serving,
                            load_time=lambda name: self.stats.measured_load_s(name), wish_ended=self._wish_ended)
        self._by_name: dict[str, Lane] = {}  # name or alias -> lane (cleared on config reload)
        self._keep_alive: dict[str, float] = {}  # model -> the keep_alive its latest request asked for, bounded
        self._loads: set[asyncio.Task] = set()
        self._running: dict[str, set[Running]] = {}  # model -> its requests running, which a drain's bound may cut
        self._turns: dict[asyncio.Future, Running] = {}  # waiting requests' turns -> what runs once admitted
        self.requests: dict[tuple[str, int], int] = {}  # (model, HTTP status) -> count, for metrics
        self.idle_unloads: dict[str, int] = {}  # model -> unloads past its keep_alive, for metrics
        # The one writer of what the router learns per model (rates, load times), saved beside the
        # ledger so a restart keeps it; the wall clock only dates the file (downtime decays rates).
        self.stats = TrafficStats()
        self._stats_path, self._wall, self._stats_saved_s = stats_path, wall, self._clock()
        if stats_path is not None:
            self._restore_stats(stats_path)
        if listen is not None:
            listen(self._on_event)

    @property
    def _supervisor(self) -> Supervisor:
        return self._supervisor_of()

    def lane(self, name: str) -> Lane:
        """The lane of a model name or alias; UnknownModel lists the known names."""
        lane = self._by_name.get(name)
        if lane is not None:
            return lane
        record = self._supervisor.resolve(name)
        lane = self._lanes.lanes.get(record.spec.name)
        if lane is None or lane.record is not record:  # new, or removed and added back by a reload
            lane = self._lanes.add(record, record.spec.name, record.spec.max_concurrency)
        self._by_name[name] = lane
        return lane

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ModelStateChanged):
            self._time_load(event)
            if event.state != ModelState.READY.value:  # a request's keep_alive lasts while its engine runs
                self._keep_alive.pop(event.model, None)
            self._lanes.changed(event.model)
        elif isinstance(event, ConfigReloaded):
            self._by_name.clear()
            for lane in list(self._lanes.lanes.values()):
                self._lanes.set_slots(lane, lane.record.spec.max_concurrency)
            self._lanes.changed()

    def _time_load(self, event: ModelStateChanged) -> None:
        if event.state == ModelState.LOADING.value:
            self.stats.load_began(event.model, self._clock())
        else:
            self.stats.load_ended(event.model, self._clock(), ready=event.state == ModelState.READY.value)

    # -- what the supervisor reads (traffic_counters.Traffic) ----------------------------------------

    def in_flight(self, model: str) -> int:
        return self._lanes.in_flight(model)

    def last_used_s(self, model: str) -> float:
        return self._lanes.last_used_s(model)

    def learned_view(self, model: str, size_bytes: int) -> dict[str, float]:
        return {**self.stats.view(model, self._clock(), size_bytes), **self._lanes.waiting_of(model)}

    # -- a request's turn --------------------------------------------------------------------

    def try_start(self, lane: Lane, running: Running | None = None) -> str | None:
        """The fast path: the engine's base URL if the request may go now, else None (then wait_turn).
        `running`: what a drain's bound cuts while the request runs (finish with it)."""
        stats, now = self.stats, self._clock()
        stats.record_request(lane.name, now)
        started = self._lanes.try_start(lane)
        if _serving(lane.record):
            at_once, ahead, batch = _ready_arrival(lane, started)
            stats.record_ready_arrival(lane.name, at_once, ahead=ahead, batch=batch)
        if started:
            stats.record_start(lane.name, now)
            self._started(lane, running)
            return lane.record.handle.base_url
        stats.record_wait(lane.name, now)
        return None

    def _started(self, lane: Lane, running: Running | None) -> None:
        if running is not None:
            self._running.setdefault(lane.name, set()).add(running)

    def finish(self, lane: Lane, running: Running | None = None) -> None:
        if running is not None:
            self._running.get(lane.name, set()).discard(running)
        self._lanes.finish(lane)

    async def wait_turn(self, lane: Lane, running: Running | None = None) -> str:
        """Wait until the model is ready with room for this request, loading it if needed."""
        if lane.record.state is ModelState.ADOPTING:  # just restarted: answered at once, never loaded twice
            raise ModelAdopting(lane.name, self._config.retry_after_loading_s)
        turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if running is not None:
            self._turns[turn] = running
        try:
            self._lanes.wait(lane, turn)
            return await turn
        except asyncio.CancelledError:
            if turn.cancelled():  # still queued, or admitted too late to take its turn
                self._lanes.leave(lane, turn)
            elif turn.exception() is None:  # admitted, then cancelled before it ran: the slot goes back
                self.finish(lane, running)
            raise
        finally:
            self._turns.pop(turn, None)

    # -- waiting models ----------------------------------------------------------------------

    def _wish_ended(self, lane: Lane) -> None:
        """The lane wants no load any more: a model left WAITING by it is unloaded again."""
        if lane.record.state is ModelState.WAITING:
            self._supervisor.stop_waiting(lane.name, "no request waits for it any more")

    def waiting(self, record: ModelRecord) -> dict[str, Any] | None:
        """A WAITING model's `waiting` in the admin API: its admission's reason and blockers, its
        requests waiting, and in how many seconds it is weighed again (None: when something changes)."""
        waiting = record.waiting
        if record.state is not ModelState.WAITING or waiting is None:
            return None
        lane = self._lanes.waiting(record.spec.name) or {"requests": 0, "recheck_in_s": None}
        return {"reason": waiting.reason, "recheck_in_s": lane["recheck_in_s"], "blockers": list(waiting.blockers),
                "requests": lane["requests"]}

    # -- the lanes' effects (daemon/traffic/lanes.py Effects) -----------------------------------------

    def admit(self, lane: Lane, request: asyncio.Future) -> bool:
        if request.done():
            return False
        request.set_result(lane.record.handle.base_url)
        self.stats.record_start(lane.name, self._clock())
        self._started(lane, self._turns.get(request))  # from now on a drain's bound can cut it
        return True

    def fail(self, request: asyncio.Future, error: LessorError) -> None:
        if not request.done():
            request.set_exception(error)

    def cut(self, lane: Lane, error: LessorError) -> None:
        """A drain's bound passed: the requests running on the lane end with `error` (each finishes
        through the front door, which frees its slot; their model idles and the load goes on)."""
        running = self._running.get(lane.name, set())
        if running:
            log.warning("%s: %d request(s) cut: %s", lane.name, len(running), error.message(),
                        extra={"model": lane.name, "step": "drain_cut"})
        for request in list(running):
            request.cut(error)

    def call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        self._timers.call_at(when_s, callback)

    def load(self, lane: Lane) -> None:
        task = asyncio.ensure_future(self._load(lane))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def close(self) -> None:
        """lessord is stopping: on-demand loads under way are cancelled (each rolls itself back)
        and awaited, before the supervisor stops the engines."""
        for task in list(self._loads):
            task.cancel()
        await asyncio.gather(*self._loads, return_exceptions=True)
        self.save_stats()

    # -- the learned traffic, across restarts ------------------------------------------------

    def save_stats(self) -> None:
        """Write the statistics beside the ledger (atomically: a crash leaves the last whole file)."""
        path = self._stats_path
        if path is None:
            return
        now = self._clock()
        self._stats_saved_s = now
        data = {"saved_at": self._wall(), "stats": self.stats.to_dict(now)}
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # the statistics are advice: serving goes on without them
            log.warning("cannot save the traffic statistics to %s: %s", path, exc.strerror or exc)

    def _restore_stats(self, path: Path) -> None:
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            elapsed = max(0.0, self._wall() - float(data["saved_at"]))
            self.stats.restore(data["stats"], self._clock(), elapsed)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.stats = TrafficStats()
            log.warning("the traffic statistics in %s are unreadable (%s): starting without them; "
                        "they are learned again from the requests", path, exc)

    async def _load(self, lane: Lane) -> None:
        lanes = self._lanes
        try:
            outcome = await self._supervisor.try_load(lane.name)
        except ModelBusy:
            lanes.busy(lane)
        except LessorError as exc:
            lanes.load_failed(lane, exc)
        except Exception as exc:  # a bug: fail the waiting requests rather than hang them
            log.exception("on-demand load of %s failed", lane.name)
            lanes.load_failed(lane, InvariantBroken(f"loading '{lane.name}' on demand: {exc!r}"))
        else:
            if isinstance(outcome, MustWait):
                lanes.must_wait(lane, outcome.blockers, outcome.recheck_s, outcome.reason)
            else:
                lanes.loaded(lane)

    # -- idle unload -------------------------------------------------------------------------

    def request_keep_alive(self, lane: Lane, keep_alive_s: float) -> float:
        """A request's keep_alive (seconds, 0 = unload once idle, -1 = forever: api/router.py refuses other negatives),
        bounded by router.request_keep_alive_max (unset: the model's own keep_alive), is its
        model's from now until it unloads; the latest request's wins. Returns what applies."""
        ceiling = self._config.request_keep_alive_max
        if ceiling is None:
            ceiling = lane.record.spec.keep_alive
        forever = float("inf")
        bounded = min(forever if keep_alive_s < 0 else keep_alive_s, forever if ceiling < 0 else ceiling)
        self._keep_alive[lane.name] = applied = -1.0 if bounded == forever else bounded
        return applied

    def keep_alive_s(self, record: ModelRecord) -> float:
        """The keep_alive in force: its latest request's while it runs, else its config's."""
        return self._keep_alive.get(record.spec.name, record.spec.keep_alive)

    def idle_expired(self) -> list[str]:
        """Models past their keep_alive with nothing running or waiting (pinned ones never)."""
        now = self._clock()
        return [record.spec.name for record in self._supervisor.records()
                if record.state is ModelState.READY and not record.spec.pinned
                and self._lanes.unused(record.spec.name)
                and keep_alive_over(self.keep_alive_s(record), self._supervisor.last_used_s(record), now)]

    async def unload_idle(self) -> list[str]:
        unloaded = []
        for name in self.idle_expired():
            try:
                keep_alive = self.keep_alive_s(self._supervisor.resolve(name))
                if await self._supervisor.expire(name, keep_alive):
                    unloaded.append(name)
                    self.idle_unloads[name] = self.idle_unloads.get(name, 0) + 1
            except LessorError as exc:  # mid-transition, or gone in a reload: next round
                log.debug("keep_alive unload of %s skipped: %s", name, exc)
        return unloaded

    async def run_keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._config.keep_alive_check)
            try:
                await self.unload_idle()
            except Exception:  # a bug must not end idle unloading for good
                log.exception("keep_alive check failed")
            if self._clock() - self._stats_saved_s >= STATS_SAVE_EVERY_S:
                self.save_stats()

    # -- reads -------------------------------------------------------------------------------

    def count(self, model: str, status: int) -> None:
        key = (model, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def queued(self) -> dict[str, int]:
        return self._lanes.queued()

    def learned(self, model: str) -> dict[str, Any]:
        """What the statistics say of a model: its request rate, the share that started at once and
        the share it kept up with (fewer than a batch ahead), how long its requests have gone unserved, and what a load of it takes."""
        measured, now = self.stats.measured_load_s(model), self._clock()
        return {"request_rate": round(self.stats.rate(model, now), 6),
                "started_share": round(self.stats.started_share(model), 4),
                "kept_up_share": round(self.stats.kept_up_share(model), 4),
                "starved_s": round(self.stats.starved_s(model, now), 3),
                "load_s": round(measured, 3) if measured is not None else None}

    def loads_wanted(self) -> dict[str, str]:
        """Models whose waiting requests want a load, and where it stands (asking: the
        supervisor is loading it; queued: it waits for busy models; held: for its own state)."""
        return self._lanes.loads_wanted()
