"""The daemon's parts, wired: probe, ledger, supervisor, reconciler and controller from a config,
without HTTP (the composition root, api/service.py, adds the servers; the CLI's local `plan`
uses this alone). Shut down in order: restarts cancelled, engines stopped, ledger closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Union

from ..engines import adapters
from ..engines.base import EngineAdapter
from ..engines.redaction import Redacting
from ..engines.proctree import become_subreaper
from .config.schema import LessorConfig
from .controller import Controller
from .devices.probes import Probe, make_probe
from .events import EventBus
from .ledger.fingerprints import FingerprintStore
from .config.holder import ConfigHolder
from .ledger.ledger import Ledger
from .ledger.record import LedgerRecord
from .models.lifecycle import Timeouts
from .mqtt import MqttPublisher
from .reconciler import Reconciler, StartSettling
from .models.supervisor import Supervisor
from .devices.history import UsageHistory

log = logging.getLogger("lessor.service")

# The engines by kind, or a factory that makes them from the probe and ledger (tests' fakes).
Engines = Union[Mapping[str, EngineAdapter], Callable[[Probe, Ledger], Mapping[str, EngineAdapter]]]


def timeouts_of(config: LessorConfig) -> Timeouts:
    t = config.timeouts
    return Timeouts(t.weights, t.ready, t.stop_grace, t.adopt_s, t.adopt_stopped_s, t.stray_grace_s, t.unload_verify_s)


@asynccontextmanager
async def runtime(config: LessorConfig, force_sim: bool = False, engines: Engines | None = None,
                  clock: Callable[[], float] = time.monotonic, reconcile: bool = True,
                  probe: Probe | None = None, settle_in_background: bool = False,
                  subreaper: bool = False) -> AsyncIterator[Controller]:
    """`reconcile=False`: read-only (the CLI's local plan must not adopt or release a running
    daemon's engines). `probe`: the devices, where a test stands in for the GPUs (the one boundary
    tests fake); the config's otherwise. `settle_in_background`: yield as soon as the ledger is
    settled and the previous lessord's engines are claimed, while their adoption runs (lessord:
    it serves meanwhile; `reconciler.settling` ends with it); otherwise yield once it is done.
    `subreaper`: make this process the child subreaper of the engines it starts (lessord; not a
    test or the CLI, for which it would change what becomes of every orphan they make)."""
    if subreaper:
        become_subreaper()
    bus = EventBus()
    holder = ConfigHolder(config)
    probe = probe or make_probe(config.devices, force_sim)
    try:
        ledger = await Ledger.open(config.ledger_url(), probe, holder.devices, publish=bus.publish,
                                   record=LedgerRecord.in_state_dir(config.state_dir), deadlines=config.ledger.deadlines())
        try:
            fingerprints = await FingerprintStore.open(ledger.database)
            made = adapters() if engines is None else engines(probe, ledger) if callable(engines) else engines
            supervisor = Supervisor(holder, ledger, made, bus.publish, clock=clock, timeouts=timeouts_of(config),
                                    probe=probe, fingerprints=fingerprints)
            reconciler = Reconciler(config.reconciler, ledger, supervisor, bus.publish,
                                    Path(config.state_dir).absolute())
            if reconcile:
                settling = StartSettling(ledger, supervisor, Path(config.state_dir).absolute(), bus.publish)
                reconciler.at_start = settling.report
                await settling.begin()
                reconciler.settling = asyncio.ensure_future(_settle(settling))
                if not settle_in_background:
                    await reconciler.settling
            controller = Controller(holder, probe, ledger, supervisor, bus)
            controller.reconciler = reconciler
            # Released leases older than ledger.history go; never from the CLI's read-only plan.
            pruning = asyncio.ensure_future(ledger.run_pruning(config.ledger.history)) if reconcile else None
            controller.history = UsageHistory(controller.devices)
            sampling = _sample_usage(controller) if reconcile else None
            versions = supervisor.fingerprinting.start_warming(config.models) if reconcile else None
            try:
                yield controller
            finally:
                for task in (reconciler.settling, pruning, sampling, versions):
                    if task:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                # A pending reload woken by the stop's own unloads would apply beside them.
                await controller.reloads.close()
                await supervisor.close()
        finally:
            await ledger.close()
    finally:
        probe.close()


def _sample_usage(controller: Controller) -> asyncio.Future:
    """The last hour of device usage (GET /admin/v1/history), sampled while lessord runs."""
    controller.bus.listen(controller.history.on_event)
    return asyncio.ensure_future(controller.history.run())


async def _settle(settling: StartSettling) -> None:
    report = await settling.finish()
    if report.adopted or report.stopped or report.released or report.strays:
        # A summary: what an operator should look into (an engine stopped, a stray) had its own WARNING.
        log.info("after restart: adopted %s, stopped %s, released %d lease(s), stopped %d stray(s)",
                 report.adopted, report.stopped, report.released, len(report.strays))


@asynccontextmanager
async def publishing(controller: Controller) -> AsyncIterator[MqttPublisher | None]:
    """Events and state to the MQTT broker of the config, while lessord runs (off when unset)."""
    config = controller.config.mqtt
    if config is None:
        yield None
        return
    publisher = MqttPublisher(config, controller.bus, lambda: (controller.devices(), controller.models()),
                              Redacting(lambda: controller.config, os.environ))
    controller.mqtt = publisher
    task = asyncio.ensure_future(publisher.run())
    try:
        yield publisher
    finally:
        await publisher.flush(timeout_s=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.announce_offline()
