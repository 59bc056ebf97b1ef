"""The load protocol's first two steps and its retries, run for the supervisor (`Loads`, which the
runtime builds and the supervisor holds; the supervisor changes the model's state):

1. plan from today's budgets, with the fingerprint of the same key where lessor measured one;
2. admit: `planning.admission.decide` puts the plan to the policy, and an `Evict` is carried out
   by `make_room` (evictions happen here and only here); 3-5. the attempt (daemon/models/loading.py),
   with the admission's plan, or a plan made again where evictions changed the memory since.

One load per model is under way at a time: a second caller joins it and gets its outcome. The
admission runs before the record turns LOADING, so a load that must wait changes no state (a
request's load shows WAITING, with why, until admitted or no request waits). An attempt that ran
out of memory is tried again (`planner.oom_retries`), planned from its measurement, then the model
fails with every attempt's reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...engines.base import EngineAdapter
from ...policies import Admit, Evict, Policy, Queue, Rejected, Snapshot
from ..config.holder import ConfigHolder
from ..config.model_spec import ModelSpec
from ..devices.locks import DeviceLocks
from ..devices.probes import gpu_id
from ..devices.usage import UsageMeter
from ..events import AdmissionDecided, AdmissionResult, Event, LoadRetried
from ..ledger.fingerprints import FingerprintKey
from ..ledger.ledger import Ledger
from ..ledger.ledger_errors import LedgerUnavailable
from ..planning.admission import (
    Admission,
    MustWait,
    attempts_text,
    bytes_text,
    decide,
    log_admission,
    must_wait,
    never_fits,
    refused,
)
from ..planning.planner import Measured, with_overrides
from ..planning.rejections import NotEnoughMemory, PlanRejected
from .crashes import CRASH_RETRY, Crashes
from .launching import Launcher
from .lifecycle import ModelRecord, ModelState, Waiting
from .load_errors import EngineUnavailable, LoadFailed, ModelAdopting, ModelFailed, OutOfMemory
from .loading import LoadAttempt, Loaded
from .measurements import Fingerprinting
from .room import NoRoom
from .timeline import LoadTimeline
from .timeouts import Timeouts

log = logging.getLogger("lessor.supervisor")


@dataclass
class Underway:
    """A load under way: what it was asked with, and its outcome for the callers that joined it."""

    overrides: Mapping[str, Any]
    cause: str  # the policy weighs a request's, an operator's and a crash retry's load apart
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    joined: int = 0  # callers that await its outcome beside the one that runs it

    def end(self, result: ModelRecord | MustWait | BaseException) -> None:
        if isinstance(result, asyncio.CancelledError):
            self.outcome.cancel()
        elif isinstance(result, BaseException):
            self.outcome.set_exception(result)
            self.outcome.exception()  # retrieved: nobody may have joined, which is no error of its own
        else:
            self.outcome.set_result(result)


class RecordWriter(Protocol):
    """What a load asks of the supervisor, the writer of each model's state (`set_state`, `fail`,
    `crashed`) and the reader of its records, policy and memory."""

    @property
    def policy(self) -> Policy: ...
    def resolve(self, name: str) -> ModelRecord: ...
    def leased(self, model: str) -> dict[str, int]: ...
    def policy_snapshot(self) -> Snapshot: ...
    def set_state(self, record: ModelRecord, state: ModelState, reason: str = "") -> None: ...
    def fail(self, record: ModelRecord, state: ModelState, error: str) -> None: ...
    def check_idle(self, record: ModelRecord) -> None: ...
    def check_not_held(self, record: ModelRecord) -> None: ...
    def transitioned(self) -> None: ...
    def crashed(self, record: ModelRecord, reason: str, retry: bool) -> None: ...
    def on_exit(self, record: ModelRecord) -> Callable[[int], None]: ...
    async def engine_exited(self, record: ModelRecord, generation: int, returncode: int) -> None: ...
    async def make_room(self, decision: Evict, shrunk_for: str, evicted_for: str,
                        best_effort: bool = False) -> NoRoom | None: ...


class Loads:
    """The loads of the supervisor that `writer()` returns (the runtime builds both, daemon/runtime.py).
    Its own state is the loads under way (one per model); a model's state changes through the
    writer; a finished load's outcome (handle, plan, attempt, ready time, last load, or why it
    waits) is written on the record here, by the one load of that model under way."""

    def __init__(self, config: ConfigHolder, ledger: Ledger, engines: Mapping[str, EngineAdapter],
                 publish: Callable[[Event], None], writer: Callable[[], RecordWriter], *, clock: Callable[[], float],
                 timeouts: Timeouts, crashes: Crashes, device_locks: DeviceLocks, launcher: Launcher,
                 fingerprinting: Fingerprinting, meter: UsageMeter, simulated: bool) -> None:
        self._config, self._ledger, self._engines, self._publish = config, ledger, engines, publish
        self._writer, self._clock, self._timeouts, self._crashes = writer, clock, timeouts, crashes
        self.device_locks = device_locks  # held by a load from its admission to its end
        self._launcher, self.fingerprinting, self.meter, self._simulated = launcher, fingerprinting, meter, simulated
        self._underway: dict[str, Underway] = {}  # one per model, from its ask to its end (admission included)

    def underway(self, name: str) -> Underway | None:
        """The load of `name` under way, from its ask (its admission included) to its end."""
        return self._underway.get(name)

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
        `cause`: "request" (the router's), CRASH_RETRY (a crash's retry) or "operator"; the first two
        count a failed load as a crash, and a request never loads a model lessor gave up on. A load
        of the model already under way with the same overrides and cause is joined: its outcome is this
        one's (another cause is another decision: the policy weighs them apart; that caller gets ModelBusy)."""
        writer = self._writer()
        record = writer.resolve(name)
        if record.state == ModelState.READY:
            return record
        if cause == "operator":
            self._crashes.forget(record.spec.name)
        underway = self._underway.get(record.spec.name)
        if underway is not None and dict(underway.overrides) == dict(overrides or {}) and underway.cause == cause:
            underway.joined += 1
            await asyncio.wait([underway.outcome])  # shielded: a joiner's cancellation is its own
            if underway.outcome.cancelled():  # whoever ran it was cancelled: this caller still wants it
                return await self.try_load(name, overrides, cause)
            return underway.outcome.result()
        if cause != "operator" and (given_up := self._crashes.given_up(record.spec.name)) \
                and record.state == ModelState.FAILED:
            raise ModelFailed(record.spec.name, given_up)
        if record.state is ModelState.ADOPTING:
            raise ModelAdopting(record.spec.name)
        writer.check_idle(record)
        writer.check_not_held(record)
        spec = with_overrides(record.spec, overrides or {})
        adapter = self._engines.get(spec.engine.engine_kind())
        if adapter is None:
            raise EngineUnavailable(spec.name, spec.engine.engine_kind(), "no adapter for this engine in this build")
        underway = self._underway[spec.name] = Underway(dict(overrides or {}), cause)
        try:
            outcome = await self._run(record, spec, adapter, cause)
        except BaseException as exc:
            underway.end(exc)
            raise
        underway.end(outcome)
        return outcome

    async def _run(self, record: ModelRecord, spec: ModelSpec, adapter: EngineAdapter,
                   cause: str) -> ModelRecord | MustWait:
        writer = self._writer()
        started_s = self._clock()
        timeline = LoadTimeline()
        timeline.mark("requested")
        try:
            async with self.device_locks.held(gpu_id(i) for i in spec.placement.devices):
                loaded = await self._attempts(record, spec, adapter, timeline, cause)
                if isinstance(loaded, MustWait):  # nothing was granted: it waits (or stays unloaded), and says why
                    self._wait(record, loaded, cause)
                    return loaded
        except (NotEnoughMemory, LedgerUnavailable) as exc:  # nothing is held: still unloaded, not failed
            writer.fail(record, ModelState.UNLOADED, str(exc))
            raise
        except asyncio.CancelledError:  # the attempt rolled itself back
            writer.fail(record, ModelState.UNLOADED, "load cancelled")
            raise
        except Exception as exc:
            if cause != "operator" and isinstance(exc, LoadFailed):  # the operator saw it; nobody else did
                writer.crashed(record, str(exc), retry=cause == CRASH_RETRY)  # its one line says the failure
            else:
                log.warning("%s: load failed: %s", spec.name, exc, extra={"model": spec.name, "step": "failed"})
                writer.fail(record, ModelState.FAILED, str(exc))
            raise
        finally:
            del self._underway[spec.name]  # before the watchers hear of its end: a reload waits for it
            writer.transitioned()  # an admission may end with no state change (a wait weighed again)
        record.handle, record.plan, record.attempt = loaded.handle, loaded.plan, loaded.attempt
        record.error, record.ready_at_s = "", self._clock()
        writer.set_state(record, ModelState.READY)
        timeline.mark("done")
        record.last_load = timeline
        took_s = record.ready_at_s - started_s
        shares = timeline.to_dict()["totals"]
        log.info("%s: ready in %.1f s (lessor %.0f ms, engine %.1f s, measuring %.0f ms, noticing readiness %.0f ms): "
                 "kv %d tokens; holds %s", spec.name, took_s, shares["lessor"] * 1e3, shares["engine"],
                 shares["measure"] * 1e3, shares["notice"] * 1e3,
                 loaded.plan.kv_tokens, bytes_text(writer.leased(spec.name)),
                 extra={"model": spec.name, "step": "ready", "seconds": round(took_s, 3), "pid": loaded.handle.pid,
                        "kv_tokens": loaded.plan.kv_tokens, "lessor_s": shares["lessor"]})
        returncode = loaded.handle.process.returncode
        if returncode is not None:  # it ended after its last health check, and its exit report found it loading
            self._crashes.spawn(writer.engine_exited(record, record.generation, returncode))
        return record

    async def _attempts(self, record: ModelRecord, spec: ModelSpec, adapter: EngineAdapter,
                        timeline: LoadTimeline, cause: str) -> Loaded | MustWait:
        """Admit and load; an attempt that ran out of memory is admitted and tried again, planned
        from what it measured, until `planner.oom_retries` are spent. Whatever stops a retry (no
        room, a busy model, a rule), its answer carries the earlier attempts' reasons."""
        writer = self._writer()
        failures: list[str] = []
        kind = "oom"
        await self.fingerprinting.refresh(spec)
        key = self.fingerprinting.key(spec)  # the same for every attempt: its spec, devices and version
        for number in range(1, self._config.current.planner.oom_retries + 2):
            measured = self.fingerprinting.measured(key)
            attempt = None
            try:
                admission = await self._admit(record, spec, measured, cause)
                if isinstance(admission, MustWait):
                    return admission.after(attempts_text(failures)) if failures else admission
                if record.state is not ModelState.LOADING:
                    record.waiting = None
                    writer.set_state(record, ModelState.LOADING)
                timeline.mark("admitted")
                attempt = LoadAttempt(spec, adapter, self._ledger, self.meter, self._timeouts, self._launcher,
                                      writer.on_exit(record), measured, nvml=not self._simulated, timeline=timeline,
                                      planned=admission.plan if admission.admitted else None)
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

    async def _admit(self, record: ModelRecord, spec: ModelSpec, measured: Measured | None,
                     cause: str) -> Admission | MustWait:
        """Step 2: the policy decides over a snapshot; evictions happen here and only here. A
        waiting model weighed again to the same wait says nothing new: no event, a DEBUG line."""
        writer = self._writer()
        snapshot = writer.policy_snapshot()
        admission = decide(spec, snapshot, measured, writer.policy, cause)
        request, decision = admission.request, admission.decision
        # What fits now is not too large; anything else is checked before the policy's answer is
        # acted on: no eviction or wait may be made for a model that can never fit.
        if not (admission.admitted and admission.plan is not None and admission.plan.fits):
            too_large = never_fits(spec, snapshot.devices, measured)
            if too_large is not None:
                raise too_large
        again = (isinstance(decision, Queue) and record.waiting is not None
                 and record.waiting.blockers == tuple(decision.blockers))
        log_admission(request, decision, self._config.current.policy.name, again)
        if not again:
            self._publish(AdmissionDecided(spec.name, AdmissionResult(type(decision).__name__.lower()),
                                           getattr(decision, "reason", ""), getattr(decision, "victims", ())))
        if isinstance(decision, Evict):
            no_room = await writer.make_room(decision, f"shrunk for '{spec.name}'", f"evicted for '{spec.name}'")
            if no_room is not None:
                return must_wait(request, snapshot, no_room.reason, no_room.blockers)
        elif isinstance(decision, Queue):
            return must_wait(request, snapshot, decision.reason, decision.blockers, decision.recheck_s)
        elif isinstance(decision, Rejected):
            raise refused(request, snapshot, decision, self._config.current.policy.name)
        elif not isinstance(decision, Admit):
            raise AssertionError(f"policy returned {decision!r}")
        return admission

    def _wait(self, record: ModelRecord, waits: MustWait, cause: str) -> None:
        """A request's load must wait: WAITING, with why (never an error); an operator's or a crash retry's is refused."""
        writer = self._writer()
        if cause != "request":
            if record.state is not ModelState.WAITING:
                writer.fail(record, ModelState.UNLOADED, waits.error.message())
            return
        record.error, since_s = "", record.waiting.since_s if record.waiting else self._clock()
        record.waiting = Waiting(waits.reason, waits.blockers, waits.recheck_s, since_s)
        writer.set_state(record, ModelState.WAITING, waits.reason)
