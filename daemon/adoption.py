"""Adoption after a restart: take over an engine that a previous lessord started.

Adopted only if it is that very process (pid and identity: never a recycled pid), its load had
finished, this config still has its model and device, and the engine answers within
`timeouts.adopt_s`; otherwise a process that still runs is stopped. The outcome is a value the
reconciler reads; the supervisor writes the record of an adopted engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from ..engines.base import EngineAdapter, EngineHandle, Launch
from ..engines.process import EngineProcess
from .ledger import EnginePhase, EngineRecord
from .lifecycle import ModelRecord, ModelState, Timeouts


class AdoptionOutcome(str, Enum):
    ADOPTED = "adopted"  # served again, same pid, same leases
    GONE = "gone"  # its process no longer runs (or the pid is another process now)
    STOPPED = "stopped"  # it ran, but could not be taken over: stopped


@dataclass(frozen=True)
class Adoption:
    outcome: AdoptionOutcome
    pid: int
    reason: str
    handle: EngineHandle | None = None

    @property
    def adopted(self) -> bool:
        return self.outcome is AdoptionOutcome.ADOPTED

    def describe(self) -> str:
        if self.outcome is AdoptionOutcome.ADOPTED:
            return f"adopted its engine (pid {self.pid})"
        if self.outcome is AdoptionOutcome.GONE:
            return "its engine is gone"
        return f"stopped its engine (pid {self.pid}): {self.reason}"


async def adopt(engine: EngineRecord, record: ModelRecord | None, adapter: EngineAdapter | None,
                launch_for: Callable[[ModelRecord], Launch | None], log_path, timeouts: Timeouts) -> Adoption:
    """`launch_for(record)` rebuilds the engine's launch from this config (None: its device is gone)."""
    launch = launch_for(record) if record is not None and record.state == ModelState.UNLOADED else None
    process = EngineProcess.adopt(engine.pid, engine.identity, log_path, launch.on_exit if launch else None,
                                  engine.started_at)
    if process is None:
        return Adoption(AdoptionOutcome.GONE, engine.pid, "its engine is gone")
    why = ("its load had not finished" if engine.phase is not EnginePhase.READY else
           "the model is no longer configured" if record is None else
           "its device is no longer configured" if launch is None else
           f"no adapter for engine '{record.spec.engine.kind}'" if adapter is None else "")
    handle = None
    if not why:
        handle = adapter.reattach(process, launch)
        try:
            await handle.wait_ready(min(timeouts.ready_s, timeouts.adopt_s))
        except (TimeoutError, RuntimeError, OSError) as exc:
            why = f"it does not answer: {exc}"
    if why:
        await process.stop(timeouts.stop_grace_s)
        return Adoption(AdoptionOutcome.STOPPED, engine.pid, why)
    return Adoption(AdoptionOutcome.ADOPTED, engine.pid, "", handle)
