"""Adoption after a restart: take over an engine that a previous lessord started.

Adopted only if it is that very process (pid and identity: never a recycled pid), its load had
finished, this config still has its model and device, and the engine answers within
`timeouts.adopt_s`; otherwise a process that still runs is stopped. An engine found stopped
(SIGSTOP, a debugger: state T in /proc) is given `timeouts.adopt_stopped_s` to resume, then
checked as any other; one that stays stopped is killed at once with SIGKILL (it would not act on
SIGTERM before it is continued, so the stop grace would only be waited out). Every step is bounded,
so one engine's adoption never holds the others' (the reconciler runs them side by side). The
outcome is a value the reconciler reads; the supervisor writes the record of an adopted engine.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ...engines.base import EngineAdapter, EngineHandle, Launch
from ...engines.process import EngineProcess, signal_group
from ...engines.proctree import still_stopped, stopped_members
from ..leases import EnginePhase, EngineRecord
from .lifecycle import ModelRecord, ModelState
from .timeouts import Timeouts

log = logging.getLogger("lessor.reconciler")

RESUME_POLL_S = 0.1


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
    """`launch_for(record)` rebuilds the engine's launch from this config (None: its device is gone).
    Cancelled (lessord stopping meanwhile), the engine is stopped like every engine lessord runs."""
    launch = launch_for(record) if record is not None and record.state == ModelState.ADOPTING else None
    process = EngineProcess.adopt(engine.pid, engine.identity, log_path, launch.on_exit if launch else None,
                                  engine.started_at)
    if process is None:
        return Adoption(AdoptionOutcome.GONE, engine.pid, "its engine is gone")
    try:
        why = ("its load had not finished" if engine.phase is not EnginePhase.READY else
               "the model is no longer configured" if record is None else
               "its device is no longer configured" if launch is None else
               f"no adapter for engine '{record.spec.engine.engine_kind()}'" if adapter is None else "")
        handle = None
        if not why:
            why = await _resumed(engine.model, process, timeouts.adopt_stopped_s)
        if not why and adapter is not None and launch is not None:  # as `why` being "" says
            handle = adapter.reattach(process, launch)
            try:
                await handle.wait_ready(min(timeouts.ready_s, timeouts.adopt_s))
            except (TimeoutError, RuntimeError, OSError) as exc:
                why = f"it does not answer: {exc}"
        if why:
            await stop_engine(process, timeouts.stop_grace_s)
            return Adoption(AdoptionOutcome.STOPPED, engine.pid, why)
    except asyncio.CancelledError:
        await asyncio.shield(stop_engine(process, timeouts.stop_grace_s))
        raise
    return Adoption(AdoptionOutcome.ADOPTED, engine.pid, "", handle)


async def _resumed(model: str, process: EngineProcess, wait_s: float) -> str:
    """"" once no member of its group is stopped (at once for an engine that runs); the reason
    when one still is after `wait_s`."""
    stopped = stopped_members(process.pid)
    if not stopped:
        return ""
    log.warning("%s: its engine (pid %d) is stopped (SIGSTOP or a debugger: process %s in state T); waiting "
                "up to %g s for it to resume (timeouts.adopt_stopped_s), then it is killed; the other models "
                "are served meanwhile", model, process.pid, ", ".join(map(str, stopped)), wait_s,
                extra={"model": model, "pid": process.pid, "step": "stopped_engine"})
    deadline = asyncio.get_running_loop().time() + wait_s
    while stopped and not process.exited.is_set():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return (f"it stayed stopped (SIGSTOP) for {wait_s:g} s (timeouts.adopt_stopped_s): killed with "
                    "SIGKILL; send SIGCONT sooner or raise timeouts.adopt_stopped_s to keep such an engine")
        try:  # an exit ends the wait at once; otherwise look again
            await asyncio.wait_for(process.exited.wait(), min(RESUME_POLL_S, left))
        except asyncio.TimeoutError:
            pass
        # The ones seen stopped, until they run; then the whole group once more (another may have stopped).
        stopped = still_stopped(stopped) or stopped_members(process.pid)
    return ""


async def stop_engine(process: EngineProcess, grace_s: float) -> None:
    """Stop an engine that was not adopted. A stopped one gets SIGKILL at once: it would not act on
    SIGTERM before it is continued, and the grace would only be waited out."""
    if stopped_members(process.pid):
        signal_group(process.pid, signal.SIGKILL)
    await process.stop(grace_s)
