"""The supervisor: owns each model's lifecycle and runs the load protocol.

1. plan from today's budgets; 2. admit through the policy (evictions happen here and only
here); 3. grant weights + load_peak and start the engine; 4. release load_peak, re-plan the KV
cache from what is really left, grant it; 5. verify, then ready. Loads that share a device are
serialized so two load peaks never overlap. Any failure releases every lease of the attempt.
One-phase engines (their KV size is a start flag) get every lease at step 3 and release the load
peak once ready. An engine that exits on its own has its leases released the moment its process
is reaped; the model's restart policy decides what comes next.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

from ..engines.base import EngineAdapter, EngineHandle, GpuTarget, KvGrant, Launch
from ..engines.process import EngineProcess, describe_exit, free_port
from ..policies import Admit, AdmissionRequest, Decision, Evict, ModelView, Policy, Queue, Rejected, Snapshot, shortfall
from .config import LessorConfig, ModelSpec
from .devices import Probe, SimProbe, gpu_id
from .errors import EngineUnavailable, LedgerUnavailable, LoadFailed, ModelBusy, ModelsBusy, NotEnoughMemory, PlanRejected, UnknownModel
from .events import AdmissionDecided, EngineExited, Event, ModelStateChanged
from .units import MiB, format_bytes
from .ledger import EngineRecord, Granted, LeaseKind, Ledger
from .planner import Plan, plan, plan_kv, with_overrides

log = logging.getLogger("lessor.supervisor")


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class ModelRecord:
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    last_used_s: float = 0.0
    in_flight: int = 0
    error: str = ""
    plan: Plan | None = None
    handle: EngineHandle | None = field(default=None, repr=False)
    attempt: str = ""  # the load attempt whose leases the running engine holds
    overrun: dict[str, Any] | None = None  # set by the reconciler while the engine uses more than its leases
    generation: int = 0  # engine starts so far: an exit report from an older start is ignored
    restart_times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Timeouts:
    weights_s: float = 600.0
    ready_s: float = 120.0
    stop_grace_s: float = 15.0


RESTART_WINDOW_S = 600.0  # crashes further apart than this do not count toward restart.max_restarts


def verify_tolerance(leased_bytes: int) -> int:
    """How far above its leases an engine may measure (step 5, and the reconciler after): allocator
    rounding and the CUDA context's growth, not a second KV cache."""
    return max(128 * MiB, leased_bytes // 20)


def over_leases(used_bytes: int, leased_bytes: int) -> bool:
    return used_bytes > leased_bytes + verify_tolerance(leased_bytes)


class Supervisor:
    def __init__(self, config: LessorConfig, ledger: Ledger, policy: Policy, engines: Mapping[str, EngineAdapter],
                 publish: Callable[[Event], None], clock: Callable[[], float] = time.monotonic,
                 timeouts: Timeouts = Timeouts(), probe: Probe | None = None) -> None:
        self._ledger, self._policy, self._engines = ledger, policy, engines
        self._probe = probe
        self._simulated = probe is None or isinstance(probe, SimProbe)
        self._state_dir = Path(config.state_dir).absolute()
        self._tasks: set[asyncio.Task] = set()
        self._publish, self._clock, self._timeouts = publish, clock, timeouts
        self._models = {spec.name: ModelRecord(spec) for spec in config.models}
        self._config = config
        self._device_locks: dict[str, asyncio.Lock] = {}

    # -- reads -------------------------------------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of last-use times (the router touches them, policies compare them)."""
        return self._clock

    @property
    def policy(self) -> Policy:
        """The admission policy in force (a reload may change it)."""
        return self._policy

    def resolve(self, name: str) -> ModelRecord:
        spec = self._config.model(name)
        if spec is None:
            raise UnknownModel(name, [n for s in self._config.models for n in (s.name, *s.aliases)])
        return self._models[spec.name]

    def records(self) -> list[ModelRecord]:
        return list(self._models.values())

    def policy_snapshot(self) -> Snapshot:
        ledger = self._ledger.snapshot()
        held: dict[str, dict[str, int]] = {}
        for lease in ledger.leases:
            per_model = held.setdefault(lease.model, {})
            per_model[lease.device] = per_model.get(lease.device, 0) + lease.bytes
        models = {r.spec.name: ModelView(r.spec.name, r.state.value, r.spec.priority, r.spec.pinned, r.in_flight,
                                         r.last_used_s, held.get(r.spec.name, {})) for r in self._models.values()}
        return Snapshot(ledger.budgets, models, self._clock())

    def dry_run(self, name: str, overrides: Mapping[str, Any] | None = None) -> Plan:
        """What a load would do now: the plan, with the evictions the policy would make."""
        record = self.resolve(name)
        try:
            spec = with_overrides(record.spec, overrides or {})
        except PlanRejected as exc:  # a dry run answers "no, because", it does not fail
            return Plan(record.spec.name, False, 0, dict(overrides or {}), (), (), tuple(exc.reasons))
        snapshot = self.policy_snapshot()
        first, decision = self._decide(spec, snapshot)
        if isinstance(decision, Evict):
            freed = _freed_by(snapshot, decision.victims)
            result = plan(spec, snapshot.devices, freed)
            return Plan(**{**result.__dict__, "evictions": decision.victims})
        if isinstance(decision, (Rejected, Queue)) and first.fits:
            return Plan(**{**first.__dict__, "fits": False, "reasons": (decision.reason,)})
        return first

    def _decide(self, spec: ModelSpec, snapshot: Snapshot) -> tuple[Plan, Decision]:
        """The plan against today's budgets, and the policy's answer for its worst moment."""
        first = plan(spec, snapshot.devices)
        return first, self._policy(AdmissionRequest(spec.name, first.peak_need(), spec.priority), snapshot)

    # -- lifecycle ---------------------------------------------------------------------------

    def _set_state(self, record: ModelRecord, state: ModelState, reason: str = "") -> None:
        previous, record.state = record.state, state
        if previous != state:
            self._publish(ModelStateChanged(record.spec.name, state.value, previous.value, reason))

    async def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> ModelRecord:
        record = self.resolve(name)
        if record.state == ModelState.READY:
            return record
        if record.state in (ModelState.LOADING, ModelState.UNLOADING):
            raise ModelBusy(record.spec.name, record.state.value)
        spec = with_overrides(record.spec, overrides or {})
        adapter = self._engines.get(spec.engine.kind)
        if adapter is None:
            raise EngineUnavailable(spec.name, spec.engine.kind, "no adapter for this engine in this build")
        self._set_state(record, ModelState.LOADING)
        devices = sorted(gpu_id(i) for i in spec.placement.devices)
        try:
            async with AsyncExitStack() as stack:
                for device in devices:  # sorted: two loads never wait on each other's locks in a cycle
                    await stack.enter_async_context(self._device_locks.setdefault(device, asyncio.Lock()))
                await self._load_locked(record, spec, adapter)
        except (NotEnoughMemory, LedgerUnavailable) as exc:  # nothing is held: still unloaded, not failed
            record.error = str(exc)
            self._set_state(record, ModelState.UNLOADED, record.error)
            raise
        except BaseException as exc:
            record.error = str(exc)
            log.warning("load of %s failed: %s", spec.name, record.error)
            self._set_state(record, ModelState.FAILED, record.error)
            raise
        return record

    async def _load_locked(self, record: ModelRecord, spec: ModelSpec, adapter: EngineAdapter) -> None:
        await self._admit(spec)
        attempt = str(uuid.uuid4())
        step = "grant weights"
        try:
            first = plan(spec, self._ledger.budgets())
            if first.one_phase and not first.fits:  # its KV size is fixed now, so it must fit now
                raise PlanRejected(spec.name, list(first.reasons))
            # A one-phase engine allocates its KV cache while loading: every lease at once.
            granted = await self._ledger.grant(spec.name, first.all_leases() if first.one_phase else first.load_leases,
                                               attempt)
            if not isinstance(granted, Granted):
                raise LoadFailed(spec.name, step, granted.reason)
            step = "start engine"
            record.plan, record.attempt = first, attempt
            launch = self._launch(record, spec, first.params, first.kv_tokens, spec.engine.port or free_port(), attempt)
            record.handle = await adapter.start(launch)
            await self._record_engine(record, launch.port, "loading")
            step = "wait for weights"
            await record.handle.wait_weights_loaded(self._timeouts.weights_s)
            if not first.one_phase:
                await self._ledger.release_model(spec.name, "weights loaded", kinds=[LeaseKind.LOAD_PEAK])
                step = "size kv"
                record.plan = await self._grant_kv(spec, attempt, record.handle)
            step = "wait for ready"
            await record.handle.wait_ready(self._timeouts.ready_s)
            if first.one_phase:
                await self._ledger.release_model(spec.name, "engine ready", kinds=[LeaseKind.LOAD_PEAK])
            step = "verify"
            await self._verify(spec, record.handle)
            await self._record_engine(record, launch.port, "ready")
        except BaseException as exc:
            await self._roll_back(record, attempt, f"{step}: {exc}")
            if isinstance(exc, (LoadFailed, LedgerUnavailable)):
                raise
            raise LoadFailed(spec.name, step, str(exc)) from exc
        record.error = ""
        record.last_used_s = self._clock()
        self._set_state(record, ModelState.READY)

    def _launch(self, record: ModelRecord, spec: ModelSpec, params: Mapping[str, Any], kv_tokens: int, port: int,
               attempt: str) -> Launch:
        readings = self._ledger.snapshot().readings
        devices = [gpu_id(i) for i in spec.placement.devices]
        record.generation += 1
        generation = record.generation
        return Launch(spec, params, kv_tokens,
                     tuple(GpuTarget(d, readings[d].index, readings[d].uuid, readings[d].total_bytes) for d in devices),
                     self.leased(spec.name), self._simulated, port,
                     self.log_path(spec.name), self._state_dir / "engines" / spec.name,
                     on_exit=lambda returncode: self._spawn(self._engine_exited(record, generation, returncode)),
                     marker={"LESSOR_STATE_DIR": str(self._state_dir), "LESSOR_ATTEMPT": attempt},
                     withhold_env=tuple(k.key_env for k in self._config.router.api_keys if k.key_env))

    async def _record_engine(self, record: ModelRecord, port: int, phase: str) -> None:
        handle, plan_ = record.handle, record.plan
        assert handle is not None and plan_ is not None
        await self._ledger.record_engine(EngineRecord(record.spec.name, record.attempt, handle.pid, handle.identity,
                                                      port, phase, dict(plan_.params), plan_.kv_tokens,
                                                      handle.started_at))

    def log_path(self, model: str) -> Path:
        return self._state_dir / "logs" / f"{model}.log"

    def leased(self, model: str) -> dict[str, int]:
        """Bytes the model holds, per device."""
        out: dict[str, int] = {}
        for lease in self._ledger.leases():
            if lease.model == model:
                out[lease.device] = out.get(lease.device, 0) + lease.bytes
        return out

    async def _verify(self, spec: ModelSpec, handle: EngineHandle) -> None:
        """Step 5: what the engine uses must be within its leases plus a tolerance."""
        usage = self.usage(handle, await handle.measure())
        leased = self.leased(spec.name)
        over = []
        for device in (gpu_id(i) for i in spec.placement.devices):
            used, held = usage.get(device, 0), leased.get(device, 0)
            if over_leases(used, held):
                over.append(f"{device}: the engine uses {format_bytes(used)}, its leases are {format_bytes(held)} "
                            f"(+{format_bytes(verify_tolerance(held))} tolerance); raise memory.weights / "
                            "memory.activation to what it really takes")
        if over:
            raise LoadFailed(spec.name, "verify", "; ".join(over))

    def usage(self, handle: EngineHandle, reported: Mapping[str, int]) -> dict[str, int]:
        """Bytes an engine uses per device: its own report or the probe's figure for its process
        group, the larger. On simulated GPUs its report stands in for NVML's (the host pool is
        measured either way)."""
        readings = self._ledger.snapshot().readings
        if isinstance(self._probe, SimProbe):
            for device, used in reported.items():
                if device in readings and readings[device].is_gpu:
                    self._probe.set_process_usage(device, handle.pid, used)
            readings = self._ledger.snapshot().readings
        usage = {device: max(reported.get(device, 0), reading.usage_of(handle.pid))
                 for device, reading in readings.items()}
        return {device: used for device, used in usage.items() if used}

    def _forget_usage(self, pid: int | None) -> None:
        if pid and isinstance(self._probe, SimProbe):
            for device, reading in self._ledger.snapshot().readings.items():
                if reading.is_gpu:
                    self._probe.set_process_usage(device, pid, 0)

    async def _admit(self, spec: ModelSpec) -> None:
        snapshot = self.policy_snapshot()
        first, decision = self._decide(spec, snapshot)
        request = AdmissionRequest(spec.name, first.peak_need(), spec.priority)
        self._publish(AdmissionDecided(spec.name, type(decision).__name__.lower(),
                                       getattr(decision, "reason", ""), getattr(decision, "victims", ())))
        if isinstance(decision, Evict):
            for victim in decision.victims:
                if self._models[victim].in_flight:  # a request started on it while an earlier victim unloaded
                    raise self._busy(request, snapshot, f"'{victim}' took a request while room was being made")
                await self.unload(victim, reason=f"evicted for '{spec.name}'")
        elif isinstance(decision, Queue):
            raise self._busy(request, snapshot, decision.reason)
        elif isinstance(decision, Rejected):
            raise NotEnoughMemory(spec.name, *_worst_shortfall(snapshot, decision.short_bytes), decision.reason)
        elif not isinstance(decision, Admit):
            raise AssertionError(f"policy returned {decision!r}")

    def _busy(self, request: AdmissionRequest, snapshot: Snapshot, reason: str) -> ModelsBusy:
        """The models that would be evicted were they idle: the router drains them (their new
        requests wait) so this load gets its turn."""
        decision = self._policy(request, snapshot.all_idle())
        blockers = decision.victims if isinstance(decision, Evict) else ()
        return ModelsBusy(request.model, *_worst_shortfall(snapshot, shortfall(request, snapshot)),
                          f"{reason}; it loads once {', '.join(blockers) or 'they'} finish their requests", blockers=blockers)

    async def _grant_kv(self, spec: ModelSpec, attempt: str, handle: EngineHandle) -> Plan:
        # Size the KV cache from what is left now that the weights are in, never the pre-load guess.
        sized = plan_kv(spec, self._ledger.budgets())
        if not sized.fits:
            raise PlanRejected(spec.name, list(sized.reasons))
        granted = await self._ledger.grant(spec.name, sized.steady_leases, attempt, handle.pid, handle.started_at)
        if not isinstance(granted, Granted):
            raise PlanRejected(spec.name, [granted.reason])
        kv_bytes = max((w.bytes for w in sized.steady_leases if w.kind == LeaseKind.KV), default=0)
        await handle.allocate_kv(KvGrant(sized.kv_tokens, kv_bytes, sized.params, self.leased(spec.name)))
        return sized

    async def _roll_back(self, record: ModelRecord, attempt: str, reason: str) -> None:
        handle, record.handle = record.handle, None
        record.plan = None
        if handle is not None:
            await asyncio.shield(handle.stop(self._timeouts.stop_grace_s))
            self._forget_usage(handle.pid)
        await asyncio.shield(self._ledger.forget_engine(record.spec.name))
        await asyncio.shield(self._ledger.release_attempt(attempt, f"load failed: {reason}"))

    # -- adoption after a restart -------------------------------------------------------------

    async def adopt(self, engine: EngineRecord) -> str:
        """Take over an engine that a previous lessord started. Adopted only if it is that very
        process (pid and identity), its load had finished, this config still has its model and the
        engine answers; otherwise a process that still runs is stopped. Says what happened; the
        reconciler releases the leases of everything not adopted."""
        record = self._models.get(engine.model)
        adapter = self._engines.get(record.spec.engine.kind) if record else None
        launch = None
        if record is not None and record.state == ModelState.UNLOADED:
            try:
                launch = self._launch(record, record.spec, engine.params, engine.kv_tokens, engine.port, engine.attempt)
            except KeyError:  # its device is no longer in the config
                launch = None
        process = EngineProcess.adopt(engine.pid, engine.identity, self.log_path(engine.model),
                                      launch.on_exit if launch else None, engine.started_at)
        if process is None:
            return "its engine is gone"
        why = ("its load had not finished" if engine.phase != "ready" else
               "the model is no longer configured" if record is None else
               "its device is no longer configured" if launch is None else
               f"no adapter for engine '{record.spec.engine.kind}'" if adapter is None else "")
        handle = None
        if not why:
            handle = adapter.reattach(process, launch)
            try:
                await handle.wait_ready(min(self._timeouts.ready_s, 30.0))
            except (TimeoutError, RuntimeError, OSError) as exc:
                why = f"it does not answer: {exc}"
        if why:
            await process.stop(self._timeouts.stop_grace_s)
            return f"stopped its engine (pid {engine.pid}): {why}"
        record.handle, record.attempt = handle, engine.attempt
        record.plan = Plan(engine.model, True, engine.kv_tokens, dict(engine.params), (), ())
        record.last_used_s = self._clock()
        self._set_state(record, ModelState.READY, f"adopted engine pid {engine.pid}")
        return f"adopted its engine (pid {engine.pid})"

    # -- crashes and restarts ----------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _engine_exited(self, record: ModelRecord, generation: int, returncode: int) -> None:
        """The engine ended on its own. While loading, the load's own wait sees it and rolls back;
        once ready, its leases are released here, at once, and the restart policy decides."""
        if record.generation != generation or record.state != ModelState.READY or record.handle is None:
            return
        handle, record.handle = record.handle, None
        await handle.stop(0)  # reap whatever the leader left in its process group
        self._forget_usage(handle.pid)
        reason = f"engine exited with {describe_exit(returncode)}"
        await self._ledger.forget_engine(record.spec.name)
        await self._ledger.release_model(record.spec.name, reason)
        record.plan, record.error = None, reason
        restart_in = self._restart_delay(record)
        self._publish(EngineExited(record.spec.name, handle.pid, returncode, reason, restart_in))
        self._set_state(record, ModelState.FAILED, reason)
        if restart_in is not None:
            self._spawn(self._restart(record, restart_in))

    def _restart_delay(self, record: ModelRecord) -> float | None:
        policy = record.spec.restart
        now = self._clock()
        record.restart_times = [t for t in record.restart_times if now - t < RESTART_WINDOW_S]
        if policy.policy == "never" or len(record.restart_times) >= policy.max_restarts:
            return None
        return min(policy.backoff * 2 ** len(record.restart_times), 300.0)

    async def _restart(self, record: ModelRecord, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if record.state != ModelState.FAILED:  # someone loaded or unloaded it meanwhile
            return
        record.restart_times.append(self._clock())
        try:
            await self.load(record.spec.name)
        except Exception as exc:
            log.error("restart of %s failed: %s", record.spec.name, exc)
            delay = self._restart_delay(record)
            if delay is not None:
                self._spawn(self._restart(record, delay))

    async def close(self) -> None:
        """Cancel pending restarts (lessord is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def apply_config(self, config: LessorConfig, policy: Policy) -> ConfigChange:
        """Add, remove and retune models. Running models keep running: a changed spec applies at their
        next load; a removed model is unloaded. Refused (nothing changed) while an affected model is
        mid-transition."""
        new = {spec.name: spec for spec in config.models}
        removed = tuple(n for n in self._models if n not in new)
        changed = tuple(n for n in self._models if n in new and new[n] != self._models[n].spec)
        busy = [n for n in removed + changed if self._models[n].state in (ModelState.LOADING, ModelState.UNLOADING)]
        if busy:
            raise ModelBusy(busy[0], self._models[busy[0]].state.value)
        for name in removed:
            await self.unload(name, reason="removed from the config")
            del self._models[name]
        for name in changed:
            self._models[name].spec = new[name]
        added = tuple(n for n in new if n not in self._models)
        for name in added:
            self._models[name] = ModelRecord(new[name])
        self._config, self._policy = config, policy
        return ConfigChange(added, removed, changed)

    async def unload(self, name: str, reason: str = "unload requested") -> ModelRecord:
        record = self.resolve(name)
        if record.state == ModelState.UNLOADED:
            return record
        if record.state in (ModelState.LOADING, ModelState.UNLOADING):
            raise ModelBusy(record.spec.name, record.state.value)
        self._set_state(record, ModelState.UNLOADING, reason)
        handle, record.handle = record.handle, None
        if handle is not None:
            await handle.stop(self._timeouts.stop_grace_s)
            self._forget_usage(handle.pid)
        await self._ledger.forget_engine(record.spec.name)
        await self._ledger.release_model(record.spec.name, reason)
        record.plan, record.overrun = None, None
        self._set_state(record, ModelState.UNLOADED, reason)
        return record


@dataclass(frozen=True)
class ConfigChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


def _worst_shortfall(snapshot: Snapshot, short_bytes: Mapping[str, int]) -> tuple[str, int, int]:
    """(device, bytes wanted there, bytes free there) for the device the request is shortest on."""
    device, short = max(short_bytes.items() or [("devices", 0)], key=lambda kv: kv[1])
    free = snapshot.devices[device].free_bytes if device in snapshot.devices else 0
    return device, free + short, free


def _freed_by(snapshot: Snapshot, victims: tuple[str, ...]) -> dict[str, int]:
    freed: dict[str, int] = {}
    for name in victims:
        for device, b in snapshot.models[name].held_bytes.items():
            freed[device] = freed.get(device, 0) + b
    return freed
