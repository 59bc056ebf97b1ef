"""Reload: `lessor reload`, POST /admin/v1/reload and SIGHUP read the config file again and answer
what changed, or refuse it whole (the running config kept) for what check-config refuses; a
pinned model that failed keeps /readyz from saying ready, with the reason."""

import json
import logging
import os
import subprocess

import pytest
import yaml

from lessor.api.admin import make_admin_app
from lessor.api.service import _load_pinned
from lessor.daemon.config.schema import load_config
from lessor.daemon.errors import ConfigError
from lessor.daemon.events import ConfigReloaded
from lessor.daemon.runtime import runtime

from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.lessord import running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S

CARD_8GIB = [{"name": "sim8", "total": "8GiB", "foreign": "0"}]
HUGE = {**torch_model("huge"), "memory": {"weights": "20GiB", "kv_bytes_per_token": 65536, "load_peak": 0}}
TOKEN = {"Authorization": "Bearer t"}


def _data(tmp_path, models) -> dict:
    return {"state_dir": str(tmp_path / "state"), "policy": {"name": "lru_idle"}, "models": models,
            "devices": {"probe": "sim", "headroom": "1GiB", "simulated": CARD_8GIB,
                        "host": {"headroom": "4GiB", "simulated_total": "64GiB"}}}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


async def test_a_reload_refuses_a_model_that_can_never_fit_as_check_config_does(tmp_path):
    """It was added (and failed at its first request); check-config refused the same file."""
    config = sim_config(tmp_path, [torch_model("a", "2GiB")], gpus=CARD_8GIB)
    bigger = sim_config(tmp_path, [torch_model("a", "2GiB"), HUGE], gpus=CARD_8GIB)
    async with runtime(config, engines=FakeEngines()) as controller:
        with pytest.raises(ConfigError) as info:
            await controller.reload(bigger)
        assert [m["name"] for m in controller.models()] == ["a"] and controller.config is config
    (problem,) = info.value.problems
    assert problem.path == "models[1]" and problem.reason.startswith("can never fit on gpu0: it needs 20.1 GiB")


async def _api(tmp_path, aiohttp_client, controller):
    return await aiohttp_client(make_admin_app(controller, "t"))


async def test_post_reload_says_what_changed_or_why_it_refused(tmp_path, aiohttp_client):
    path = _write(tmp_path / "lessor.yaml", _data(tmp_path, [torch_model("a", "2GiB")]))
    async with runtime(load_config(path), engines=FakeEngines(), config_loader=lambda: load_config(path)) as controller:
        events = controller.bus.subscribe()
        api = await _api(tmp_path, aiohttp_client, controller)
        assert (await api.post("/admin/v1/reload")).status == 401  # a change of the running config: the token's

        _write(path, _data(tmp_path, [torch_model("a", "3GiB"), torch_model("b", "2GiB")]))
        r = await api.post("/admin/v1/reload", headers=TOKEN)
        body = await r.json()
        assert r.status == 200, body
        assert (body["added"], body["removed"], body["changed"]) == (["b"], [], ["a"]) and body["reloaded"] is True
        assert [m["name"] for m in controller.models()] == ["a", "b"]

        _write(path, _data(tmp_path, [torch_model("b", "2GiB"), HUGE]))
        r = await api.post("/admin/v1/reload", headers=TOKEN)
        body = await r.json()
        assert r.status == 400 and body["error"]["type"] == "config_error", body
        assert "models[1]: can never fit on gpu0" in body["error"]["message"]
        assert [m["name"] for m in controller.models()] == ["a", "b"], "refused whole: the running config is kept"

        path.write_text("models: [\n")
        r = await api.post("/admin/v1/reload", headers=TOKEN)
        assert r.status == 400 and "not valid YAML" in (await r.json())["error"]["message"]
        published = []
        while not events.empty():
            event = events.get_nowait()
            if isinstance(event, ConfigReloaded):
                published.append(event.ok)
        assert published == [True, False, False]


async def test_without_a_config_file_there_is_nothing_to_reload(tmp_path, aiohttp_client):
    async with runtime(sim_config(tmp_path, [torch_model("a")]), engines=FakeEngines()) as controller:
        api = await _api(tmp_path, aiohttp_client, controller)
        r = await api.post("/admin/v1/reload", headers=TOKEN)
        body = await r.json()
    assert r.status == 400 and "not started from a config file" in body["error"]["message"]


async def test_a_pinned_model_that_failed_keeps_readyz_not_ready_with_the_reason(tmp_path, aiohttp_client, caplog,
                                                                                monkeypatch):
    """/readyz said ready, and the log pointed to `lessor logs MODEL`, which answered 404 (no log)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    pinned = {**torch_model("v"), "pinned": True,
              "engine": {"kind": "vllm", "model_path": str(tmp_path), "command": ["no-such-vllm", "serve"]}}
    async with runtime(sim_config(tmp_path, [pinned, torch_model("a", "2GiB")])) as controller:  # the real adapters
        with caplog.at_level(logging.ERROR, logger="lessor.service"):
            await _load_pinned(controller, controller.config)
        api = await aiohttp_client(make_admin_app(controller, "t", _set()))
        r = await api.get("/readyz")
        body = await r.json()
        assert r.status == 503 and body["ready"] is False, body
        assert body["reason"].startswith("pinned model 'v' ") and "no-such-vllm" in body["reason"], body
        assert not controller.supervisor.log_path("v").exists()
        line = next(r.getMessage() for r in caplog.records if "pinned, but did not load" in r.getMessage())
        assert "lessor logs" not in line and "/readyz says not ready" in line, line


def _set():
    import asyncio
    ready = asyncio.Event()
    ready.set()
    return ready


def test_lessor_reload_answers_what_changed_or_why_refused(tmp_path):
    path = _write(tmp_path / "lessor.yaml", _data(tmp_path, [torch_model("a", "2GiB")]))
    env = {k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}

    def reload(url):
        return subprocess.run([str(BIN / "lessor"), "reload", "--admin", url, "--config", str(path), "--token", token],
                              capture_output=True, text=True, timeout=HANG_S, env=env)
    with running_lessord(path) as (_, url, _):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        _write(path, _data(tmp_path, [torch_model("a", "2GiB"), torch_model("b", "2GiB")]))
        done = reload(url)
        assert done.returncode == 0 and done.stderr == "", done.stderr  # no "the file changed since": it is applied
        assert done.stdout.startswith(f"reloaded {path.resolve()}: added b") and "no-such" not in done.stdout
        assert "warning: models[1].engine.model_path: /models/b does not exist" in done.stdout  # simulated: warned
        _write(path, {**_data(tmp_path, [torch_model("a", "2GiB")]), "state_dir": str(tmp_path / "elsewhere")})
        refused = reload(url)
        assert refused.returncode == 1 and "changed fields need a restart (state_dir)" in refused.stderr, refused
        assert "reload refused: lessord runs the config it had" in refused.stderr
        status = json.loads(subprocess.run([str(BIN / "lessor"), "models", "--admin", url, "--json"],
                                           capture_output=True, text=True, timeout=HANG_S, env=env).stdout)
        assert [m["name"] for m in status] == ["a", "b"]


def test_the_route_is_documented_with_its_refusals():
    from lessor.api.admin import ROUTES
    from lessor.api.openapi import build_openapi
    op = build_openapi(ROUTES)["paths"]["/admin/v1/reload"]["post"]
    assert {"200", "400", "401", "409"} <= set(op["responses"]) and op["security"] == [{"bearer": []}]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReloadOut")
