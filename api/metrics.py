"""Prometheus metrics, collected from the controller at scrape time (nothing to keep in sync)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..daemon.controller import Controller


class _Collector:
    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def collect(self):
        devices = self._controller.devices()
        gauges = {name: GaugeMetricFamily(f"lessor_device_{name}_bytes", help_, labels=["device"])
                  for name, help_ in (("total", "Total bytes of the pool"), ("capacity", "Bytes lessor may use (cap)"),
                                      ("headroom", "Bytes kept free"), ("foreign", "Bytes used by processes lessor does not manage"),
                                      ("free", "Bytes still leasable (negative when overrun)"))}
        leased = GaugeMetricFamily("lessor_device_leased_bytes", "Bytes leased, by lease kind", labels=["device", "kind"])
        for d in devices:
            for name, gauge in gauges.items():
                gauge.add_metric([d["id"]], d[f"{name}_bytes"])
            for kind, b in d["leased_by_kind"].items():
                leased.add_metric([d["id"], kind], b)
        yield from gauges.values()
        yield leased
        state = GaugeMetricFamily("lessor_model_state", "1 for the model's current state", labels=["model", "state"])
        for m in self._controller.models():
            for s in ("unloaded", "loading", "ready", "unloading", "failed"):
                state.add_metric([m["name"], s], 1.0 if m["state"] == s else 0.0)
        yield state
        bus = self._controller.bus
        yield CounterMetricFamily("lessor_events_published", "Events published", value=bus.published)
        yield CounterMetricFamily("lessor_events_dropped", "Events dropped by slow subscribers", value=bus.dropped)


def render_metrics(controller: Controller) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(controller))
    return generate_latest(registry), CONTENT_TYPE_LATEST
