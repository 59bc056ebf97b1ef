"""A model that can never fit the box (ModelTooLarge: its own answer, never one a client retries),
and `lessor check-config`'s checks (daemon/checks.py): every problem a config has on this box,
each with the field it is about."""

import asyncio

import aiohttp
import pytest

from lessor.api import errors
from lessor.api.admin import make_admin_app
from lessor.api.router import start_router
from lessor.daemon.config import RouterConfig
from lessor.daemon.errors import ModelTooLarge
from lessor.daemon.runtime import runtime
from lessor.daemon.traffic import TrafficControl

from .conftest import FakeEngines, sim_config, torch_model

CARD_8GIB = [{"name": "sim8", "total": "8GiB", "foreign": "0"}]
HUGE = {**torch_model("huge", "20GiB"), "memory": {"weights": "20GiB", "kv_bytes_per_token": 65536, "load_peak": 0}}


async def test_a_model_that_can_never_fit_is_refused_before_any_eviction(env):
    """20 GiB of weights on an 8 GiB card: no eviction and no wait would ever make room, so none
    is made, and the answer says the most it could get there and what to change."""
    controller, adapter, _ = await env([torch_model("small", "2GiB"), HUGE], gpus=CARD_8GIB)
    await controller.load("small")
    with pytest.raises(ModelTooLarge) as info:
        await controller.load("huge")
    message = str(info.value)
    assert message.startswith("model 'huge' can never fit on gpu0: it needs 20.1 GiB there, at most 7.0 GiB can "
                              "ever be leased (8.0 GiB capacity − 1.0 GiB headroom"), message
    assert "its weights alone need 20.0 GiB: use a quantized model" in message
    assert "quantized" in message and "tensor parallel" in message and "offload" in message
    assert "load peak" not in message  # it has none to lower
    assert controller.model("small")["state"] == "ready"  # nothing was evicted for it
    assert controller.model("huge")["state"] == "unloaded" and controller.leases("huge") == []


def test_model_too_large_is_never_answered_with_a_status_a_client_retries():
    # The openai client retries 408, 409, 429 and every 5xx (honouring Retry-After).
    error = ModelTooLarge("huge", "gpu0", 20 << 30, 7 << 30, "quantize", capacity_bytes=8 << 30, headroom_bytes=1 << 30)
    assert errors.http_status(error) == 422 and "Retry-After" not in errors.http_headers(error)
    assert errors.openai_envelope(error)["error"]["code"] == "model_too_large"


async def test_the_admin_api_answers_422_without_retry_after(tmp_path, aiohttp_client):
    config = sim_config(tmp_path, [HUGE], gpus=CARD_8GIB)
    async with runtime(config, engines=FakeEngines()) as controller:
        ready = asyncio.Event()
        ready.set()
        api = await aiohttp_client(make_admin_app(controller, "t", ready))
        r = await api.post("/admin/v1/models/huge", json={"action": "load"}, headers={"Authorization": "Bearer t"})
        body = await r.json()
    assert r.status == 422 and "Retry-After" not in r.headers, body
    assert body["error"]["type"] == "model_too_large" and "can never fit on gpu0" in body["error"]["message"]


async def test_the_router_answers_422_without_retry_after(tmp_path):
    config = sim_config(tmp_path, [HUGE], gpus=CARD_8GIB)
    async with runtime(config, engines=FakeEngines()) as controller:
        router_config = RouterConfig()
        traffic = TrafficControl(controller.supervisor, router_config, controller.bus.listen)
        controller.supervisor.attach_traffic(traffic)
        server = await start_router(traffic, controller.supervisor, router_config, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
                async with session.post("/v1/completions", json={"model": "huge", "prompt": "x"}) as r:
                    status, headers, body = r.status, r.headers, await r.json()
        finally:
            await server.close()
            await traffic.close()
    assert status == 422 and "Retry-After" not in headers, body
    assert body["error"]["code"] == "model_too_large" and body["error"]["type"] == "invalid_request_error"


async def test_a_plan_of_a_model_too_large_says_it_can_never_fit(env):
    controller, _, _ = await env([HUGE], gpus=CARD_8GIB)
    plan = controller.plan("huge")
    assert not plan["fits"]
    assert any("at most 7.0 GiB can ever be leased there" in r and "load peak" not in r for r in plan["reasons"])
