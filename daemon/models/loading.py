"""Steps 3 to 5 of the load protocol, for one attempt, once the policy has admitted it.

3. with the admission's plan (or, where evictions changed the memory since, a plan made now),
   grant weights + load_peak (a one-phase engine: every lease at once) and start the engine;
4. once the weights are in, release load_peak, plan the KV cache from what is free *now* and
   grant it (two-phase engines only: the others sized theirs from flags at start);
5. verify that what the engine uses is within its leases plus a tolerance.

From spawn to ready a `LoadSampler` measures the engine on every device; its figures are the
attempt's `measurements`, which the supervisor remembers as a fingerprint when the load finished or ran out of memory.
Any failure, cancellation included, stops the engine and releases every lease of the attempt in
one shielded step. A grant the ledger refuses is a shortfall (NotEnoughMemory, with the numbers);
an engine that died of out-of-memory (its engine's words in its log, or SIGKILL from the kernel)
or measured above its leases is OutOfMemory; everything else that breaks is LoadFailed naming the step.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...engines.base import EngineAdapter, EngineHandle, KvGrant
from ...engines.process import free_port
from ...policies import DeviceBudget, Rejected
from ..config.model_spec import ModelSpec
from ..devices.probes import gpu_id
from ..devices.usage import UsageMeter
from ..leases import EnginePhase, EngineRecord, Granted, LeaseKind, LeaseWant, held_by
from ..ledger.fingerprints import DeviceMeasurement, Outcome
from ..ledger.ledger import Ledger
from ..ledger.ledger_errors import LedgerUnavailable
from ..planning.admission import worst_shortfall
from ..planning.planner import Measured, Plan, plan, plan_kv
from ..planning.profile import over_leases, verify_tolerance
from ..planning.rejections import NotEnoughMemory, PlanRejected
from ..units import format_bytes
from .launching import Launcher, OnExit
from .load_errors import LoadFailed, OutOfMemory
from .sampling import LoadSampler
from .timeline import LoadTimeline
from .timeouts import Timeouts

# The typed outcomes a failed step already states well: passed on as they are.
_AS_RAISED = (LoadFailed, LedgerUnavailable, NotEnoughMemory)
SIGKILL_EXIT = -9  # lessor sends SIGKILL only after stop_grace: unasked, most likely the kernel's OOM killer

log = logging.getLogger("lessor.supervisor")


@dataclass(frozen=True)
class Loaded:
    handle: EngineHandle
    plan: Plan
    attempt: str


class LoadAttempt:
    def __init__(self, spec: ModelSpec, adapter: EngineAdapter, ledger: Ledger, meter: UsageMeter,
                 timeouts: Timeouts, launcher: Launcher, on_exit: OnExit, measured: Measured | None = None,
                 nvml: bool = False, timeline: LoadTimeline | None = None, planned: Plan | None = None) -> None:
        """`planned`: the admission's plan, while nothing changed the memory since (None: plan now)."""
        self.spec, self.adapter, self.ledger, self.meter = spec, adapter, ledger, meter
        self.timeouts, self.launcher, self.on_exit, self.measured, self.nvml = timeouts, launcher, on_exit, measured, nvml
        self.planned = planned
        self.timeline = timeline or LoadTimeline()
        self.attempt = str(uuid.uuid4())
        self.handle: EngineHandle | None = None
        self.plan: Plan | None = None
        self.sampler: LoadSampler | None = None
        self.measurements: tuple[DeviceMeasurement, ...] = ()  # what the samples said, once it ended
        self.outcome = ""  # a fingerprint's outcome (ready, overrun, oom), or "" when memory was not the matter
        self._peak_leased: dict[str, int] = {}
        self.port = 0
        self.step = "plan"

    async def run(self) -> Loaded:
        try:
            await self._steps()
        except asyncio.CancelledError:
            await asyncio.shield(self._end(f"{self.step}: cancelled", None, finished=False))
            raise
        except Exception as exc:
            failure = await asyncio.shield(self._end(f"{self.step}: {exc}", exc, finished=False))
            assert failure is not None  # a failure always says what failed
            raise failure from exc
        try:
            await self._end("", None, finished=True)
        except BaseException:  # cancelled while it stopped sampling: the engine must not outlive the load
            await asyncio.shield(self.roll_back(f"{self.step}: cancelled"))
            raise
        assert self.handle is not None and self.plan is not None
        return Loaded(self.handle, self.plan, self.attempt)

    async def _end(self, reason: str, exc: Exception | None, finished: bool) -> Exception | None:
        """Stop sampling and keep what it measured; on a failure roll back, then say what failed
        (OutOfMemory where memory was the cause). The roll-back runs whatever the rest raises."""
        oom = None
        try:
            oom = self._out_of_memory(exc) if exc is not None else None
            await self._keep_measurements(finished, oom)
            at_failure = self._devices_now() if oom is not None else ""
        finally:
            if not finished:
                await self.roll_back(reason)
        if exc is None:
            return None
        if oom is not None:
            return OutOfMemory(self.spec.name, self.step, f"{_why(exc)}{at_failure}", kind=oom)
        return exc if isinstance(exc, _AS_RAISED) else LoadFailed(self.spec.name, self.step, str(exc))

    async def _keep_measurements(self, finished: bool, oom: str | None) -> None:
        """What the samples said, for the fingerprint: of a finished load, or of one memory ended
        (a load cancelled or failed for another reason measured nothing worth remembering)."""
        if self.sampler is None:
            return
        await self.sampler.stop()
        if finished or oom is not None:
            self.outcome = oom if oom is not None else Outcome.READY
            self.measurements = self.sampler.measurements(self.plan.kv_tokens if self.plan else 0,
                                                          self._peak_leased, self.spec.engine.two_phase)

    def _out_of_memory(self, exc: Exception) -> str | None:
        """"overrun", "oom" or None: did this failure come from memory?"""
        if isinstance(exc, OutOfMemory):
            return exc.kind
        if isinstance(exc, (NotEnoughMemory, LedgerUnavailable, PlanRejected)) or self.handle is None:
            return None
        process = getattr(self.handle, "process", None)
        if getattr(process, "returncode", None) == SIGKILL_EXIT:
            return Outcome.OOM
        text = " ".join([str(exc), *(process.tail(80) if process is not None and hasattr(process, "tail") else [])])
        return Outcome.OOM if any(marker in text for marker in self.spec.engine.oom_markers) else None

    async def _steps(self) -> None:
        spec = self.spec
        self.step = "grant weights"
        first = self.planned or plan(spec, self.ledger.budgets(), measured=self.measured)
        if first.one_phase and not first.fits:  # its KV size is fixed now, so it must fit now
            raise short_now(spec.name, first, self.ledger.budgets()) or PlanRejected(spec.name, list(first.reasons))
        # A one-phase engine allocates its KV cache while loading: every lease at once.
        _log_planned(spec.name, first)
        await self._grant(first.all_leases() if first.one_phase else first.load_leases)
        self.timeline.mark("granted")
        self.plan, self.port = first, spec.engine.port or free_port()
        self.step = "start engine"
        launch = self.launcher.launch(spec, first.params, first.kv_tokens, self.port, self.attempt, self.on_exit)
        self.handle = await self.adapter.start(launch)
        self.timeline.mark("spawned")
        log.info("%s: loading: %s engine, pid %d, port %d, log %s", spec.name, spec.engine.engine_kind(), self.handle.pid,
                 self.port, launch.log_path,
                 extra={"model": spec.name, "step": "loading", "engine": spec.engine.engine_kind(), "pid": self.handle.pid})
        self._note_leased()
        self.sampler = LoadSampler(self.meter, self.handle, self._devices(), self.nvml)
        self.sampler.start()
        await self.record_engine(EnginePhase.LOADING)
        self.step = "wait for weights"
        await self.handle.wait_weights_loaded(self.timeouts.weights_s)
        self.timeline.mark("weights_noticed")
        await self.sampler.mark("weights")
        self.timeline.mark("weights_measured")
        if not first.one_phase:
            await self.ledger.release_model(spec.name, "weights loaded", kinds=[LeaseKind.LOAD_PEAK])
            self.step = "size kv"
            self.plan = await self._grant_kv(self.handle)
            await self.sampler.mark("kv")
            self.timeline.mark("kv_measured")
        self.step = "wait for ready"
        await self.handle.wait_ready(self.timeouts.ready_s)
        self.timeline.mark("ready_noticed")
        steady = await self.sampler.mark("ready")
        if first.one_phase:
            await self.ledger.release_model(spec.name, "engine ready", kinds=[LeaseKind.LOAD_PEAK])
        self.step = "verify"
        self._verify(steady)
        self.timeline.mark("verified")
        await self.record_engine(EnginePhase.READY)
        self.timeline.add_engine(self.handle.engine_times)

    def _devices_now(self) -> str:
        """Each device's usage as the probe reads it at the failure (NVML on GPUs), for its message."""
        readings = self.ledger.snapshot().readings
        shown = [f"{d} {format_bytes(readings[d].used_bytes)} used of {format_bytes(readings[d].total_bytes)}"
                 for d in self._devices() if d in readings]
        return f" (at the failure: {', '.join(shown)})" if shown else ""

    def _devices(self) -> list[str]:
        """The placement's GPUs, and the host pool where the model leases RAM there."""
        devices = [gpu_id(i) for i in self.spec.placement.devices]
        return devices + (["host"] if "host" in self._peak_leased else [])

    def _note_leased(self) -> dict[str, int]:
        """What the model holds now, per device, kept as the most it held (for the measurement)."""
        leased = leased_by(self.ledger, self.spec.name)
        for device, held in leased.items():
            self._peak_leased[device] = max(self._peak_leased.get(device, 0), held)
        return leased

    async def _grant(self, wants, handle: EngineHandle | None = None) -> None:
        granted = await self.ledger.grant(self.spec.name, wants, self.attempt,
                                          handle.pid if handle else None, handle.started_at if handle else None)
        if not isinstance(granted, Granted):
            raise shortfall_error(self.spec.name, granted, self.ledger.budgets())

    async def _grant_kv(self, handle: EngineHandle) -> Plan:
        # Size the KV cache from what is left now that the weights are in, never the pre-load guess.
        sized = plan_kv(self.spec, self.ledger.budgets(), self.measured)
        if not sized.fits:
            raise PlanRejected(self.spec.name, list(sized.reasons))
        await self._grant(sized.steady_leases, handle)
        self.timeline.mark("kv_granted")
        self.plan = sized  # what a failure from here on measured is of this KV cache
        leased = self._note_leased()
        if self.sampler is not None:  # an out-of-memory from here on is the KV cache's or the workspace's
            self.sampler.kv_asked = True
        kv_bytes = max((w.bytes for w in sized.steady_leases if w.kind == LeaseKind.KV), default=0)
        await handle.allocate_kv(KvGrant(sized.kv_tokens, kv_bytes, sized.params, leased))
        self.timeline.mark("kv_allocated")
        return sized

    def _verify(self, usage: Mapping[str, int]) -> None:
        """Step 5: what the engine uses (sampled at ready) must be within its leases plus a tolerance."""
        leased = leased_by(self.ledger, self.spec.name)
        over = []
        for device in (gpu_id(i) for i in self.spec.placement.devices):
            used, held = usage.get(device, 0), leased.get(device, 0)
            if over_leases(used, held):
                over.append(f"{device}: the engine uses {format_bytes(used)}, its leases are {format_bytes(held)} "
                            f"(+{format_bytes(verify_tolerance(held))} tolerance); raise memory.weights / "
                            "memory.activation to what it really takes")
        if over:
            raise OutOfMemory(self.spec.name, "verify", "; ".join(over), kind=Outcome.OVERRUN)

    async def record_engine(self, phase: EnginePhase) -> None:
        handle, plan_ = self.handle, self.plan
        assert handle is not None and plan_ is not None
        await self.ledger.record_engine(EngineRecord(self.spec.name, self.attempt, handle.pid, handle.identity,
                                                     self.port, phase, dict(plan_.params), plan_.kv_tokens,
                                                     handle.started_at))

    async def roll_back(self, reason: str) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            await handle.stop(self.timeouts.stop_grace_s)
            self.meter.forget(handle.pid)
        await self.ledger.forget_engine(self.spec.name)
        await self.ledger.release_attempt(self.attempt, f"load failed: {reason}")


def _log_planned(model: str, planned: Plan) -> None:
    """The flags the engine starts with and the leases asked for (a two-phase engine's KV cache
    is sized again once its weights are in: its ready line says the size it got)."""
    params = " ".join(f"{k}={v}" for k, v in planned.params.items())
    log.info("%s: planned kv_tokens=%d %s; leases %s", model, planned.kv_tokens, params,
             leases_text(planned.all_leases()),
             extra={"model": model, "step": "planned", "kv_tokens": planned.kv_tokens})


def _why(exc: Exception) -> str:
    return exc.reason if isinstance(exc, LoadFailed) else str(exc)


def shortfall_error(model: str, refused: Rejected, budgets: Mapping[str, DeviceBudget]) -> NotEnoughMemory:
    device, wanted, free = worst_shortfall(budgets, refused.short_bytes)
    return NotEnoughMemory(model, device, wanted, free, "the memory went elsewhere between the admission and the grant "
                           "(foreign usage grew, or another model took it); retry")


def short_now(model: str, planned: Plan, budgets: Mapping[str, DeviceBudget]) -> NotEnoughMemory | None:
    """A plan the admission let through that no longer fits the memory free now: it went elsewhere
    since (foreign usage grew while victims stopped, another model took it). A shortfall, which
    leaves the model unloaded and the client a 503 with Retry-After, never a failed load that
    counts as a crash (a growing foreign process made lessor give up on a model)."""
    short = {device: need - budgets[device].free_bytes for device, need in planned.peak_need().items()
             if device in budgets and need > budgets[device].free_bytes}
    if not short:
        return None
    device, wanted, free = worst_shortfall(budgets, short)
    return NotEnoughMemory(model, device, wanted, free, "the memory went elsewhere between the admission and the "
                           "plan (foreign usage grew, or another model took it); retry")


def leases_text(wants: Sequence[LeaseWant]) -> str:
    """"gpu0 weights 4.0 GiB, kv 1.0 GiB; host weights 20.0 GiB": per device, in the plan's order."""
    per_device: dict[str, list[str]] = {}
    for want in wants:
        per_device.setdefault(want.device, []).append(f"{want.kind.value} {format_bytes(want.bytes)}")
    return "; ".join(f"{device} {', '.join(parts)}" for device, parts in per_device.items()) or "none"


def leased_by(ledger: Ledger, model: str) -> dict[str, int]:
    """Bytes the model holds, per device."""
    return held_by(ledger.leases()).get(model, {})
