"""The supervisor: owns each model's lifecycle (the one writer of its `ModelRecord`) and runs the
load protocol.

1. plan from today's budgets, with the fingerprint of the same key where lessor measured one;
2. admit through the policy (evictions happen here and only here); 3-5. the attempt
(daemon/models/loading.py): weights + load_peak, the engine, the KV cache from what is really left,
verify. What the attempt measured is remembered as a fingerprint. An attempt that ran out of
memory is tried again (`planner.oom_retries`), planned from its measurement, then the model fails
with every attempt's reason. A model turns LOADING once admitted; a request's load that must wait
leaves it WAITING (why: `ModelRecord.waiting`) until admitted or no request waits. Loads that share
a device are serialized so two load peaks never overlap. An unload waits until the engine's memory
is back (daemon/models/unloading.py). An engine that exits on its own has its leases released the moment
its process is reaped; its restart policy (daemon/models/crashes.py) decides what comes next.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ...engines.base import EngineAdapter, GpuTarget, Launch
from ...engines.process import describe_exit, last_lines, signal_group
from ...policies import Admit, AdmissionRequest, Decision, Evict, ModelView, Policy, Queue, Rejected, Snapshot
from ..planning.admission import MustWait, as_reload, attempts_text, freed_by, log_admission, must_wait, never_fits, refused
from .adoption import Adoption, adopt, stopped_members
from ..config.model_spec import ModelSpec
from ..devices.locks import DeviceLocks
from ..devices.probes import Probe, SimProbe, gpu_id
from .elastic import Elastic
from ..errors import UnknownModel
from ..ledger.ledger_errors import LedgerUnavailable
from .load_errors import EngineUnavailable, LoadFailed, ModelAdopting, ModelBusy, ModelFailed, OutOfMemory
from ..planning.rejections import NotEnoughMemory, PlanRejected
from ..events import AdmissionDecided, AdmissionResult, EngineExited, Event, LoadRetried, ModelStateChanged
from .measurements import Fingerprinting
from ..ledger.fingerprints import FingerprintKey
from ..config.holder import ConfigHolder
from ..leases import EngineRecord
from ..ledger.ledger import Ledger
from ..config.changes import ConfigChange
from .lifecycle import ModelRecord, ModelState, UNLOADED_LIKE, Waiting
from .timeouts import Timeouts
from .traffic_counters import Traffic
from .loading import LoadAttempt, Loaded, bytes_text, leased_by
from ..planning.planner import Measured, Plan, plan, with_overrides
from .crashes import Restarts
from .timeline import LoadTimeline
from .unloading import Lingering, group_pids, verify_unload
from ..devices.usage import UsageMeter

log = logging.getLogger("lessor.supervisor")
BUSY = (ModelState.LOADING, ModelState.UNLOADING, ModelState.ADOPTING)  # mid-transition: not evicted, unloaded, retuned


class Supervisor:
    def __init__(self, config: ConfigHolder, ledger: Ledger, engines: Mapping[str, EngineAdapter],
                 publish: Callable[[Event], None], *, fingerprinting: Fingerprinting, lingering: Lingering,
                 meter: UsageMeter, elastic: Elastic, device_locks: DeviceLocks, traffic: Traffic,
                 clock: Callable[[], float] = time.monotonic, timeouts: Timeouts = Timeouts(),
                 probe: Probe | None = None) -> None:
        """Its parts are the runtime's (daemon/runtime.py), each built once and shared with the others
        that use it: `device_locks` with elastic KV, `traffic` (the router's counters, read-only)
        with the policy's snapshot, `lingering`, `meter` and `elastic` with the reconciler."""
        self._config, self._ledger, self._engines = config, ledger, engines
        self._simulated = probe is None or isinstance(probe, SimProbe)
        self.fingerprinting = fingerprinting  # the measurements a load is planned from
        self.lingering = lingering  # memory of stopped engines not yet back
        self.meter = meter
        self._state_dir = Path(config.current.state_dir).absolute()
        self._publish, self._clock, self._timeouts = publish, clock, timeouts
        self._models = {spec.name: ModelRecord(spec) for spec in config.current.models}
        self._device_locks = device_locks  # held by a load from its admission to its end
        self._admitting: set[str] = set()  # loads between their ask and their admission (not yet LOADING)
        self._traffic = traffic
        self._restarts = Restarts(clock, lambda name: self.try_load(name, cause="restart"))
        self.elastic = elastic  # KV leases shrunk and grown in place
        self._closing = False
        self._held_by_pending: frozenset[str] = frozenset()  # loads held for a reload that waits (hold_for_reload)
        self._held_by_apply: frozenset[str] = frozenset()  # loads held while apply_config unloads
        self._transition_watchers: list[Callable[[], None]] = []

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
        return self._restarts.count(name)

    def resolve(self, name: str) -> ModelRecord:
        config = self._config.current
        spec = config.model(name)
        if spec is None:
            raise UnknownModel(name, [n for s in config.models for n in (s.name, *s.aliases)])
        return self._models[spec.name]

    def records(self) -> list[ModelRecord]:
        return list(self._models.values())

    def leased(self, model: str) -> dict[str, int]:
        """Bytes the model holds, per device."""
        return leased_by(self._ledger, model)

    def log_path(self, model: str) -> Path:
        return self._state_dir / "logs" / f"{model}.log"

    def policy_snapshot(self) -> Snapshot:
        ledger = self._ledger.snapshot()
        held: dict[str, dict[str, int]] = {}
        for lease in ledger.leases:
            per_model = held.setdefault(lease.model, {})
            per_model[lease.device] = per_model.get(lease.device, 0) + lease.bytes
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
        first, _, decision = self._decide(spec, snapshot, measured, cause="operator")
        shown = {"fingerprint": self.fingerprinting.use(key, measured)}
        if isinstance(decision, Evict):
            result = plan(spec, snapshot.devices, freed_by(snapshot, decision.victims, decision.shrink), measured)
            return Plan(**{**result.__dict__, "evictions": decision.victims, **shown})
        if isinstance(decision, (Rejected, Queue)) and first.fits:
            return Plan(**{**first.__dict__, "fits": False, "reasons": (decision.reason,), **shown})
        return Plan(**{**first.__dict__, **shown})

    def _decide(self, spec: ModelSpec, snapshot: Snapshot, measured: Measured | None = None,
                cause: str = "request") -> tuple[Plan, AdmissionRequest, Decision]:
        """The plan against today's budgets, the request for its worst moment, and the policy's answer."""
        first = plan(spec, snapshot.devices, measured=measured)
        request = AdmissionRequest(spec.name, first.peak_need(), spec.priority, cause)
        return first, request, self.policy(request, snapshot)

    # -- lifecycle ---------------------------------------------------------------------------

    def _set_state(self, record: ModelRecord, state: ModelState, reason: str = "") -> None:
        previous, record.state = record.state, state
        if previous != state:
            self._publish(ModelStateChanged(record.spec.name, state.value, previous.value, reason))
            self._transitioned()

    async def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> ModelRecord:
        """An operator's load: a load that must wait for busy models is refused (ModelsBusy). It
        tries a model that lessor gave up on after its crashes, which start over."""
        outcome = await self.try_load(name, overrides, cause="operator")
        if isinstance(outcome, MustWait):
            raise outcome.error
        return outcome

    async def try_load(self, name: str, overrides: Mapping[str, Any] | None = None,
                       cause: str = "request") -> ModelRecord | MustWait:
        """Load now, or say which busy models the load waits for (the router's on-demand loads).
        `cause`: "request" (the router's), "restart" (after a crash) or "operator"; the first two
        count a failed load as a crash, and a request never loads a model lessor gave up on."""
        record = self.resolve(name)
        if record.state == ModelState.READY:
            return record
        if cause == "operator":
            self._restarts.forget(record.spec.name)
        elif (given_up := self._restarts.given_up(record.spec.name)) and record.state == ModelState.FAILED:
            raise ModelFailed(record.spec.name, given_up)
        if record.state is ModelState.ADOPTING:
            raise ModelAdopting(record.spec.name)
        self._check_idle(record)
        self._check_not_held(record)
        spec = with_overrides(record.spec, overrides or {})
        adapter = self._engines.get(spec.engine.kind)
        if adapter is None:
            raise EngineUnavailable(spec.name, spec.engine.kind, "no adapter for this engine in this build")
        self._admitting.add(spec.name)  # LOADING once admitted: a wait never flaps through it
        started_s = self._clock()
        timeline = LoadTimeline()
        timeline.mark("requested")
        try:
            async with self._device_locks.held(gpu_id(i) for i in spec.placement.devices):
                loaded = await self._attempts(record, spec, adapter, timeline, cause)
                if isinstance(loaded, MustWait):  # nothing was granted: it waits (or stays unloaded), and says why
                    self._wait(record, loaded, cause)
                    return loaded
        except (NotEnoughMemory, LedgerUnavailable) as exc:  # nothing is held: still unloaded, not failed
            self._fail(record, ModelState.UNLOADED, str(exc))
            raise
        except asyncio.CancelledError:  # the attempt rolled itself back
            self._fail(record, ModelState.UNLOADED, "load cancelled")
            raise
        except Exception as exc:
            if cause != "operator" and isinstance(exc, LoadFailed):  # the operator saw it; nobody else did
                self._crashed(record, str(exc), restart=cause == "restart")  # its one line says the failure
            else:
                log.warning("%s: load failed: %s", spec.name, exc, extra={"model": spec.name, "step": "failed"})
                self._fail(record, ModelState.FAILED, str(exc))
            raise
        finally:
            self._admitting.discard(spec.name)
            self._transitioned()  # an admission may end with no state change (a wait weighed again)
        record.handle, record.plan, record.attempt = loaded.handle, loaded.plan, loaded.attempt
        record.error, record.ready_at_s = "", self._clock()
        self._set_state(record, ModelState.READY)
        timeline.mark("done")
        record.last_load = timeline
        took_s = record.ready_at_s - started_s
        shares = timeline.to_dict()["totals"]
        log.info("%s: ready in %.1f s (lessor %.0f ms, engine %.1f s, measuring %.0f ms, noticing readiness %.0f ms): "
                 "kv %d tokens; holds %s", spec.name, took_s, shares["lessor"] * 1e3, shares["engine"],
                 shares["measure"] * 1e3, shares["notice"] * 1e3,
                 loaded.plan.kv_tokens, bytes_text(self.leased(spec.name)),
                 extra={"model": spec.name, "step": "ready", "seconds": round(took_s, 3), "pid": loaded.handle.pid,
                        "kv_tokens": loaded.plan.kv_tokens, "lessor_s": shares["lessor"]})
        returncode = loaded.handle.process.returncode
        if returncode is not None:  # it ended after its last health check, and its exit report found it loading
            self._restarts.spawn(self._engine_exited(record, record.generation, returncode))
        return record

    async def _attempts(self, record: ModelRecord, spec: ModelSpec, adapter: EngineAdapter,
                        timeline: LoadTimeline, cause: str) -> Loaded | MustWait:
        """Admit and load; an attempt that ran out of memory is admitted and tried again, planned
        from what it measured, until `planner.oom_retries` are spent. Whatever stops a retry (no
        room, a busy model, a rule), its answer carries the earlier attempts' reasons."""
        failures: list[str] = []
        kind = "oom"
        await self.fingerprinting.refresh(spec)
        key = self.fingerprinting.key(spec)  # the same for every attempt: its spec, devices and version
        for number in range(1, self._config.current.planner.oom_retries + 2):
            measured = self.fingerprinting.measured(key)
            attempt = None
            try:
                waits = await self._admit(record, spec, measured, cause)
                if waits is not None:
                    return waits.after(attempts_text(failures)) if failures else waits
                if record.state is not ModelState.LOADING:
                    record.waiting = None
                    self._set_state(record, ModelState.LOADING)
                timeline.mark("admitted")
                attempt = LoadAttempt(spec, adapter, self._ledger, self.meter, self._timeouts,
                                      lambda params, kv, port, a: self._launch(record, spec, params, kv, port, a),
                                      measured, nvml=not self._simulated, timeline=timeline)
                loaded = await attempt.run()
            except OutOfMemory as exc:
                await self.fingerprinting.remember(key, attempt.measurements if attempt else (), exc.kind)
                failures.append(f"{exc.step}: {exc.reason}")
                kind = exc.kind
                if number <= self._config.current.planner.oom_retries:
                    log.warning("%s: load ran out of memory (%s): %s; trying again planned from what it measured",
                                spec.name, exc.kind, exc.reason, extra={"model": spec.name, "step": "oom"})
                    self._publish(LoadRetried(spec.name, number, exc.kind, exc.reason))
                continue
            except (NotEnoughMemory, PlanRejected, LoadFailed) as exc:
                if not failures:
                    raise
                raise OutOfMemory(spec.name, getattr(exc, "step", "plan"), attempts_text(failures, f"not started: {exc}"),
                                  kind=kind) from exc
            await self._remember_ready(key, attempt)
            return loaded
        raise OutOfMemory(spec.name, "load", attempts_text(failures), kind=kind)

    async def _remember_ready(self, key: FingerprintKey, attempt: LoadAttempt) -> None:
        """Record a finished load's measurement; cancelled meanwhile, the load is rolled back."""
        try:
            await self.fingerprinting.remember(key, attempt.measurements, attempt.outcome)
        except BaseException:
            await asyncio.shield(attempt.roll_back("cancelled while its measurement was recorded"))
            raise

    def _fail(self, record: ModelRecord, state: ModelState, error: str) -> None:
        record.error, record.waiting = error, None
        self._set_state(record, state, error)

    def _wait(self, record: ModelRecord, waits: MustWait, cause: str) -> None:
        """A request's load must wait: WAITING, with why (never an error); an operator's or a restart's is refused."""
        if cause != "request":
            if record.state is not ModelState.WAITING:
                self._fail(record, ModelState.UNLOADED, waits.error.message())
            return
        record.error, since_s = "", record.waiting.since_s if record.waiting else self._clock()
        record.waiting = Waiting(waits.reason, waits.blockers, waits.recheck_s, since_s)
        self._set_state(record, ModelState.WAITING, waits.reason)

    def stop_waiting(self, name: str, reason: str) -> None:
        """No request waits for the model any more (the router's word): it is unloaded again."""
        record = self._models.get(name)
        if record is not None and record.state is ModelState.WAITING:
            record.waiting = None
            self._set_state(record, ModelState.UNLOADED, reason)

    def _check_idle(self, record: ModelRecord) -> None:
        """ModelBusy while the model is mid-transition, its admission included."""
        if record.state in BUSY or record.spec.name in self._admitting:
            raise ModelBusy(record.spec.name, (record.state if record.state in BUSY else ModelState.LOADING).value)

    def _launch(self, record: ModelRecord, spec: ModelSpec, params: Mapping[str, Any], kv_tokens: int, port: int,
                attempt: str) -> Launch:
        readings = self._ledger.snapshot().readings
        devices = [gpu_id(i) for i in spec.placement.devices]
        record.generation += 1
        generation = record.generation
        return Launch(spec, params, kv_tokens,
                      tuple(GpuTarget(d, readings[d].index, readings[d].uuid, readings[d].total_bytes,
                                      readings[d].total_bytes - readings[d].used_bytes) for d in devices),
                      self.leased(spec.name), self._simulated, port,
                      self.log_path(spec.name), self._state_dir / "engines" / spec.name,
                      on_exit=lambda returncode: self._restarts.spawn(self._engine_exited(record, generation, returncode)),
                      marker={"LESSOR_STATE_DIR": str(self._state_dir), "LESSOR_ATTEMPT": attempt},
                      withhold_env=tuple(k.key_env for k in self._config.current.router.api_keys if k.key_env))

    async def _admit(self, record: ModelRecord, spec: ModelSpec, measured: Measured | None,
                     cause: str) -> MustWait | None:
        """Step 2: the policy decides over a snapshot; evictions happen here and only here. A
        waiting model weighed again to the same wait says nothing new: no event, a DEBUG line."""
        snapshot = self.policy_snapshot()
        too_large = never_fits(spec, snapshot.devices, measured)
        if too_large is not None:  # before the policy: no eviction or wait may be made for it
            raise too_large
        _, request, decision = self._decide(spec, snapshot, measured, cause)
        again = (isinstance(decision, Queue) and record.waiting is not None
                 and record.waiting.blockers == tuple(decision.blockers))
        log_admission(request, decision, self._config.current.policy.name, again)
        if not again:
            self._publish(AdmissionDecided(spec.name, AdmissionResult(type(decision).__name__.lower()),
                                           getattr(decision, "reason", ""), getattr(decision, "victims", ())))
        if isinstance(decision, Evict):
            if not await self.elastic.shrink_all(decision.shrink, self._models, f"shrunk for '{spec.name}'"):
                return must_wait(request, snapshot, "a model to shrink took a request while room was being made",
                                 tuple(decision.shrink))
            for victim in decision.victims:
                if not await self.evict(victim, reason=f"evicted for '{spec.name}'"):
                    # A request started on it while an earlier victim unloaded.
                    return must_wait(request, snapshot, f"'{victim}' took a request while room was being made",
                                           decision.victims)
        elif isinstance(decision, Queue):
            return must_wait(request, snapshot, decision.reason, decision.blockers, decision.recheck_s)
        elif isinstance(decision, Rejected):
            raise refused(request, snapshot, decision, self._config.current.policy.name)
        elif not isinstance(decision, Admit):
            raise AssertionError(f"policy returned {decision!r}")
        return None

    # -- adoption after a restart -------------------------------------------------------------

    def adopting(self, engine: EngineRecord) -> None:
        """At start, before anything is served: the model waits for its engine's adoption
        (ADOPTING), so no request loads it a second time meanwhile."""
        record = self._models.get(engine.model)
        if record is not None and record.state is ModelState.UNLOADED:
            self._set_state(record, ModelState.ADOPTING, f"adopting engine pid {engine.pid}")

    async def adopt(self, engine: EngineRecord) -> Adoption:
        """Take over an engine that a previous lessord started (daemon/models/adoption.py decides). Not
        adopted (or cancelled): its record and leases go before the model is unloaded, so no new
        load of the model can interleave with that cleanup."""
        self.adopting(engine)
        record = self._models.get(engine.model)
        adapter = self._engines.get(record.spec.engine.kind) if record else None

        def launch_for(r: ModelRecord) -> Launch | None:
            try:
                return self._launch(r, r.spec, engine.params, engine.kv_tokens, engine.port, engine.attempt)
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
            self._set_state(record, ModelState.READY, f"adopted engine pid {engine.pid}")
            log.info("%s: adopted (pid %d, from the previous lessord)", engine.model, engine.pid,
                     extra={"model": engine.model, "step": "adopted", "pid": engine.pid})
        return adoption

    async def _not_adopted(self, engine: EngineRecord, record: ModelRecord | None, reason: str) -> None:
        await self._ledger.forget_engine(engine.model)
        await self._ledger.release_attempt(engine.attempt, "holder gone at start")
        if record is not None and record.state is ModelState.ADOPTING:
            self._set_state(record, ModelState.UNLOADED, reason)

    # -- crashes, overruns, unloads ----------------------------------------------------------

    async def _engine_exited(self, record: ModelRecord, generation: int, returncode: int) -> None:
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
        self._crashed(record, reason, restart=True,
                      exited=lambda restart_in: EngineExited(record.spec.name, handle.pid, returncode, reason, restart_in))

    async def engine_hung(self, name: str, handle: Any, reason: str) -> bool:
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
        self._crashed(record, reason, restart=True, exited=lambda restart_in: EngineExited(
            name, handle.pid, returncode if returncode is not None else -1, reason, restart_in, hung=True))
        return True

    def _crashed(self, record: ModelRecord, reason: str, restart: bool,
                 exited: Callable[[float | None], Event] | None = None) -> None:
        """Count a crash: announce it (`exited`), fail the model with the reason (and lessor's verdict
        when it gives up), and schedule the restart its policy wants, if `restart`."""
        restart_in = self._restarts.crashed(record, reason)
        self._restarts.log_crash(record, reason, restart_in if restart else None)
        if exited is not None:
            self._publish(exited(restart_in))
        self._fail(record, ModelState.FAILED, self._restarts.given_up(record.spec.name) or reason)
        if restart_in is not None and restart:
            self._restarts.schedule(record, restart_in)

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
        if record.state in UNLOADED_LIKE and record.spec.name not in self._admitting:
            return record
        self._check_idle(record)
        self._set_state(record, ModelState.UNLOADING, reason)
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
        self._set_state(record, ModelState.UNLOADED, reason)
        took_s = self._clock() - started_s
        log.info("%s: unloaded (%s): freed %s in %.1f s", record.spec.name, reason, bytes_text(held), took_s,
                 extra={"model": record.spec.name, "step": "unloaded", "reason": reason, "freed_bytes": held,
                        "seconds": round(took_s, 3)})
        return record

    async def settled(self) -> None:
        """Return once crash handling and the restarts it scheduled have run (or given up)."""
        await self._restarts.settled()

    async def close(self) -> None:
        """lessord is stopping: cancel pending restarts (none is spawned after this), then stop
        every engine and release its leases. Idempotent. With the ledger not answering, ready
        engines are left running: their records and leases are in the database, and the next
        lessord adopts them, where a stop it could not record would cost each model a load."""
        await self._restarts.close()
        self._closing = True
        keep = bool(self._ledger.unavailable) or not await self._ledger.answers()
        for record in self.records():
            if keep and record.state is ModelState.READY:
                log.warning("%s: left running for the next lessord to adopt: the ledger cannot record its stop (%s)",
                            record.spec.name, self._ledger.unavailable)
            elif record.state in (ModelState.READY, ModelState.FAILED):
                await self.unload(record.spec.name, reason="lessord stopping")

    # -- config changes (daemon/config/reloading.py orders them) ---------------------------------------

    def affected_by(self, config) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The models `config` removes and those whose spec it changes."""
        new = {spec.name: spec for spec in config.models}
        removed = tuple(n for n in self._models if n not in new)
        changed = tuple(n for n in self._models if n in new and new[n] != self._models[n].spec)
        return removed, changed

    def reload_blockers(self, config) -> dict[str, str]:
        """The models `config` removes or changes that are mid-transition (loading, being admitted,
        unloading, adopting), with their state: `config` cannot apply before they settle."""
        removed, changed = self.affected_by(config)
        return {n: (self._models[n].state if self._models[n].state in BUSY else ModelState.LOADING).value
                for n in removed + changed if self._models[n].state in BUSY or n in self._admitting}

    def hold_for_reload(self, config) -> None:
        """While a reload waits for `config` (None: none waits), no load of a model it removes or
        changes starts: the loads under way end and none follows, so the reload cannot starve."""
        self._held_by_pending = frozenset(sum(self.affected_by(config), ())) if config is not None else frozenset()

    def watch_transitions(self, callback: Callable[[], None]) -> None:
        """`callback()` after every state change and at the end of every admission (a pending reload's wake-up)."""
        self._transition_watchers.append(callback)

    def _transitioned(self) -> None:
        for callback in self._transition_watchers:
            callback()

    def _check_not_held(self, record: ModelRecord) -> None:
        name = record.spec.name
        if name in self._held_by_pending or name in self._held_by_apply:
            raise ModelBusy(name, "held for a config reload that changes it")

    async def apply_config(self, config) -> ConfigChange:
        """Add, remove and retune models, then put `config` in force in one step. Running models
        keep running: a changed spec applies at their next load; a removed model is unloaded, and no
        load of an affected model starts meanwhile. Refused (nothing changed) while an affected model
        is mid-transition (reload_blockers: daemon/config/reloading.py waits for them instead)."""
        busy = self.reload_blockers(config)
        if busy:
            name, state = next(iter(busy.items()))
            raise ModelBusy(name, state)
        new = {spec.name: spec for spec in config.models}
        removed, changed = self.affected_by(config)
        self._held_by_apply = frozenset(removed + changed)
        try:
            for name in removed:
                await self.unload(name, reason="removed from the config")
                del self._models[name]
        finally:
            self._held_by_apply = frozenset()
        for name in changed:
            self._models[name].spec = new[name]
        added = tuple(n for n in new if n not in self._models)
        for name in added:
            self._models[name] = ModelRecord(new[name])
        self._config.swap(config)
        self._restarts.forget()  # the operator may have fixed what crashed them: every model may be tried again
        return ConfigChange(added, removed, changed)
