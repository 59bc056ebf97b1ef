"""The reconciler: what is measured against what the ledger granted.

At start it settles what a previous lessord left behind: engines that still run are adopted (pid
and process identity checked, never a recycled pid), half-done loads are rolled back, leases
nobody holds are released, and stray engines this state folder started but never recorded are
stopped. Then, every `reconciler.interval`, it measures each ready engine (NVML's per-process
figure, or the engine's own report under the simulated probe) against its leases, and watches
processes lessor does not manage: when they grow past what is free, the policy evicts idle
models (or shrinks their KV caches) instead of letting an engine hit an OOM. Memory left free at
the end of a check grows back the KV caches shrunk earlier (daemon/models/elastic.py). Each check also
asks every ready engine's health (daemon/models/health.py): one that stays silent is stopped as a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from ..engines.proctree import Proc
from ..engines.strays import find_strays, identified, stop_groups, tops
from ..policies import Evict
from .config.schema import ReconcilerConfig
from .devices.probes import gpu_id
from .devices.usage import UsageMeter
from .events import BudgetOvercommitted, EngineAdopted, Event, LeaseOverrun, OverrunAction
from .leases import EnginePhase, EngineRecord, LeaseKind
from .ledger.ledger import Ledger
from .models.adoption import AdoptionOutcome
from .models.elastic import Elastic
from .models.health import HealthWatch
from .models.lifecycle import ModelState
from .models.supervisor import Supervisor
from .models.unloading import Lingering
from .planning.admission import GiveBack, decide
from .planning.profile import over_leases
from .units import format_bytes

log = logging.getLogger("lessor.reconciler")

@dataclass
class StartReport:
    adopted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # engines stopped: unfinished load, gone model, no answer
    released: int = 0  # leases released: their holder is gone
    strays: list[int] = field(default_factory=list)  # unrecorded engines of this state folder, stopped


class StartSettling:
    """A start's settling of what the previous lessord left, in two steps. `begin`, before anything
    is served, touches the ledger only: every recorded engine's model waits in ADOPTING, leases no
    recorded engine holds go, strays are found. `finish` checks every recorded engine side by side
    (each bounded by its timeouts: a stopped or silent engine holds only its own model) and stops
    the strays meanwhile; lessord serves the other models all along."""

    def __init__(self, ledger: Ledger, supervisor: Supervisor, state_dir: Path,
                 publish: Callable[[Event], None]) -> None:
        self._ledger, self._supervisor, self._state_dir, self._publish = ledger, supervisor, state_dir, publish
        self.report = StartReport()
        self._engines: list[EngineRecord] = []
        self._strays: dict[int, Proc] = {}

    async def begin(self) -> None:
        ledger = self._ledger
        self._engines = [engine for _, engine in sorted(ledger.engines().items())]
        for engine in self._engines:
            self._supervisor.adopting(engine)
        recorded = {engine.model: engine.attempt for engine in self._engines}
        # Leases of an attempt that is not the recorded engine's: a load killed before its engine was recorded.
        stale = [lease.id for lease in ledger.leases() if recorded.get(lease.model) != lease.attempt]
        self.report.released = len(await ledger.release(stale, "holder gone at start")) if stale else 0
        # A ready engine holds no load peak (a crash between "ready" and its release leaves one behind);
        # an unfinished load keeps its own until its engine is stopped: that memory is still in use.
        finished = {engine.attempt for engine in self._engines if engine.phase is EnginePhase.READY}
        peaks = [lease.id for lease in ledger.leases() if lease.kind == LeaseKind.LOAD_PEAK and lease.attempt in finished]
        self.report.released += len(await ledger.release(peaks, "load finished before the restart")) if peaks else 0
        # Found now, before any load of this lessord starts an engine that would look like one.
        self._strays = identified(find_strays(self._state_dir, set(recorded.values())))

    async def finish(self) -> StartReport:
        strays = stop_groups(self._strays, self._state_dir, self._supervisor.timeouts.stray_grace_s)
        outcomes = await asyncio.gather(strays, *(self._settle(engine) for engine in self._engines),
                                        return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:  # each engine was settled as far as it could be; the first failure says why lessord stops
            raise failed[0]
        self.report.strays = [*cast(list, outcomes[0]), *self.report.strays]  # and the gone engines' workers (_settle)
        return self.report

    async def _settle(self, engine: EngineRecord) -> None:
        model = engine.model
        held = sum(1 for lease in self._ledger.leases() if lease.attempt == engine.attempt)
        adoption = await self._supervisor.adopt(engine)  # not adopted: its record and leases are gone
        (self.report.adopted if adoption.adopted else self.report.stopped).append(model)
        if not adoption.adopted:  # a gone engine's workers may run on, outside its group
            left = identified(tops(self._state_dir, lambda attempt: attempt == engine.attempt))
            self.report.strays += await stop_groups(left, self._state_dir, self._supervisor.timeouts.stray_grace_s)
        self.report.released += 0 if adoption.adopted else held
        self._publish(EngineAdopted(model, engine.pid, adoption.adopted, adoption.describe()))
        # Adopted: the supervisor's line says so. Gone is routine after a reboot; an engine that ran
        # and had to be stopped is what an operator looks into.
        if adoption.outcome is AdoptionOutcome.GONE:
            log.info("%s: after restart, %s", model, adoption.describe(), extra={"model": model, "step": "gone"})
        elif not adoption.adopted:
            log.warning("%s: after restart, %s", model, adoption.describe(),
                        extra={"model": model, "step": "stopped", "pid": engine.pid})


async def reconcile_at_start(ledger: Ledger, supervisor: Supervisor, state_dir: Path,
                             publish: Callable[[Event], None]) -> StartReport:
    """Both steps of `StartSettling` in one: what the CLI and tests that need a settled start use."""
    settling = StartSettling(ledger, supervisor, state_dir, publish)
    await settling.begin()
    return await settling.finish()


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(folder)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def ready_records(supervisor: Supervisor) -> list:
    return [r for r in supervisor.records() if r.state == ModelState.READY and r.handle is not None]


class Reconciler:
    """The periodic loop. Each check: flush releases the database refused, measure every ready
    engine against its leases, and give memory back to foreign processes that outgrew it."""

    def __init__(self, config: ReconcilerConfig, ledger: Ledger, supervisor: Supervisor,
                 publish: Callable[[Event], None], state_dir: Path | None = None, *, elastic: Elastic,
                 meter: UsageMeter, lingering: Lingering, at_start: StartReport | None = None,
                 settling: asyncio.Future | None = None) -> None:
        """`elastic`, `meter`, `lingering`: the parts the supervisor uses too (the runtime builds them).
        `at_start`: the report of the start's settling, filled while `settling` (its task) runs."""
        self._config, self._ledger, self._supervisor = config, ledger, supervisor
        self._elastic, self._meter, self._lingering_memory = elastic, meter, lingering
        self._state_dir = state_dir
        self._state_dir_id = _identity(state_dir) if state_dir is not None else None
        self.state_dir_problem: str | None = None  # said by /readyz while it lasts
        self._publish = publish
        self.at_start = at_start or StartReport()  # what the start's settling found, so far (metrics read it)
        self.settling = settling  # the start's settling, while the engines' adoption runs
        self._over_checks: dict[str, int] = {}
        self._overcommitted: set[str] = set()
        self._failing: set[str] = set()  # parts of the check whose last try failed: logged in full once
        self.checks = 0
        self.health = HealthWatch(config, supervisor)

    async def settled(self) -> None:
        """Return once the start's settling is done (its failure raised); never cancels it."""
        if self.settling is not None:
            await asyncio.shield(self.settling)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._config.interval)
            try:
                await self.check()
            except Exception:  # one bad check must not end the loop
                log.exception("reconciler check failed")

    async def check(self) -> None:
        """One check. Each model's part and each later step is isolated: a model unloaded or evicted
        while its engine was asked for its usage is skipped this time, and an unexpected error in one
        part is logged (once per model while it lasts) without skipping the others."""
        self.checks += 1
        self._watch_state_dir()
        await self._ledger.flush()
        ready = ready_records(self._supervisor)
        # Over-counts are for checks in a row of one engine: an unloaded model starts again at zero.
        self._over_checks = {r.spec.name: n for r in ready if (n := self._over_checks.get(r.spec.name))}
        for record in ready:
            await self._isolated(record.spec.name, self._check_engine(record))
        await self._isolated("health checks", self.health.check(ready_records(self._supervisor)))
        await self._isolated("lingering memory", self._lingering())
        if self._config.evict_on_foreign_growth:
            await self._isolated("give-back to foreign growth", self._give_back())
        # Read again: the awaits above may have unloaded some of the models that were ready.
        await self._isolated("growing KV caches back", self._elastic.grow_idle(
            ready_records(self._supervisor), self._supervisor.policy_snapshot))

    async def _isolated(self, part: str, work) -> None:
        try:
            await work
        except Exception:
            if part not in self._failing:  # with its traceback once; a failure every tick is one line a tick
                log.exception("reconciler check: %s failed; the rest of the check goes on", part)
            else:
                log.debug("reconciler check: %s failed again", part, exc_info=True)
            self._failing.add(part)
        else:
            self._failing.discard(part)

    def _watch_state_dir(self) -> None:
        """A state_dir deleted (or replaced) under a running lessord: its open files are written on
        into inodes no name reaches, so everything it writes from then on is lost at the next
        start. Said once in the log, and by /readyz while it lasts."""
        if self._state_dir is None:
            return
        now = _identity(self._state_dir)
        problem = None if now == self._state_dir_id else (
            f"state_dir {self._state_dir} was {'deleted' if now is None else 'replaced by another folder'} while "
            f"lessord runs: the ledger and engine logs are written into files no path reaches and are lost at the "
            f"next start; put it back, or restart lessord (a new ledger; the running engines are stopped as strays)")
        if problem and not self.state_dir_problem:
            log.error("%s", problem, extra={"step": "state_dir"})
        elif self.state_dir_problem and not problem:
            log.warning("state_dir %s is back", self._state_dir, extra={"step": "state_dir"})
        self.state_dir_problem = problem

    async def _lingering(self) -> None:
        self._lingering_memory.check(self._ledger.snapshot().readings)

    async def _measure(self, record) -> dict[str, int] | None:
        """The engine's usage, or None when the model changed state while its engine was asked
        (unloaded, evicted, restarted): nothing of it to check this time."""
        handle = record.handle
        try:
            reported = await self._measured(handle)
        except Exception as exc:  # a busy or dying engine: a missed measurement, the probe still counts
            log.debug("%s: engine did not report its usage: %s", record.spec.name, exc)
            reported = {}
        if record.handle is not handle or record.state != ModelState.READY:
            log.debug("%s: changed state during the check; skipped this time", record.spec.name)
            return None
        return self._meter.observe(handle.pid, reported)

    async def _measured(self, handle) -> dict[str, int]:
        return await asyncio.wait_for(handle.measure(), timeout=max(1.0, self._config.interval))

    async def _check_engine(self, record) -> None:
        name = record.spec.name
        used = await self._measure(record)
        if used is None:
            return
        leased = self._supervisor.leased(name)
        # Its GPUs, and the host only where it leases host RAM (a hybrid engine's experts): every
        # engine's process uses some RAM, which no lease is meant to cover.
        watched = {gpu_id(i) for i in record.spec.placement.devices} | set(leased)
        over = {d: u for d, u in used.items() if d in watched and over_leases(u, leased.get(d, 0))}
        if not over:
            self._over_checks.pop(name, None)
            if record.overrun is not None:
                device = record.overrun["device"]
                self._supervisor.report_overrun(name, None)
                self._publish(LeaseOverrun(name, device, used.get(device, 0), leased.get(device, 0), False,
                                         OverrunAction.CLEARED))
            return
        self._over_checks[name] = self._over_checks.get(name, 0) + 1
        if self._over_checks[name] < self._config.overrun_checks or record.overrun is not None:
            return
        device, bytes_used = max(over.items(), key=lambda kv: kv[1] - leased.get(kv[0], 0))
        self._supervisor.report_overrun(name, {"device": device, "used_bytes": bytes_used,
                                               "leased_bytes": leased.get(device, 0)})
        reason = (f"engine uses {format_bytes(bytes_used)} on {device}, its leases are "
                  f"{format_bytes(leased.get(device, 0))}; raise its memory figures or lower its cache")
        action = OverrunAction.STOPPED if self._config.on_overrun == "stop" else OverrunAction.REPORTED
        log.warning("%s: over its leases (%s): %s", name, action.value, reason,
                    extra={"model": name, "step": "overrun", "device": device})
        self._publish(LeaseOverrun(name, device, bytes_used, leased.get(device, 0), True, action))
        if action is OverrunAction.STOPPED:
            await self._supervisor.stop_for_overrun(name, reason)

    async def _give_back(self) -> None:
        snapshot = self._supervisor.policy_snapshot()
        for device, budget in snapshot.devices.items():
            if budget.free_bytes >= 0:
                self._overcommitted.discard(device)
                continue
            decision = decide(GiveBack(device), snapshot, None, self._supervisor.policy).decision
            victims = decision.victims if isinstance(decision, Evict) else ()
            why = f"foreign usage grew on {device}"
            if isinstance(decision, Evict) and decision.shrink:  # the lighter lever: the models stay
                await self._supervisor.make_room(replace(decision, victims=()), why, why, best_effort=True)
                return  # the snapshot is stale now; the next check looks again
            if not victims and device in self._overcommitted:
                continue  # said once already; nothing new to do
            self._overcommitted.add(device)
            reason = getattr(decision, "reason", "")
            self._publish(BudgetOvercommitted(device, -budget.free_bytes, victims, reason))
            log.warning("%s: foreign usage grew %s past the free memory; evicting %s", device,
                        format_bytes(-budget.free_bytes), ", ".join(victims) or f"nothing: {reason}",
                        extra={"device": device, "step": "overcommitted"})
            if victims:  # one that took a request since the snapshot stays; the next check looks again
                await self._supervisor.make_room(Evict(victims), why, why, best_effort=True)
                return  # the snapshot is stale now; the next check looks again
