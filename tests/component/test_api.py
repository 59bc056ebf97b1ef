"""The admin API through aiohttp's test client: contract fields, auth, and 4xx for client mistakes."""

import asyncio
import json
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from lessor.api.admin import get_events, make_admin_app
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.waiting import HANG_S

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path, aiohttp_client):
    config = sim_config(tmp_path, [torch_model("a", "6GiB", aliases=["alpha"]), torch_model("b", "6GiB")])
    async with runtime(config, engines=FakeEngines()) as controller:
        ready = asyncio.Event()
        ready.set()
        client = await aiohttp_client(make_admin_app(controller, TOKEN, ready))
        client.controller = controller
        yield client


async def test_devices_contract(api):
    devices = await (await api.get("/admin/v1/devices")).json()
    gpu = next(d for d in devices if d["id"] == "gpu0")
    assert gpu["total_bytes"] == 24 * GiB and gpu["foreign_bytes"] == 8 * GiB
    assert gpu["headroom_bytes"] == GiB and gpu["leased_bytes"] == 0 and gpu["free_bytes"] == 15 * GiB


async def test_load_shows_leases_per_kind_then_unload_releases_them(api):
    r = await api.post("/admin/v1/models/alpha", json={"action": "load"}, headers=AUTH)
    assert r.status == 200, await r.text()
    model = await r.json()
    assert model["name"] == "a" and model["state"] == "ready"
    assert model["leased_bytes"]["weights"] == 6 * GiB and model["leased_bytes"]["kv"] > 0
    assert model["leased_bytes"]["load_peak"] == 0
    leases = await (await api.get("/admin/v1/leases?model=a")).json()
    assert sorted(lease["kind"] for lease in leases) == ["kv", "weights"]
    r = await api.post("/admin/v1/models/a", json={"action": "unload"}, headers=AUTH)
    assert (await r.json())["state"] == "unloaded"
    assert await (await api.get("/admin/v1/leases")).json() == []


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/admin/v1/models/a", {"action": "load"}),
    ("PUT", "/admin/v1/devices/gpu0/foreign", {"foreign_bytes": 1}),
    ("GET", "/admin/v1/events", None),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
async def test_mutating_calls_and_events_need_the_token(api, method, path, body, headers):
    r = await api.request(method, path, json=body, headers=headers)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await r.json())["error"]["type"] == "unauthorized"
    assert api.controller.ledger.snapshot().leases == ()


@pytest.mark.parametrize("body,status,field", [
    (b"{not json", 400, None),
    (b"[]", 400, None),
    (b'{"action": "explode"}', 400, "action"),
    (b'{"action": "load", "colour": 1}', 400, "colour"),
    (b'{"action": "load", "overrides": {"max_batch_size": 0}}', 422, "engine.max_batch_size"),
    (b'{"action": "load", "overrides": {"max_batch_size": [1]}}', 400, "overrides.max_batch_size.int"),
])
async def test_malformed_bodies_get_4xx_naming_the_field(api, body, status, field):
    r = await api.post("/admin/v1/models/a", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == status, await r.text()
    error = (await r.json())["error"]
    assert error["message"]
    if field:
        assert error["field"].startswith(field.split(".")[0])


async def test_unknown_model_is_404_listing_the_known_names(api):
    r = await api.post("/admin/v1/models/gpt-9", json={"action": "load"}, headers=AUTH)
    assert r.status == 404
    assert "known models: a, alpha, b" in (await r.json())["error"]["message"]
    assert (await api.get("/admin/v1/models/gpt-9")).status == 404
    assert (await api.post("/admin/v1/plan", json={"model": "gpt-9"})).status == 404


async def test_unknown_route_and_method_are_json(api):
    r = await api.get("/admin/v1/nothing")
    assert r.status == 404 and (await r.json())["error"]["type"] == "not_found"
    r = await api.delete("/admin/v1/devices")
    assert r.status == 405 and (await r.json())["error"]["type"] == "method_not_allowed"


async def test_what_aiohttp_refuses_gets_the_same_typed_errors(api):
    r = await api.get("/admin/v1/nothing")
    assert (await r.json())["error"]["message"] == "no route for GET /admin/v1/nothing"
    r = await api.delete("/admin/v1/devices")
    assert r.headers["Allow"] == "GET"
    assert (await r.json())["error"]["message"] == "/admin/v1/devices takes GET, not DELETE"
    r = await api.post("/admin/v1/plan", data=b" " * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert (await r.json())["error"] == {"type": "body_too_large",
                                         "message": "the body is larger than the admin API's limit (1048576 bytes)"}


async def test_plan_is_a_dry_run_with_evictions(api):
    await api.put("/admin/v1/devices/gpu0/foreign", json={"foreign_bytes": "10GiB"}, headers=AUTH)
    await api.post("/admin/v1/models/a", json={"action": "load"}, headers=AUTH)  # 7 GiB of the 13
    plan = await (await api.post("/admin/v1/plan", json={"model": "b"})).json()
    assert plan["fits"] and plan["evictions"] == ["a"]
    assert {lease["kind"] for lease in plan["leases"]} >= {"weights", "kv", "load_peak"}
    assert (await (await api.get("/admin/v1/models/a")).json())["state"] == "ready"


async def test_not_enough_memory_is_503_with_retry_after(api):
    await api.put("/admin/v1/devices/gpu0/foreign", json={"foreign_bytes": "20GiB"}, headers=AUTH)
    r = await api.post("/admin/v1/models/a", json={"action": "load"}, headers=AUTH)
    assert r.status == 503 and "Retry-After" in r.headers
    assert "short by" in (await r.json())["error"]["message"]


async def test_event_stream_carries_lease_and_state_events(api):
    r = await api.get("/admin/v1/events", headers=AUTH)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert (await r.content.readline()).startswith(b": connected")
    await api.post("/admin/v1/models/a", json={"action": "load"}, headers=AUTH)
    types = []
    while "model_state" not in types or "lease_granted" not in types:
        line = (await asyncio.wait_for(r.content.readline(), HANG_S)).decode()
        if line.startswith("data: "):
            types.append(json.loads(line[6:])["type"])
    r.close()


async def test_an_idle_event_stream_sends_keep_alives_at_admin_sse_keepalive_s(tmp_path, aiohttp_client):
    async with runtime(sim_config(tmp_path, admin={"sse_keepalive_s": 0.01}), engines={}) as controller:
        client = await aiohttp_client(make_admin_app(controller, TOKEN))
        r = await client.get("/admin/v1/events", headers=AUTH)
        assert await r.content.readline() == b": connected\n"
        assert await r.content.readline() == b"\n"
        assert await asyncio.wait_for(r.content.readline(), HANG_S) == b": keep-alive\n"  # the default is 15 s
        r.close()


async def test_a_cancelled_event_stream_ends_cancelled_and_unsubscribes(api, monkeypatch):
    bus, queues, left, wrote = api.controller.bus, [], [], asyncio.Event()
    subscribe, unsubscribe = bus.subscribe, bus.unsubscribe
    monkeypatch.setattr(bus, "subscribe", lambda: queues.append(subscribe()) or queues[-1])
    monkeypatch.setattr(bus, "unsubscribe", lambda queue: left.append(queue) or unsubscribe(queue))

    async def write(data):
        wrote.set()
    writer = mock.Mock(write_headers=mock.AsyncMock(), write=write, write_eof=mock.AsyncMock(), drain=mock.AsyncMock())
    request = make_mocked_request("GET", "/admin/v1/events", app=api.app, writer=writer)
    stream = asyncio.ensure_future(get_events(request))
    await wrote.wait()  # ": connected" is written: the stream waits for its first event
    stream.cancel()  # as aiohttp does to its handlers when the server shuts down
    with pytest.raises(asyncio.CancelledError):
        await stream
    assert left == queues and len(queues) == 1


async def test_health_ready_metrics(api):
    assert (await api.get("/healthz")).status == 200
    assert (await (await api.get("/readyz")).json()) == {"ready": True}
    text = await (await api.get("/metrics")).text()
    assert 'lessor_device_foreign_bytes{device="gpu0"} 8.589934592e+09' in text
    assert 'lessor_model_state{model="a",state="unloaded"} 1.0' in text


async def test_openapi_document_covers_every_route(api):
    doc = await (await api.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    from lessor.api.admin import ROUTES
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path]
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


async def test_metrics_count_admissions_loads_and_evictions(api):
    await api.put("/admin/v1/devices/gpu0/foreign", json={"foreign_bytes": "10GiB"}, headers=AUTH)
    await api.post("/admin/v1/models/a", json={"action": "load"}, headers=AUTH)
    await api.post("/admin/v1/models/b", json={"action": "load"}, headers=AUTH)  # evicts a
    text = await (await api.get("/metrics")).text()
    assert 'lessor_admission_decisions_total{result="admit"} 1.0' in text
    assert 'lessor_admission_decisions_total{result="evict"} 1.0' in text
    assert 'lessor_model_evictions_total{model="a"} 1.0' in text
    assert 'lessor_model_loads_total{model="b",result="ready"} 1.0' in text
    assert 'lessor_model_load_duration_seconds_count{model="b"} 1.0' in text
    assert 'lessor_model_leased_bytes{kind="weights",model="b"} 6.442450944e+09' in text
    assert 'lessor_device_used_bytes{device="gpu0"}' in text
