"""The supervisor: owns each model's lifecycle (the one writer of its `ModelRecord`): its loads
(daemon/models/loads.py: admission, then the attempt, daemon/models/loading.py; one under way per
model, joined by a second caller), its unloads and evictions (an unload waits until the engine's
memory is back, daemon/models/unloading.py; room for a load or for foreign growth is made in
daemon/models/room.py), the adoption of a previous lessord's engines, and config changes
(daemon/models/reconfiguring.py). Loads that share a device are serialized so two load peaks never
overlap. An engine that exits on its own has its leases released the moment its process is
reaped; its restart policy (daemon/models/crashes.py) decides what comes next.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...engines.base import EngineAdapter, EngineHandle, Launch
from ...engines.process import describe_exit, last_lines, signal_group
from ...policies import Evict, ModelView, Policy, Snapshot
from ..config.holder import ConfigHolder
from ..devices.usage import UsageMeter
from ..errors import UnknownModel
from ..events import EngineExited, Event, ModelStateChanged
from ..leases import EngineRecord
from ..ledger.ledger import Ledger
from ..planning.admission import as_reload, bytes_text, decide, shown
from ..planning.planner import Plan, with_overrides
from ..planning.rejections import PlanRejected
from .adoption import Adoption, adopt, stopped_members
from .crashes import Crashes
from .elastic import Elastic
from .launching import Launcher
from .lifecycle import UNLOADED_LIKE, ModelRecord, ModelState
from .load_errors import ModelBusy
from .loading import leased_by
from .loads import Loads
from .measurements import Fingerprinting
from .reconfiguring import BUSY, Reconfiguring
from .room import NoRoom, make_room
from .timeouts import Timeouts
from .traffic_counters import Traffic
from .unloading import Lingering, group_pids, verify_unload

log = logging.getLogger("lessor.supervisor")


class Supervisor:
    def __init__(self, config: ConfigHolder, ledger: Ledger, engines: Mapping[str, EngineAdapter],
                 publish: Callable[[Event], None], *, loads: Loads, reconfiguring: Reconfiguring, crashes: Crashes,
                 launcher: Launcher, fingerprinting: Fingerprinting, lingering: Lingering, meter: UsageMeter,
                 elastic: Elastic, traffic: Traffic, clock: Callable[[], float] = time.monotonic,
                 timeouts: Timeouts | None = None) -> None:
        """Its parts are the runtime's (daemon/runtime.py), each built once and shared with the others
        that use it: `loads` and `reconfiguring` (which reach back to this supervisor, the writer of
        each model's state), `crashes` (whose retries are loads), `traffic` (the router's counters,
        read-only) with the policy's snapshot, `lingering`, `meter` and `elastic` with the reconciler."""
        self._config, self._ledger, self._engines = config, ledger, engines
        self.fingerprinting = fingerprinting  # the measurements a load is planned from
        self.lingering = lingering  # memory of stopped engines not yet back
        self.meter = meter
        self._publish, self._clock, self._timeouts = publish, clock, timeouts or Timeouts()
        self._models = {spec.name: ModelRecord(spec) for spec in config.current.models}
        self.loads, self.reconfiguring = loads, reconfiguring
        self._launcher, self._traffic, self._crashes = launcher, traffic, crashes
        self.elastic = elastic  # KV leases shrunk and grown in place
        self._closing = False
        # What others ask of the supervisor, answered by its parts:
        self.load, self.try_load, self.underway = loads.load, loads.try_load, loads.underway
        self.affected_by, self.reload_blockers = reconfiguring.affected_by, reconfiguring.reload_blockers
        self.hold_for_reload, self.apply_config = reconfiguring.hold_for_reload, reconfiguring.apply_config
        self.watch_transitions, self.transitioned = reconfiguring.watch_transitions, reconfiguring.transitioned
        self.check_not_held = reconfiguring.check_not_held

    # -- reads -------------------------------------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of last-use times (the router stamps them, policies compare them)."""
        return self._clock

    @property
    def policy(self) -> Policy:
        """The admission policy of the config in force."""
        return self._config.current.policy.build()

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    def in_flight(self, name: str) -> int:
        return self._traffic.in_flight(name)

    def last_used_s(self, record: ModelRecord) -> float:
        """Its last request's end, or when it became ready if it has served none since."""
        return max(record.ready_at_s, self._traffic.last_used_s(record.spec.name))

    def restarts(self, name: str) -> int:
        return self._crashes.count(name)

    def resolve(self, name: str) -> ModelRecord:
        config = self._config.current
        spec = config.model(name)
        if spec is None:
            raise UnknownModel(name, [n for s in config.models for n in (s.name, *s.aliases)])
        return self._models[spec.name]

    def records(self) -> list[ModelRecord]:
        return list(self._models.values())

    def record_set(self) -> dict[str, ModelRecord]:
        """Its records by name, which a config change adds to and removes from (daemon/models/reconfiguring.py)."""
        return self._models

    def leased(self, model: str) -> dict[str, int]:
        """Bytes the model holds, per device."""
        return leased_by(self._ledger, model)

    def log_path(self, model: str) -> Path:
        return self._launcher.log_path(model)

    def policy_snapshot(self) -> Snapshot:
        ledger = self._ledger.snapshot()
        held = ledger.held_by()
        models = {}
        for r in self._models.values():
            name, holds = r.spec.name, held.get(r.spec.name, {})
            size = sum(holds.values())  # unloaded: the request's need says its size
            models[name] = ModelView(name, r.state.value, r.spec.priority, r.spec.pinned, self.in_flight(name),
                                     self.last_used_s(r), holds, size_bytes=size, ready_since_s=r.ready_at_s,
                                     kv_spare_bytes=self.elastic.spare(r), **self._traffic.learned_view(name, size))
        return Snapshot(ledger.budgets, models, self._clock())

    def dry_run(self, name: str, overrides: Mapping[str, Any] | None = None) -> Plan:
        """What a load would do now: the plan, with the evictions the policy would make."""
        record = self.resolve(name)
        try:
            spec = with_overrides(record.spec, overrides or {})
        except PlanRejected as exc:  # a dry run answers "no, because", it does not fail
            return Plan(record.spec.name, False, 0, dict(overrides or {}), (), (), tuple(exc.reasons))
        snapshot = as_reload(self.policy_snapshot(), spec.name)  # a loaded model's plan is its reload's
        key = self.fingerprinting.key(spec)
        measured = self.fingerprinting.measured(key)
        admission = decide(spec, snapshot, measured, self.policy, cause="operator")
        return replace(shown(spec, snapshot, measured, admission), fingerprint=self.fingerprinting.use(key, measured))

    # -- lifecycle ---------------------------------------------------------------------------

    def set_state(self, record: ModelRecord, state: ModelState, reason: str = "") -> None:
        previous, record.state = record.state, state
        if previous != state:
            self._publish(ModelStateChanged(record.spec.name, state.value, previous.value, reason))
            self.transitioned()

    def fail(self, record: ModelRecord, state: ModelState, error: str) -> None:
        record.error, record.waiting = error, None
        self.set_state(record, state, error)

    def stop_waiting(self, name: str, reason: str) -> None:
        """No request waits for the model any more (the router's word): it is unloaded again."""
        record = self._models.get(name)
        if record is not None and record.state is ModelState.WAITING:
            record.waiting = None
            self.set_state(record, ModelState.UNLOADED, reason)

    def check_idle(self, record: ModelRecord) -> None:
        """ModelBusy while the model is mid-transition, its admission included."""
        if record.state in BUSY or self.loads.underway(record.spec.name) is not None:
            raise ModelBusy(record.spec.name, (record.state if record.state in BUSY else ModelState.LOADING).value)

    def on_exit(self, record: ModelRecord) -> Callable[[int], None]:
        """The exit report of the engine about to start: its crash handling, unless a later start
        replaced it (each start counts one more generation)."""
        record.generation += 1
        generation = record.generation
        return lambda returncode: self._crashes.spawn(self.engine_exited(record, generation, returncode))

    async def make_room(self, decision: Evict, shrunk_for: str, evicted_for: str,
                        best_effort: bool = False) -> NoRoom | None:
        """Carry out a policy's Evict (daemon/models/room.py): a load's, or the reconciler's give-back."""
        return await make_room(decision, self.elastic, self._models, self.evict, shrunk_for, evicted_for, best_effort)

    # -- adoption after a restart -------------------------------------------------------------

    def adopting(self, engine: EngineRecord) -> None:
        """At start, before anything is served: the model waits for its engine's adoption
        (ADOPTING), so no request loads it a second time meanwhile."""
        record = self._models.get(engine.model)
        if record is not None and record.state is ModelState.UNLOADED:
            self.set_state(record, ModelState.ADOPTING, f"adopting engine pid {engine.pid}")

    async def adopt(self, engine: EngineRecord) -> Adoption:
        """Take over an engine that a previous lessord started (daemon/models/adoption.py decides). Not
        adopted (or cancelled): its record and leases go before the model is unloaded, so no new
        load of the model can interleave with that cleanup."""
        self.adopting(engine)
        record = self._models.get(engine.model)
        adapter = self._engines.get(record.spec.engine.engine_kind()) if record else None

        def launch_for(r: ModelRecord) -> Launch | None:
            try:
                return self._launcher.launch(r.spec, engine.params, engine.kv_tokens, engine.port, engine.attempt,
                                             self.on_exit(r))
            except KeyError:  # its device is no longer in the config
                return None

        try:
            adoption = await adopt(engine, record, adapter, launch_for, self.log_path(engine.model), self._timeouts)
        except asyncio.CancelledError:
            await asyncio.shield(self._not_adopted(engine, record, "lessord stopped before its engine was adopted"))
            raise
        if not adoption.adopted:
            await self._not_adopted(engine, record, adoption.describe())
        else:
            assert record is not None
            record.handle, record.attempt = adoption.handle, engine.attempt
            record.plan = Plan(engine.model, True, engine.kv_tokens, dict(engine.params), (), ())
            record.ready_at_s = self._clock()
            self.set_state(record, ModelState.READY, f"adopted engine pid {engine.pid}")
            log.info("%s: adopted (pid %d, from the previous lessord)", engine.model, engine.pid,
                     extra={"model": engine.model, "step": "adopted", "pid": engine.pid})
        return adoption

    async def _not_adopted(self, engine: EngineRecord, record: ModelRecord | None, reason: str) -> None:
        await self._ledger.forget_engine(engine.model)
        await self._ledger.release_attempt(engine.attempt, "holder gone at start")
        if record is not None and record.state is ModelState.ADOPTING:
            self.set_state(record, ModelState.UNLOADED, reason)

    # -- crashes, overruns, unloads ----------------------------------------------------------

    async def engine_exited(self, record: ModelRecord, generation: int, returncode: int) -> None:
        """The engine ended on its own. While loading, the load's own wait sees it and rolls back;
        once ready, its leases are released here, at once, and the restart policy decides."""
        if record.generation != generation or record.state != ModelState.READY or record.handle is None:
            return
        handle, record.handle = record.handle, None
        await handle.stop(0)  # reap whatever the leader left in its process group
        self.meter.forget(handle.pid)
        reason = f"engine exited with {describe_exit(returncode)} while serving"
        await self._ledger.forget_engine(record.spec.name)
        await self._ledger.release_model(record.spec.name, reason)
        if record.generation != generation or record.state != ModelState.READY:
            return  # unloaded (an eviction, a reload) while its leases were released: not a crash to restart
        reason += last_lines(handle.process.tail(5))
        record.plan = None
        self.crashed(record, reason, retry=True,
                     exited=lambda retry_in: EngineExited(record.spec.name, handle.pid, returncode, reason, retry_in))

    async def engine_hung(self, name: str, handle: EngineHandle, reason: str) -> bool:
        """The health check's finding (daemon/models/health.py): a ready engine that no longer answers. It
        is stopped (SIGKILL at once when a signal stopped it: it would not act on SIGTERM) and counts
        as a crash: its leases go, its requests are cut with it, its restart policy decides what
        follows. False when the model moved on meanwhile (unloaded, evicted, restarted)."""
        record = self._models.get(name)
        if record is None or record.handle is not handle or record.state != ModelState.READY:
            return False
        generation, record.handle = record.generation, None  # no request is sent to it from here
        log.warning("%s: %s; stopping it (pid %d)", name, reason, handle.pid,
                    extra={"model": name, "step": "hung", "pid": handle.pid})
        if stopped_members(handle.pid):
            signal_group(handle.pid, signal.SIGKILL)
        await handle.stop(self._timeouts.stop_grace_s)
        self.meter.forget(handle.pid)
        returncode = handle.process.returncode
        await self._ledger.forget_engine(name)
        await self._ledger.release_model(name, reason)
        if record.generation != generation or record.state != ModelState.READY:
            return True  # unloaded while its leases were released: nothing left to restart
        record.plan = None
        self.crashed(record, reason, retry=True, exited=lambda retry_in: EngineExited(
            name, handle.pid, returncode if returncode is not None else -1, reason, retry_in, hung=True))
        return True

    def crashed(self, record: ModelRecord, reason: str, retry: bool,
                exited: Callable[[float | None], Event] | None = None) -> None:
        """Count a crash: announce it (`exited`, given the seconds to the retry: the event's
        restart_in_s, a word of the API kept), fail the model with the reason (and lessor's verdict
        when it gives up), and schedule the retry its `restart` settings want, if `retry`."""
        retry_in = self._crashes.crashed(record, reason)
        self._crashes.log_crash(record, reason, retry_in if retry else None)
        if exited is not None:
            self._publish(exited(retry_in))
        self.fail(record, ModelState.FAILED, self._crashes.given_up(record.spec.name) or reason)
        if retry_in is not None and retry:
            self._crashes.schedule(record, retry_in)

    def report_overrun(self, name: str, overrun: dict[str, Any] | None) -> None:
        """The reconciler's finding: the engine measured above its leases (None: back within them).
        A model a reload removed meanwhile has nothing left to report on."""
        record = self._models.get(name)
        if record is not None:
            record.overrun = overrun

    async def stop_for_overrun(self, name: str, reason: str) -> None:
        record = await self.unload(name, reason=f"overrun: {reason}")
        record.error = f"stopped for an overrun: {reason}"

    async def evict(self, name: str, reason: str) -> bool:
        """Unload a model that is idle for a load that needs its room. False if it is busy."""
        return await self._unload_idle(name, lambda idle_s: reason, evicted=True)

    async def expire(self, name: str, keep_alive_s: float) -> bool:
        """Unload a model idle past its keep_alive: its own cause, not an eviction (no load asked
        for the room, no policy chose it). False if it is busy."""
        return await self._unload_idle(
            name, lambda idle_s: f"idle {idle_s:.0f} s, past its keep_alive ({keep_alive_s:g} s)")

    async def _unload_idle(self, name: str, reason_of: Callable[[float], str], evicted: bool = False) -> bool:
        """Check that the model is idle and unload it in one step (no request can start in between:
        the state leaves READY before the first await); `reason_of` its idle seconds says why."""
        record = self.resolve(name)
        if self.in_flight(record.spec.name) or record.state in BUSY:
            return False
        idle_s = self._clock() - self.last_used_s(record)
        reason = reason_of(idle_s)
        if evicted:
            log.info("%s: evicted (%s)", record.spec.name, reason,
                     extra={"model": record.spec.name, "step": "evicted", "reason": reason, "idle_s": round(idle_s, 3)})
        await self.unload(name, reason)
        return True

    async def unload(self, name: str, reason: str = "unload requested") -> ModelRecord:
        record = self.resolve(name)
        if record.state in UNLOADED_LIKE and self.loads.underway(record.spec.name) is None:
            return record
        self.check_idle(record)
        self.set_state(record, ModelState.UNLOADING, reason)
        started_s, held = self._clock(), self.leased(record.spec.name)
        handle, record.handle = record.handle, None
        pids = (group_pids(self._ledger.snapshot().readings, handle.pid, self.leased(record.spec.name))
                if handle is not None else {})
        if handle is not None:
            await handle.stop(self._timeouts.stop_grace_s)
            self.meter.forget(handle.pid)
        await self._ledger.forget_engine(record.spec.name)
        await self._ledger.release_model(record.spec.name, reason)
        # Stopping lessord, one look, no wait: systemd's stop timeout is for every engine together.
        await verify_unload(record.spec.name, pids, lambda: self._ledger.snapshot().readings,
                            0 if self._closing else self._timeouts.unload_verify_s, self.lingering)
        record.plan, record.overrun = None, None
        self.set_state(record, ModelState.UNLOADED, reason)
        took_s = self._clock() - started_s
        log.info("%s: unloaded (%s): freed %s in %.1f s", record.spec.name, reason, bytes_text(held), took_s,
                 extra={"model": record.spec.name, "step": "unloaded", "reason": reason, "freed_bytes": held,
                        "seconds": round(took_s, 3)})
        return record

    async def settled(self) -> None:
        """Return once crash handling and the restarts it scheduled have run (or given up)."""
        await self._crashes.settled()

    async def close(self) -> None:
        """lessord is stopping: cancel pending restarts (none is spawned after this), then stop
        every engine and release its leases. Idempotent. With the ledger not answering, ready
        engines are left running: their records and leases are in the database, and the next
        lessord adopts them, where a stop it could not record would cost each model a load."""
        await self._crashes.close()
        self._closing = True
        keep = bool(self._ledger.unavailable) or not await self._ledger.answers()
        for record in self.records():
            if keep and record.state is ModelState.READY:
                log.warning("%s: left running for the next lessord to adopt: the ledger cannot record its stop (%s)",
                            record.spec.name, self._ledger.unavailable)
            elif record.state in (ModelState.READY, ModelState.FAILED):
                await self.unload(record.spec.name, reason="lessord stopping")
