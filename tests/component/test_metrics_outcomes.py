"""Metrics say what happened, in closed sets (issue 39, finding 9): a queued admission is `queued`,
not `failed`; every client that leaves while its request waits is counted 499; every outcome label
takes only the values the README lists (derived from the enums)."""

import asyncio

from lessor.api.metrics import OUTCOME_LABELS, Metrics
from lessor.api.reference import metrics_labels
from lessor.daemon.events import ModelStateChanged
from lessor.daemon.planning.admission import MustWait

from ..support.configs import torch_model
from ..support.paths import ROOT
from ..support.waiting import until

CARD_16GIB = [{"name": "sim16", "total": "16GiB", "foreign": "0"}]


def _samples(metrics: Metrics, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for family in metrics.registry.collect()
            for s in family.samples if s.name == name}


async def test_a_queued_admission_counts_queued_not_failed(env):
    """557 queued admissions were counted lessor_model_loads_total{result="failed"} in a 200-model run."""
    controller, _, _ = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")], gpus=CARD_16GIB)
    metrics = Metrics(controller)
    await controller.load("a")
    assert controller.traffic.try_start(controller.traffic.lane("a"))  # a serves a request: the policy cannot evict it
    outcome = await controller.supervisor.try_load("b")  # a request's load
    assert isinstance(outcome, MustWait) and controller.model("b")["state"] == "waiting"
    loads = _samples(metrics, "lessor_model_loads_total")
    assert loads == {(("model", "a"), ("result", "ready")): 1.0, (("model", "b"), ("result", "queued")): 1.0}, loads
    # An attempt that ran out of memory, whose retry's admission says wait: from LOADING, still queued.
    metrics.on_event(ModelStateChanged("b", "loading", "unloaded"))
    metrics.on_event(ModelStateChanged("b", "waiting", "loading"))
    loads = _samples(metrics, "lessor_model_loads_total")
    assert loads[(("model", "b"), ("result", "queued"))] == 2.0 and ("result", "failed") not in {
        label for key in loads for label in key}, loads


async def test_every_client_that_leaves_while_queued_is_counted_499(front):
    """6 clients left while their requests waited for the model's load; 1 was counted."""
    controller, upstream, _, port = await front()
    traffic = controller.traffic
    upstream.adapter.gate = asyncio.Event()  # the load of `a` goes on until the test lets it end
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    body = b'{"model": "a", "messages": []}'
    for _, writer in clients:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))
    await until(lambda: traffic.queued().get("a") == 6, "6 requests waiting for a's load")
    for _, writer in clients:
        writer.close()
    await until(lambda: not traffic.queued().get("a"), "the 6 requests out of a's lane")
    assert traffic.requests == {("a", 499): 6}
    upstream.adapter.gate.set()


async def test_every_outcome_label_is_one_of_the_closed_set_the_readme_lists(env, front):
    """Each sample's outcome label is declared with its values in OUTCOME_LABELS, and the README
    lists the same sets; `model` and `device` name configured things."""
    assert metrics_labels() in (ROOT / "README.md").read_text(), "regenerate: python -m lessor.api.reference"
    controller, upstream, session, _ = await front()
    metrics = Metrics(controller)
    async with session.post("/v1/chat/completions", json={"model": "a", "messages": []}) as r:
        assert r.status == 200
    async with session.post("/v1/chat/completions", json={"model": "b", "messages": []}) as r:
        assert r.status == 200
    seen = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            name = sample.name[:-len("_created")] + "_total" if sample.name.endswith("_created") else sample.name
            for label, value in sample.labels.items():
                if label in ("model", "device", "le"):
                    continue
                assert name in OUTCOME_LABELS, f"{name}'s label {label} is not declared in OUTCOME_LABELS"
                declared, allowed = OUTCOME_LABELS[name]
                assert (label, value in allowed) == (declared, True), (name, label, value)
                seen.add(name)
    assert {"lessor_model_state", "lessor_router_requests_total", "lessor_model_loads_total"} <= seen
