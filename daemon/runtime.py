"""The composition root: every part of the daemon built once, complete, from a config: probe,
ledger, the supervisor's parts, supervisor, traffic control, reconciler, history, MQTT publisher,
controller. No part is wired after its construction, and no other module builds one (api/service.py
only serves HTTP around what this built; the CLI's local `plan` uses this alone). Where two parts
use each other (traffic control drives the supervisor's loads and the supervisor reads its
counters; the MQTT publisher reads the controller's views and metrics its counters), the one built
first is handed a callable that names the other, called only once lessord serves. Shut down in
order: restarts cancelled, engines stopped, ledger closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from ..engines import adapters
from ..engines.base import EngineAdapter
from ..engines.proctree import become_subreaper
from ..engines.redaction import Redacting
from .config.holder import ConfigHolder
from .config.schema import LessorConfig
from .controller import Controller, device_dicts
from .devices.history import UsageHistory
from .devices.locks import DeviceLocks
from .devices.probes import Probe, SimProbe, make_probe
from .devices.usage import UsageMeter
from .events import EventBus
from .ledger.fingerprints import FingerprintStore
from .ledger.ledger import Ledger
from .ledger.record import LedgerRecord
from .models.crashes import CRASH_RETRY, Crashes
from .models.elastic import Elastic
from .models.launching import Launcher
from .models.loads import Loads
from .models.measurements import Fingerprinting
from .models.reconfiguring import Reconfiguring
from .models.supervisor import Supervisor
from .models.timeouts import Timeouts
from .models.traffic_counters import NoTraffic
from .models.unloading import Lingering
from .mqtt import MqttPublisher
from .reconciler import Reconciler, StartReport, StartSettling
from .traffic.control import Timers, TrafficControl

log = logging.getLogger("lessor.service")

# The engines by kind, or a factory that makes them from the probe and ledger (tests' fakes).
Engines = Mapping[str, EngineAdapter] | Callable[[Probe, Ledger], Mapping[str, EngineAdapter]]


def timeouts_of(config: LessorConfig) -> Timeouts:
    t = config.timeouts
    return Timeouts(t.weights, t.ready, t.stop_grace, t.adopt_s, t.adopt_stopped_s, t.stray_grace_s, t.unload_verify_s)


@asynccontextmanager
async def runtime(config: LessorConfig, force_sim: bool = False, engines: Engines | None = None,
                  clock: Callable[[], float] = time.monotonic, reconcile: bool = True,
                  probe: Probe | None = None, settle_in_background: bool = False,
                  subreaper: bool = False, timers: Timers | None = None,
                  config_source: dict[str, str] | None = None,
                  config_loader: Callable[[], LessorConfig] | None = None) -> AsyncIterator[Controller]:
    """`reconcile=False`: read-only (the CLI's local plan must not adopt or release a running
    daemon's engines, nor write its traffic statistics): no traffic control or MQTT, no history sampled.
    `probe`: the devices, where a test stands in for the GPUs (the one boundary tests fake); the
    config's otherwise. `settle_in_background`: yield as soon as the ledger is settled and the
    previous lessord's engines are claimed, while their adoption runs (lessord: it serves
    meanwhile; `reconciler.settling` ends with it); otherwise yield once it is done. `subreaper`:
    make this process the child subreaper of the engines it starts (lessord; not a test or the CLI,
    for which it would change what becomes of every orphan they make). `timers`: traffic control's
    (a test's clock), the event loop's otherwise. `config_source` and `config_loader`: the file
    lessord runs and how to read it again (its reloads)."""
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

            def readings():
                return ledger.snapshot().readings

            # Built before the supervisor, which reads its counters; it names the supervisor only
            # once a request or a keep_alive round comes (none before this function yields).
            traffic = TrafficControl(lambda: supervisor, clock, config.router, bus.listen, timers=timers,
                                     stats_path=Path(config.state_dir) / "traffic.json") if reconcile else None
            counters = traffic or NoTraffic()
            device_locks, lingering = DeviceLocks(), Lingering(bus.publish)
            meter = UsageMeter(probe, readings)
            fingerprinting = Fingerprinting(fingerprints, readings, lambda: holder.current.planner.measured_margin,
                                            bus.publish)
            elastic = Elastic(ledger, device_locks, counters.in_flight)
            # The supervisor writes each model's state; its loads and config changes are parts it
            # holds, which reach it (as the traffic does) only once a load or a reload runs.
            timeouts, simulated = timeouts_of(config), isinstance(probe, SimProbe)
            launcher = Launcher(holder, ledger, simulated)
            crashes = Crashes(clock, lambda name: loads.try_load(name, cause=CRASH_RETRY))
            loads = Loads(holder, ledger, made, bus.publish, lambda: supervisor, clock=clock, timeouts=timeouts,
                          crashes=crashes, device_locks=device_locks, launcher=launcher,
                          fingerprinting=fingerprinting, meter=meter, simulated=simulated)
            reconfiguring = Reconfiguring(holder, crashes, loads, lambda: supervisor)
            supervisor = Supervisor(holder, ledger, made, bus.publish, loads=loads, reconfiguring=reconfiguring,
                                    crashes=crashes, launcher=launcher, fingerprinting=fingerprinting,
                                    lingering=lingering, meter=meter, elastic=elastic, traffic=counters, clock=clock,
                                    timeouts=timeouts)
            state_dir = Path(config.state_dir).absolute()
            at_start, settling = StartReport(), None
            if reconcile:
                start = StartSettling(ledger, supervisor, state_dir, bus.publish)
                await start.begin()
                at_start, settling = start.report, asyncio.ensure_future(_settle(start))
            reconciler = Reconciler(config.reconciler, ledger, supervisor, bus.publish, state_dir, elastic=elastic,
                                    meter=meter, lingering=lingering, at_start=at_start, settling=settling)
            if settling is not None and not settle_in_background:
                await settling
            history = UsageHistory(lambda: device_dicts(ledger, probe, lingering))
            # The publisher reads the controller's views, built next, only once it runs (publishing).
            mqtt = MqttPublisher(config.mqtt, bus, lambda: (controller.devices(), controller.models()),
                                 Redacting(lambda: holder.current, os.environ)) if config.mqtt and reconcile else None
            controller = Controller(holder, probe, ledger, supervisor, bus, fingerprinting=fingerprinting,
                                    lingering=lingering, reconciler=reconciler, traffic=traffic, history=history,
                                    mqtt=mqtt, config_source=config_source, config_loader=config_loader)
            # Released leases older than ledger.history go; never from the CLI's read-only plan.
            pruning = asyncio.ensure_future(ledger.run_pruning(config.ledger.history)) if reconcile else None
            sampling = _sample_usage(bus, history) if reconcile else None
            versions = fingerprinting.start_warming(config.models) if reconcile else None
            try:
                yield controller
            finally:
                for task in (settling, pruning, sampling, versions):
                    if task:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                # A pending reload woken by the stop's own unloads would apply beside them.
                await controller.reloads.close()
                if traffic is not None:  # its on-demand loads end (each rolls back) before the engines stop
                    await traffic.close()
                await supervisor.close()
        finally:
            await ledger.close()
    finally:
        probe.close()


def _sample_usage(bus: EventBus, history: UsageHistory) -> asyncio.Future:
    """The last hour of device usage (GET /admin/v1/history), sampled while lessord runs."""
    bus.listen(history.on_event)
    return asyncio.ensure_future(history.run())


async def _settle(settling: StartSettling) -> None:
    report = await settling.finish()
    if report.adopted or report.stopped or report.released or report.strays:
        # A summary: what an operator should look into (an engine stopped, a stray) had its own WARNING.
        log.info("after restart: adopted %s, stopped %s, released %d lease(s), stopped %d stray(s)",
                 report.adopted, report.stopped, report.released, len(report.strays))


@asynccontextmanager
async def publishing(controller: Controller) -> AsyncIterator[MqttPublisher | None]:
    """The runtime's MQTT publisher runs (events and state to the broker of the config) while
    lessord runs (nothing when mqtt is unset)."""
    publisher = controller.mqtt
    if publisher is None:
        yield None
        return
    task = asyncio.ensure_future(publisher.run())
    try:
        yield publisher
    finally:
        await publisher.flush(timeout_s=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.announce_offline()
