"""The controller: the one facade the admin API and the CLI call. It reads snapshots and turns
them into plain dicts; every change goes through the supervisor or the ledger."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import checks
from .config.changes import ConfigChange
from .config.holder import ConfigHolder
from .config.reloading import Applied, ConfigRead, Pending, Reloads
from .config.schema import LessorConfig
from .devices.history import UsageHistory
from .devices.probes import Probe, SimProbe
from .errors import ConfigError, ConfigProblem, InvalidRequest, LessorError, NoEngineLog, UnknownFingerprint
from .events import AdmissionDecided, AdmissionResult, ConfigReloaded, EventBus, ForeignUsageChanged
from .leases import LeaseKind, held_by
from .ledger.ledger import Ledger
from .models.lifecycle import ModelState
from .models.measurements import Fingerprinting
from .models.supervisor import Supervisor
from .models.unloading import Lingering
from .mqtt import MqttPublisher
from .reconciler import Reconciler
from .traffic.control import TrafficControl

log = logging.getLogger("lessor.service")


class Controller:
    def __init__(self, config: ConfigHolder, probe: Probe, ledger: Ledger, supervisor: Supervisor, bus: EventBus, *,
                 fingerprinting: Fingerprinting, lingering: Lingering, history: UsageHistory, reconciler: Reconciler,
                 traffic: TrafficControl | None = None,
                 mqtt: MqttPublisher | None = None, config_source: dict[str, str] | None = None,
                 config_loader: Callable[[], LessorConfig] | None = None) -> None:
        """The parts as daemon/runtime.py built them; those that only a serving lessord runs (the
        router's traffic control, the MQTT publisher) are None in the CLI's local plan."""
        self._holder, self.probe, self.ledger, self.supervisor, self.bus = config, probe, ledger, supervisor, bus
        self._fingerprinting, self._lingering = fingerprinting, lingering
        self.mqtt = mqtt  # the MQTT publisher, when configured (metrics read its counters)
        self.traffic = traffic  # the router's traffic control (metrics read its counters)
        self.reconciler = reconciler  # metrics read its counters
        self.config_source = config_source  # {path, digest} of the file lessord runs (status says it)
        self.history = history  # the last hour of device usage (daemon/devices/history.py)
        self.config_loader = config_loader  # reads lessord's config again (reload)
        self.pin_failures: dict[str, str] = {}  # pinned models whose load at start failed, and why (readiness)
        self._deferred: Pending | None = None  # the reload that last had to wait, until one applies
        self.reloads = Reloads(supervisor, self._reload_applied, self._reload_pending, self._reload_failed)

    @property
    def config(self) -> LessorConfig:
        """The config in force (swapped in one step on reload)."""
        return self._holder.current

    def devices(self) -> list[dict[str, Any]]:
        return device_dicts(self.ledger, self.probe, self._lingering)

    def pin_failed(self, model: str, reason: str) -> None:
        """A pinned model did not load at start: /readyz says so until it loads."""
        self.pin_failures[model] = reason

    def leases(self, model: str | None = None) -> list[dict[str, Any]]:
        leases = self.ledger.leases()
        if model is not None:
            name = self.supervisor.resolve(model).spec.name
            leases = tuple(lease for lease in leases if lease.model == name)
        return [lease.to_dict() for lease in sorted(leases, key=lambda lease: lease.granted_at)]

    def models(self) -> list[dict[str, Any]]:
        return [self._model_dict(r) for r in self.supervisor.records()]

    def model(self, name: str) -> dict[str, Any]:
        return self._model_dict(self.supervisor.resolve(name))

    def _model_dict(self, record) -> dict[str, Any]:
        spec = record.spec
        leased = {k.value: 0 for k in LeaseKind} | held_by(self.ledger.leases(), per="kind").get(spec.name, {})
        in_flight = self.supervisor.in_flight(spec.name)
        return {"name": spec.name, "aliases": list(spec.aliases), "engine": spec.engine.kind,
                "state": record.state.value, "priority": spec.priority, "pinned": spec.pinned,
                "keep_alive_s": spec.keep_alive, "devices": [f"gpu{i}" for i in spec.placement.devices],
                "leased_bytes": leased, "in_flight": in_flight, "idle_s": (idle_s := self._idle_s(record, in_flight)),
                "keep_alive_ends_in_s": keep_alive_ends_in_s(self._keep_alive_s(record), spec.pinned, idle_s),
                "error": record.error or None,
                "params": dict(record.plan.params) if record.plan else None,
                "endpoint": record.handle.base_url if record.handle else None,
                "pid": record.handle.pid if record.handle else None, "restarts": self.supervisor.restarts(spec.name),
                "overrun": record.overrun,
                "last_load": record.last_load.to_dict() if record.last_load else None,
                "waiting": self.traffic.waiting(record) if self.traffic is not None else None,
                **(self.traffic.learned(spec.name) if self.traffic is not None
                   else {"request_rate": 0.0, "started_share": 1.0, "kept_up_share": 1.0, "starved_s": 0.0, "load_s": None})}

    def _keep_alive_s(self, record) -> float:
        """The keep_alive in force: its latest request's (within the operator's bound), else its config's."""
        return self.traffic.keep_alive_s(record) if self.traffic is not None else record.spec.keep_alive

    def _idle_s(self, record, in_flight: int) -> float | None:
        """Seconds since the model last served (or became ready): what keep_alive counts; None unless it serves."""
        if record.state is not ModelState.READY or record.handle is None:
            return None
        if in_flight:
            return 0.0
        return max(0.0, round(self.supervisor.clock() - self.supervisor.last_used_s(record), 3))

    def fingerprints(self, model: str | None = None) -> list[dict[str, Any]]:
        """What lessor measured, per key; each says whether a load of its model now would use it.
        `model` (a name or alias in the config) filters; unfiltered, models a reload removed are listed too."""
        fingerprinting = self._fingerprinting
        rows = fingerprinting.store.all()
        if model is not None:
            name = self.supervisor.resolve(model).spec.name
            rows = [f for f in rows if f.key.model == name]
        readings = self.ledger.snapshot().readings  # one probe read names every model's devices
        current = {r.spec.name: fingerprinting.key(r.spec, readings).digest for r in self.supervisor.records()}
        return [{**f.to_dict(), "applies": current.get(f.key.model) == f.digest} for f in rows]

    async def forget_fingerprint(self, key: str) -> dict[str, Any]:
        store = self._fingerprinting.store
        removed = await store.delete(key)
        if removed is None:
            raise UnknownFingerprint(key, len(store.all()))
        return removed.to_dict()

    def log_tail(self, name: str, lines: int) -> str:
        """The last lines of the model's engine log (this run's, or the last one's after it stopped)."""
        from ..engines.enginelog import tail
        record = self.supervisor.resolve(name)
        path = self.supervisor.log_path(record.spec.name)
        if not path.exists():
            raise NoEngineLog(record.spec.name)
        return "".join(line + "\n" for line in tail(path, lines))

    def plan(self, name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The dry run. A model that is loaded (it holds leases, or is loading) is planned as for its
        reload, its own leases counted free, and the plan says so: `loaded`, and `current`, its leases."""
        record = self.supervisor.resolve(name)
        result = self.supervisor.dry_run(name, overrides).to_dict()
        current = [{"device": lease.device, "kind": lease.kind.value, "bytes": lease.bytes}
                   for lease in self.ledger.leases() if lease.model == record.spec.name]
        if current or record.state in (ModelState.READY, ModelState.LOADING):
            result.update(loaded=True, current=current)
        return result

    async def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The model once loaded, and `evicted`: the models its admission unloaded to make room
        (read from the admission events this load published, so the supervisor's path is unchanged)."""
        events = self.bus.subscribe()
        try:
            record = await self.supervisor.load(name, overrides)
        finally:
            self.bus.unsubscribe(events)
        return {**self._model_dict(record), "evicted": evicted_for(record.spec.name, events)}

    async def unload(self, name: str) -> dict[str, Any]:
        return self._model_dict(await self.supervisor.unload(name))

    def set_foreign(self, device: str, foreign_bytes: int) -> dict[str, Any]:
        """What-if on simulated devices: another process starts using (or frees) memory."""
        if not isinstance(self.probe, SimProbe):
            raise InvalidRequest("device", f"foreign usage is measured by the '{self.probe.name}' probe; only simulated devices can be set")
        previous = self.probe.set_foreign(device, foreign_bytes)
        self.bus.publish(ForeignUsageChanged(device, foreign_bytes, previous))
        return next(d for d in self.devices() if d["id"] == device)

    async def reload(self, config: LessorConfig) -> ConfigChange:
        """Apply a new config to the running daemon once it can (after a reload before it, and the
        transitions of the models it changes), or refuse it whole with the reason."""
        return await self.reloads.apply(ConfigRead(config, None, self._checked(config)))

    def _checked(self, config: LessorConfig) -> tuple[str, ...]:
        """Refuse what a reload cannot do (fields read once at start) and what check-config refuses;
        the checks' warnings, said once."""
        restart_only = [name for name, old, new in (
            ("state_dir", self.config.state_dir, config.state_dir),
            ("ledger", self.config.ledger, config.ledger),
            ("admin", self.config.admin, config.admin),
            ("router", self.config.router, config.router),
            ("mqtt", self.config.mqtt, config.mqtt),
            ("devices.probe", self.config.devices.probe, config.devices.probe),
            ("devices.simulated", self.config.devices.simulated, config.devices.simulated),
            ("devices.host.simulated_total", self.config.devices.host.simulated_total, config.devices.host.simulated_total),
            # Read once at start (the supervisor's timeouts, the reconciler's loop): a reload would not reach them.
            ("timeouts", self.config.timeouts, config.timeouts),
            ("reconciler", self.config.reconciler, config.reconciler),
        ) if old != new]
        if restart_only:
            raise InvalidRequest(restart_only[0], f"changed fields need a restart ({', '.join(restart_only)}); "
                                                  "reload refused, the running config is kept")
        report = self.check(config)
        if report.errors:  # the same errors check-config and lessord's start refuse
            source = self.config_source["path"] if self.config_source else "the new config"
            raise ConfigError(source, [ConfigProblem(f.path, f.reason) for f in report.findings if f.error])
        return tuple(str(f) for f in report.warnings)

    def check(self, config: LessorConfig) -> checks.Report:
        """check-config's checks of `config`, against the devices this lessord runs on."""
        readings = self.ledger.snapshot().readings.values()
        return checks.review(config, readings, isinstance(self.probe, SimProbe))

    async def reload_file(self) -> dict[str, Any]:
        """Read the config again (lessord's file and flags) and apply it: what changed, with the checks'
        warnings; or pending, and what it waits for (a model it changes is loading: it applies when that
        ends); refused whole (a typed error saying why) with the running config kept, and a reload still
        pending dropped (the file no longer says it). SIGHUP and POST /admin/v1/reload both come here."""
        if self.config_loader is None:
            raise InvalidRequest(None, "this lessord was not started from a config file: nothing to reload")
        try:
            config, source = read_consistently(self.config_source["path"] if self.config_source else None,
                                               self.config_loader)
            read = ConfigRead(config, source, self._checked(config))
        except LessorError as exc:
            dropped = self.reloads.drop_pending()
            log.error("reload refused, the running config is kept%s: %s",
                      f" and the pending reload ({dropped.read.digest or 'not from a file'}) dropped" if dropped else "", exc)
            self.bus.publish(ConfigReloaded(False, str(exc)))
            raise
        outcome = await self.reloads.submit(read)
        if isinstance(outcome, Pending):
            return {"reloaded": False, "added": [], "removed": [], "changed": [], "warnings": list(read.warnings),
                    "config": self.config_source, "pending": self._pending_dict(outcome)}
        change = outcome.change
        return {"reloaded": True, "added": list(change.added), "removed": list(change.removed),
                "changed": list(change.changed), "warnings": list(outcome.read.warnings), "config": outcome.read.source,
                "pending": None}

    @staticmethod
    def _pending_dict(pending: Pending) -> dict[str, Any]:
        return {"config": pending.read.source, "waiting_for": list(pending.waiting_for), "reason": pending.reason()}

    def _reload_applied(self, applied: Applied) -> None:
        change, deferred = applied.change, self._deferred
        self.config_source = applied.read.source  # the digest of the very bytes now in force
        self._deferred = None
        self.bus.publish(ConfigReloaded(True, "", change.added, change.removed, change.changed, digest=applied.read.digest))
        (log.warning if deferred else log.info)(
            "%sconfig reloaded%s: %s", "pending " if deferred and deferred.read is applied.read else "",
            f" ({applied.read.digest})" if applied.read.digest else "", _change_in_words(change))

    def _reload_pending(self, pending: Pending) -> None:
        self._deferred = pending
        self.bus.publish(ConfigReloaded(False, pending.reason(), waiting_for=tuple(pending.waiting_for),
                                        digest=pending.read.digest))
        log.warning("reload%s pending: %s; it applies when that ends (their loads are held meanwhile), "
                    "a newer reload replaces it", f" of {pending.read.digest}" if pending.read.digest else "",
                    pending.reason())

    def _reload_failed(self, read: ConfigRead, exc: LessorError) -> None:
        log.error("reload refused, the running config is kept: %s", exc)
        self.bus.publish(ConfigReloaded(False, str(exc), digest=read.digest))

    def readiness(self) -> str | None:
        """Why lessord is not ready though it started: the ledger's database not answering, a
        pinned model that failed (None: ready)."""
        if self.ledger.unavailable:
            return f"the ledger is unavailable: {self.ledger.unavailable}"
        for spec in self.config.models:
            if not spec.pinned:
                continue
            record = self.supervisor.resolve(spec.name)
            if record.state is ModelState.FAILED:
                return f"pinned model '{spec.name}' failed: {record.error or 'see its events'}"
            if spec.name in self.pin_failures and record.state not in (ModelState.READY, ModelState.LOADING):
                return f"pinned model '{spec.name}' did not load at start: {self.pin_failures[spec.name]}"
        return None

    def status(self) -> dict[str, Any]:
        from .. import __version__
        pending = self.reloads.pending()
        return {"version": __version__, "probe": self.probe.name, "policy": self.config.policy.name,
                "config": self.config_source, "pending_reload": self._pending_dict(pending) if pending else None,
                "devices": self.devices(), "models": self.models()}


def device_dicts(ledger: Ledger, probe: Probe, lingering: Lingering) -> list[dict[str, Any]]:
    """Each device's budget, leases by kind and by model, and memory of stopped engines not yet back."""
    snapshot = ledger.snapshot()
    readings = snapshot.readings
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: {k.value: 0 for k in LeaseKind})
    by_model: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for lease in snapshot.leases:
        by_kind[lease.device][lease.kind.value] += lease.bytes
        kinds = by_model[lease.device].setdefault(lease.model, {})
        kinds[lease.kind.value] = kinds.get(lease.kind.value, 0) + lease.bytes
    held = lingering.bytes_by_device()
    out = []
    for device, budget in snapshot.budgets.items():
        reading = readings[device]
        out.append({
            "id": device, "index": reading.index, "uuid": reading.uuid, "name": reading.name,
            "probe": probe.name, "total_bytes": budget.total_bytes, "used_bytes": reading.used_bytes,
            "capacity_bytes": budget.capacity_bytes,
            "headroom_bytes": budget.headroom_bytes, "foreign_bytes": budget.foreign_bytes,
            "leased_bytes": budget.leased_bytes, "leasable_bytes": budget.leasable_bytes,
            "free_bytes": budget.free_bytes, "leased_by_kind": dict(by_kind[device]),
            "models": by_model[device], "lingering_bytes": held.get(device, 0),
        })
    return out


def _change_in_words(change: ConfigChange) -> str:
    said = [f"{what} {', '.join(names)}" for what, names in
            (("added", change.added), ("removed", change.removed), ("changed", change.changed)) if names]
    return "; ".join(said) or "no model added, removed or changed"


def keep_alive_ends_in_s(keep_alive_s: float, pinned: bool, idle_s: float | None) -> float | None:
    """Seconds until keep_alive unloads the model (Ollama's UNTIL): None while it does not serve,
    when pinned or when keep_alive is never (-1); counted from its last request, as the unloader does."""
    if idle_s is None or pinned or keep_alive_s < 0:
        return None
    return round(max(0.0, keep_alive_s - idle_s), 3)


def evicted_for(model: str, events: asyncio.Queue) -> list[str]:
    """The victims of the admissions of `model` among the events queued, in order, once each."""
    evicted: list[str] = []
    while not events.empty():
        event = events.get_nowait()
        if isinstance(event, AdmissionDecided) and event.model == model and event.result is AdmissionResult.EVICT:
            evicted += [victim for victim in event.victims if victim not in evicted]
    return evicted


def config_source(path: str | os.PathLike[str]) -> dict[str, str]:
    """Which config a daemon runs, as its status says it and the CLI compares it: the absolute path
    and a short digest of the content (an edited file not yet reloaded has another digest)."""
    resolved = Path(path).resolve()
    return {"path": str(resolved), "digest": hashlib.sha256(resolved.read_bytes()).hexdigest()[:12]}


READ_TRIES = 3


def read_consistently(path: str | None, load: Callable[[], LessorConfig]) -> tuple[LessorConfig, dict[str, str] | None]:
    """`load()`, and the source of the bytes it parsed: the file's digest taken before and after
    the read must agree (an editor writing meanwhile: read again), so the digest reported is
    always the content in force."""
    if path is None:
        return load(), None
    for _ in range(READ_TRIES):
        before = _source_or_none(path)
        config = load()  # an unreadable file: its ConfigError names the file
        after = _source_or_none(path)
        if before is not None and before == after:
            return config, after
    raise ConfigError(path, [ConfigProblem("", f"the file changed while it was read, {READ_TRIES} times in a row; "
                                               "reload again once it is written")])


def _source_or_none(path: str) -> dict[str, str] | None:
    try:
        return config_source(path)
    except OSError:
        return None
