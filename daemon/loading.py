"""Steps 3 to 5 of the load protocol, for one attempt, once the policy has admitted it.

3. grant weights + load_peak (a one-phase engine: every lease at once) and start the engine;
4. once the weights are in, release load_peak, plan the KV cache from what is free *now* and
   grant it (two-phase engines only: the others sized theirs from flags at start);
5. verify that what the engine uses is within its leases plus a tolerance.

Any failure, cancellation included, stops the engine and releases every lease of the attempt in
one shielded step. A grant the ledger refuses is a shortfall (NotEnoughMemory, with the numbers);
everything else that breaks is LoadFailed naming the step.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..engines.base import EngineAdapter, EngineHandle, KvGrant, Launch
from ..engines.process import free_port
from ..policies import DeviceBudget, Rejected
from .config import ModelSpec
from .devices import gpu_id
from .errors import LedgerUnavailable, LoadFailed, NotEnoughMemory, PlanRejected
from .ledger import EnginePhase, EngineRecord, Granted, LeaseKind, Ledger
from .lifecycle import Timeouts, over_leases, verify_tolerance
from .planner import Plan, plan, plan_kv
from .units import format_bytes
from .usage import UsageMeter

# The typed outcomes a failed step already states well: passed on as they are.
_AS_RAISED = (LoadFailed, LedgerUnavailable, NotEnoughMemory)

LaunchFor = Callable[[Mapping[str, Any], int, int, str], Launch]  # params, kv tokens, port, attempt


@dataclass(frozen=True)
class Loaded:
    handle: EngineHandle
    plan: Plan
    attempt: str


class LoadAttempt:
    def __init__(self, spec: ModelSpec, adapter: EngineAdapter, ledger: Ledger, meter: UsageMeter,
                 timeouts: Timeouts, launch_for: LaunchFor) -> None:
        self.spec, self.adapter, self.ledger, self.meter = spec, adapter, ledger, meter
        self.timeouts, self.launch_for = timeouts, launch_for
        self.attempt = str(uuid.uuid4())
        self.handle: EngineHandle | None = None
        self.plan: Plan | None = None
        self.port = 0
        self.step = "plan"

    async def run(self) -> Loaded:
        try:
            await self._steps()
        except asyncio.CancelledError:
            await asyncio.shield(self.roll_back(f"{self.step}: cancelled"))
            raise
        except Exception as exc:
            await asyncio.shield(self.roll_back(f"{self.step}: {exc}"))
            if isinstance(exc, _AS_RAISED):
                raise
            raise LoadFailed(self.spec.name, self.step, str(exc)) from exc
        assert self.handle is not None and self.plan is not None
        return Loaded(self.handle, self.plan, self.attempt)

    async def _steps(self) -> None:
        spec = self.spec
        self.step = "grant weights"
        first = plan(spec, self.ledger.budgets())
        if first.one_phase and not first.fits:  # its KV size is fixed now, so it must fit now
            raise PlanRejected(spec.name, list(first.reasons))
        # A one-phase engine allocates its KV cache while loading: every lease at once.
        await self._grant(first.all_leases() if first.one_phase else first.load_leases)
        self.plan, self.port = first, spec.engine.port or free_port()
        self.step = "start engine"
        self.handle = await self.adapter.start(self.launch_for(first.params, first.kv_tokens, self.port, self.attempt))
        await self.record_engine(EnginePhase.LOADING)
        self.step = "wait for weights"
        await self.handle.wait_weights_loaded(self.timeouts.weights_s)
        if not first.one_phase:
            await self.ledger.release_model(spec.name, "weights loaded", kinds=[LeaseKind.LOAD_PEAK])
            self.step = "size kv"
            self.plan = await self._grant_kv(self.handle)
        self.step = "wait for ready"
        await self.handle.wait_ready(self.timeouts.ready_s)
        if first.one_phase:
            await self.ledger.release_model(spec.name, "engine ready", kinds=[LeaseKind.LOAD_PEAK])
        self.step = "verify"
        await self._verify(self.handle)
        await self.record_engine(EnginePhase.READY)

    async def _grant(self, wants, handle: EngineHandle | None = None) -> None:
        granted = await self.ledger.grant(self.spec.name, wants, self.attempt,
                                          handle.pid if handle else None, handle.started_at if handle else None)
        if not isinstance(granted, Granted):
            raise shortfall_error(self.spec.name, granted, self.ledger.budgets())

    async def _grant_kv(self, handle: EngineHandle) -> Plan:
        # Size the KV cache from what is left now that the weights are in, never the pre-load guess.
        sized = plan_kv(self.spec, self.ledger.budgets())
        if not sized.fits:
            raise PlanRejected(self.spec.name, list(sized.reasons))
        await self._grant(sized.steady_leases, handle)
        kv_bytes = max((w.bytes for w in sized.steady_leases if w.kind == LeaseKind.KV), default=0)
        await handle.allocate_kv(KvGrant(sized.kv_tokens, kv_bytes, sized.params, leased_by(self.ledger, self.spec.name)))
        return sized

    async def _verify(self, handle: EngineHandle) -> None:
        """Step 5: what the engine uses must be within its leases plus a tolerance."""
        usage = self.meter.observe(handle.pid, await handle.measure())
        leased = leased_by(self.ledger, self.spec.name)
        over = []
        for device in (gpu_id(i) for i in self.spec.placement.devices):
            used, held = usage.get(device, 0), leased.get(device, 0)
            if over_leases(used, held):
                over.append(f"{device}: the engine uses {format_bytes(used)}, its leases are {format_bytes(held)} "
                            f"(+{format_bytes(verify_tolerance(held))} tolerance); raise memory.weights / "
                            "memory.activation to what it really takes")
        if over:
            raise LoadFailed(self.spec.name, "verify", "; ".join(over))

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


def shortfall_error(model: str, refused: Rejected, budgets: Mapping[str, DeviceBudget]) -> NotEnoughMemory:
    device, wanted, free = worst_shortfall(budgets, refused.short_bytes)
    return NotEnoughMemory(model, device, wanted, free, refused.reason)


def worst_shortfall(budgets: Mapping[str, DeviceBudget], short_bytes: Mapping[str, int]) -> tuple[str, int, int]:
    """(device, bytes wanted there, bytes free there) for the device the request is shortest on."""
    device, short = max(short_bytes.items() or [("devices", 0)], key=lambda kv: kv[1])
    free = budgets[device].free_bytes if device in budgets else 0
    return device, free + short, free


def leased_by(ledger: Ledger, model: str) -> dict[str, int]:
    """Bytes the model holds, per device."""
    out: dict[str, int] = {}
    for lease in ledger.leases():
        if lease.model == model:
            out[lease.device] = out.get(lease.device, 0) + lease.bytes
    return out
