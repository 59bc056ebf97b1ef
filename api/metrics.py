"""Prometheus metrics. Gauges are read from the controller at scrape time (nothing to keep in
sync); counters and the load-duration histogram come from events, recorded as they happen."""

from __future__ import annotations

import time
from enum import Enum
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..daemon.controller import Controller
from ..daemon.events import (
    AdmissionDecided,
    AdmissionResult,
    BudgetOvercommitted,
    ConfigReloaded,
    EngineExited,
    Event,
    FingerprintRecorded,
    LeaseOverrun,
    LoadRetried,
    MemoryLingering,
    ModelStateChanged,
    OverrunAction,
    ReloadResult,
)
from ..daemon.leases import LeaseKind
from ..daemon.ledger.fingerprints import Outcome
from ..daemon.models.adoption import AdoptionOutcome
from ..daemon.models.lifecycle import ModelState
from .exchange import CLIENT_GONE


class LoadResult(str, Enum):
    """How a load lessor began ended, or that its admission deferred it (nothing failed)."""

    READY = "ready"
    FAILED = "failed"  # it began (LOADING) and ended without an engine: failed, cancelled, refused on retry
    QUEUED = "queued"  # the admission said wait (Queue, MustWait): a request's load waits as WAITING


def values(*enums_or_members: type[Enum] | Enum) -> tuple[str, ...]:
    """The label values of enums (every member) or of members, in order."""
    out: list[str] = []
    for item in enums_or_members:
        out += [m.value for m in item] if isinstance(item, type) else [item.value]
    return tuple(out)


MODEL_STATES = values(ModelState)
LOADING, READY, WAITING = ModelState.LOADING.value, ModelState.READY.value, ModelState.WAITING.value
ENDED = (ModelState.FAILED.value, ModelState.UNLOADED.value)  # where a load that began ends without an engine
OTHER_CODE = "other"  # an engine's own status outside HTTP's registry (it passes through to the client)
HTTP_CODES = tuple(str(code) for code in sorted({s.value for s in HTTPStatus} | {CLIENT_GONE})) + (OTHER_CODE,)
# Every outcome label of lessor's metrics and its closed set of values (derived from the enums);
# the README's metrics section lists the same (api/reference.py writes it, a test checks it). The
# other labels name things of the config: `model` a configured model, `device` a device's id.
OUTCOME_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lessor_admission_decisions_total": ("result", values(AdmissionResult)),
    "lessor_model_loads_total": ("result", values(LoadResult)),
    "lessor_config_reloads_total": ("result", values(ReloadResult)),
    "lessor_lease_overruns_total": ("action", values(OverrunAction.REPORTED, OverrunAction.STOPPED)),
    "lessor_fingerprints_recorded_total": ("outcome", values(Outcome)),
    "lessor_load_retries_total": ("outcome", values(Outcome.OVERRUN, Outcome.OOM)),
    "lessor_engine_adoptions_total": ("outcome", values(AdoptionOutcome.ADOPTED, AdoptionOutcome.STOPPED)),
    "lessor_router_requests_total": ("code", HTTP_CODES),
    "lessor_model_state": ("state", MODEL_STATES),
    "lessor_device_leased_bytes": ("kind", values(LeaseKind)),
    "lessor_model_leased_bytes": ("kind", values(LeaseKind)),
}
LOAD_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class Metrics:
    def __init__(self, controller: Controller) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._controller = controller
        self._load_started: dict[str, float] = {}
        self.admissions = Counter("lessor_admission_decisions", "Admission decisions by result",
                                  ["result"], registry=self.registry)
        self.evictions = Counter("lessor_model_evictions", "Times a model was evicted by the policy", ["model"], registry=self.registry)
        self.loads = Counter("lessor_model_loads", "Loads by how they ended (ready, failed) or that they were queued",
                             ["model", "result"], registry=self.registry)
        self.reloads = Counter("lessor_config_reloads", "Config reloads by result", ["result"], registry=self.registry)
        self.load_seconds = Histogram("lessor_model_load_duration_seconds", "Time from loading to ready", ["model"],
                                      buckets=LOAD_BUCKETS_S, registry=self.registry)
        self.engine_exits = Counter("lessor_engine_exits", "Engines that exited on their own (crashes)",
                                    ["model"], registry=self.registry)
        self.overruns = Counter("lessor_lease_overruns", "Engines found above their leases (each crossing, not each check)",
                                ["model", "action"], registry=self.registry)
        self.overcommits = Counter("lessor_budget_overcommits", "Times foreign usage outgrew a device's free memory",
                                   ["device"], registry=self.registry)
        self.fingerprints = Counter("lessor_fingerprints_recorded", "Load measurements remembered, by outcome",
                                    ["outcome"], registry=self.registry)
        self.retries = Counter("lessor_load_retries", "Loads tried again after running out of memory, by outcome",
                               ["model", "outcome"], registry=self.registry)
        self.unverified = Counter("lessor_unload_unverified", "Unloads whose engine still held memory after "
                                  "timeouts.unload_verify_s", ["device"], registry=self.registry)
        self.registry.register(_Gauges(controller))
        controller.bus.listen(self.on_event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, LeaseOverrun) and event.over:
            self.overruns.labels(event.model, event.action.value).inc()
        elif isinstance(event, BudgetOvercommitted):
            self.overcommits.labels(event.device).inc()
        elif isinstance(event, FingerprintRecorded):
            self.fingerprints.labels(event.outcome).inc()
        elif isinstance(event, LoadRetried):
            self.retries.labels(event.model, event.outcome).inc()
        elif isinstance(event, MemoryLingering) and not event.gone:
            self.unverified.labels(event.device).inc()
        elif isinstance(event, EngineExited):
            self.engine_exits.labels(event.model).inc()
        elif isinstance(event, AdmissionDecided):
            self.admissions.labels(event.result.value).inc()
            for victim in event.victims:
                self.evictions.labels(victim).inc()
        elif isinstance(event, ConfigReloaded):
            self.reloads.labels(event.result.value).inc()
        elif isinstance(event, ModelStateChanged):
            self._on_state(event)

    def _on_state(self, event: ModelStateChanged) -> None:
        """A load's end by its transition. Its admission deferring it is `queued`, not a failure: the
        model turns WAITING (from UNLOADED or FAILED at its first admission; from LOADING when an
        attempt ran out of memory and its retry's admission said wait)."""
        if event.state == LOADING:
            self._load_started[event.model] = time.monotonic()
        elif event.state == WAITING:
            self._load_started.pop(event.model, None)
            self.loads.labels(event.model, LoadResult.QUEUED.value).inc()
        elif event.previous == LOADING and event.state in (READY, *ENDED):
            started = self._load_started.pop(event.model, None)
            self.loads.labels(event.model, LoadResult.READY.value if event.state == READY else LoadResult.FAILED.value).inc()
            if event.state == READY and started is not None:
                self.load_seconds.labels(event.model).observe(time.monotonic() - started)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Gauges:
    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def collect(self):
        devices, models = self._controller.devices(), self._controller.models()
        yield from self._devices(devices)
        yield from self._models(models)
        yield from self._traffic()
        yield from self._daemon()

    @staticmethod
    def _devices(devices):
        gauges = {name: GaugeMetricFamily(f"lessor_device_{name}_bytes", help_, labels=["device"])
                  for name, help_ in (("total", "Total bytes of the pool"), ("used", "Bytes in use, as the probe measures"),
                                      ("capacity", "Bytes lessor may use (cap)"), ("headroom", "Bytes kept free"),
                                      ("foreign", "Bytes used by processes lessor does not manage"),
                                      ("lingering", "Bytes stopped engines still hold (counted in foreign)"),
                                      ("free", "Bytes still leasable (negative when overrun)"))}
        leased = GaugeMetricFamily("lessor_device_leased_bytes", "Bytes leased, by lease kind", labels=["device", "kind"])
        for d in devices:
            for name, gauge in gauges.items():
                gauge.add_metric([d["id"]], d[f"{name}_bytes"])
            for kind, b in d["leased_by_kind"].items():
                leased.add_metric([d["id"], kind], b)
        yield from gauges.values()
        yield leased

    @staticmethod
    def _models(models):
        state = GaugeMetricFamily("lessor_model_state", "1 for the model's current state", labels=["model", "state"])
        model_leased = GaugeMetricFamily("lessor_model_leased_bytes", "Bytes leased to the model, by kind", labels=["model", "kind"])
        in_flight = GaugeMetricFamily("lessor_model_in_flight_requests", "Requests being served", labels=["model"])
        overrun = GaugeMetricFamily("lessor_model_overrun", "1 while the engine measures above its leases", labels=["model"])
        for m in models:
            for s in MODEL_STATES:
                state.add_metric([m["name"], s], 1.0 if m["state"] == s else 0.0)
            for kind, b in m["leased_bytes"].items():
                model_leased.add_metric([m["name"], kind], b)
            in_flight.add_metric([m["name"]], m["in_flight"])
            overrun.add_metric([m["name"]], 1.0 if m["overrun"] else 0.0)
        yield from (state, model_leased, in_flight, overrun)

    def _traffic(self):
        traffic = self._controller.traffic
        if traffic is None:
            return
        requests = CounterMetricFamily("lessor_router_requests", "Requests the router answered, by model and HTTP status",
                                       labels=["model", "code"])
        counts: dict[tuple[str, str], int] = {}
        for (model, status), count in traffic.requests.items():
            key = (model, str(status) if str(status) in HTTP_CODES else OTHER_CODE)
            counts[key] = counts.get(key, 0) + count
        for (model, code), count in sorted(counts.items()):
            requests.add_metric([model, code], count)
        queued = GaugeMetricFamily("lessor_router_queued_requests", "Requests waiting for their model (a load, a swap, a slot)",
                                   labels=["model"])
        for model, count in sorted(traffic.queued().items()):
            queued.add_metric([model], count)
        # Not an eviction: no load asked for the room and no policy chose it.
        idle_unloads = CounterMetricFamily("lessor_model_idle_unloads", "Unloads of a model idle past its keep_alive",
                                           labels=["model"])
        for model, count in sorted(traffic.idle_unloads.items()):
            idle_unloads.add_metric([model], count)
        yield from (requests, queued, idle_unloads)

    def _daemon(self):
        ledger, reconciler = self._controller.ledger, self._controller.reconciler
        if reconciler is not None:  # what this start found of the previous lessord's engines
            adoptions = CounterMetricFamily("lessor_engine_adoptions", "Engines of a previous lessord found at start",
                                            labels=["outcome"])
            adoptions.add_metric([AdoptionOutcome.ADOPTED.value], len(reconciler.at_start.adopted))
            adoptions.add_metric([AdoptionOutcome.STOPPED.value],
                                 len(reconciler.at_start.stopped) + len(reconciler.at_start.strays))
            yield adoptions
            yield CounterMetricFamily("lessor_reconciler_checks", "Reconciler checks run", value=reconciler.checks)
        yield GaugeMetricFamily("lessor_ledger_unpersisted_releases",
                                "Releases the database refused, retried every reconciler check", value=ledger.unpersisted())
        bus, mqtt = self._controller.bus, self._controller.mqtt
        yield CounterMetricFamily("lessor_events_published", "Events published", value=bus.published)
        yield CounterMetricFamily("lessor_events_dropped", "Events dropped by slow stream subscribers", value=bus.dropped)
        if mqtt is not None:
            yield GaugeMetricFamily("lessor_mqtt_connected", "1 while connected to the broker", value=1.0 if mqtt.connected else 0.0)
            yield CounterMetricFamily("lessor_mqtt_events_published", "Events the broker acknowledged", value=mqtt.published)
            yield CounterMetricFamily("lessor_mqtt_events_dropped", "Events dropped while the broker was away", value=mqtt.dropped)
