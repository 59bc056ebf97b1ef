"""A reload that cannot apply now is pending, not lost: it applies when the loads it waits for end,
a newer one replaces it (the latest file wins), and the digest lessord reports is always that of
the config in force (issue 39, finding 5). The runtime with the engine faked at the process
boundary, its loads and stops held by gates; lessord itself with stand-in engines for SIGHUP."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import urllib.request

import yaml

from lessor.api.admin import make_admin_app
from lessor.daemon.config.schema import load_config
from lessor.daemon.controller import config_source
from lessor.daemon.events import ConfigReloaded, ReloadResult
from lessor.daemon.runtime import runtime

from ..support.configs import torch_model
from ..support.fakes import FakeAdapter, FakeEngines
from ..support.lessord import running_lessord
from ..support.paths import ROOT, STANDIN
from ..support.waiting import HANG_S, until

TOKEN = {"Authorization": "Bearer t"}


CARD_24GIB = [{"name": "sim24", "total": "24GiB", "foreign": "0"}]


def _write(tmp_path, models, gpus=CARD_24GIB):
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "policy": {"name": "lru_idle"}, "models": models,
        "devices": {"probe": "sim", "headroom": "1GiB", "simulated": gpus,
                    "host": {"headroom": "4GiB", "simulated_total": "64GiB"}}}))
    return path


async def _served(tmp_path, aiohttp_client, models, engines=None):
    """(controller, admin API client, config path, events) for lessord's parts run from a config file."""
    path = _write(tmp_path, models)
    engines = engines or FakeEngines()
    made = runtime(load_config(path), engines=engines, config_source=config_source(path),
                   config_loader=lambda: load_config(path))
    controller = await made.__aenter__()
    api = await aiohttp_client(make_admin_app(controller, "t"))
    return made, controller, api, path, engines.adapter, controller.bus.subscribe()


async def _reloaded(events: asyncio.Queue, result: ReloadResult) -> ConfigReloaded:
    """The next config_reloaded event of that result (earlier ones of others skipped)."""
    while True:
        event = await asyncio.wait_for(events.get(), HANG_S)
        if isinstance(event, ConfigReloaded) and event.result is result:
            return event


async def _held_loading(controller, adapter, name: str) -> asyncio.Future:
    """`name`'s load under way, held by the adapter's gate until the test sets it."""
    adapter.gate = asyncio.Event()
    loading = asyncio.ensure_future(controller.supervisor.try_load(name))
    await until(lambda: controller.model(name)["state"] == "loading", f"{name} loading")
    return loading


async def _reload(api) -> dict:
    r = await api.post("/admin/v1/reload", headers=TOKEN)
    body = await r.json()
    assert r.status == 200, body
    return body


async def test_a_reload_during_a_load_it_changes_is_pending_then_applied_when_the_load_ends(tmp_path, aiohttp_client):
    """It was refused ("model 'm2' is loading") and nothing tried it again."""
    made, controller, api, path, adapter, events = await _served(tmp_path, aiohttp_client,
                                                                 [torch_model("m1", "2GiB"), torch_model("m2", "2GiB")])
    try:
        loading = await _held_loading(controller, adapter, "m2")
        before = controller.config_source["digest"]

        _write(tmp_path, [torch_model("m1", "2GiB"), torch_model("m2", "3GiB", priority=7)])
        body = await _reload(api)
        assert body["reloaded"] is False and body["pending"]["waiting_for"] == ["m2"], body
        assert body["pending"]["reason"] == "waiting for 'm2' to finish loading"
        assert body["pending"]["config"]["digest"] == config_source(path)["digest"] != before
        status = (await (await api.get("/admin/v1/status")).json())
        assert status["config"]["digest"] == before, "not in force yet: the digest says what runs"
        assert status["pending_reload"]["waiting_for"] == ["m2"]
        assert controller.supervisor.resolve("m2").spec.priority != 7

        adapter.gate.set()  # the load ends: the reload applies, woken by it
        applied = await _reloaded(events, ReloadResult.APPLIED)
        await loading
        assert applied.changed == ("m2",) and applied.digest == config_source(path)["digest"]
        status = (await (await api.get("/admin/v1/status")).json())
        assert status["config"]["digest"] == config_source(path)["digest"] and status["pending_reload"] is None
        assert controller.supervisor.resolve("m2").spec.priority == 7 and controller.config.model("m2").priority == 7
    finally:
        await made.__aexit__(None, None, None)


async def test_a_newer_reload_replaces_a_pending_one_and_its_file_wins(tmp_path, aiohttp_client):
    """Two reloads in quick succession, the first blocked: the second file's models are in force
    under the second file's digest, and a model only the second file has is known."""
    made, controller, api, path, adapter, events = await _served(tmp_path, aiohttp_client,
                                                                 [torch_model("m1", "2GiB"), torch_model("m2", "2GiB")])
    try:
        loading = await _held_loading(controller, adapter, "m2")

        _write(tmp_path, [torch_model("m1", "2GiB"), torch_model("m2", "2GiB", priority=1)])
        first = await _reload(api)
        first_digest = config_source(path)["digest"]
        _write(tmp_path, [torch_model("m1", "2GiB"), torch_model("m2", "2GiB", priority=2), torch_model("m3", "2GiB")])
        second = await _reload(api)
        second_digest = config_source(path)["digest"]
        assert first["pending"]["config"]["digest"] == first_digest != second_digest
        assert second["pending"]["config"]["digest"] == second_digest, second
        assert controller.status()["pending_reload"]["config"]["digest"] == second_digest

        adapter.gate.set()
        applied = await _reloaded(events, ReloadResult.APPLIED)
        await loading
        assert applied.digest == second_digest and applied.added == ("m3",)
        assert controller.config_source["digest"] == second_digest
        assert [m["name"] for m in controller.models()] == ["m1", "m2", "m3"]
        assert controller.supervisor.resolve("m2").spec.priority == 2
        assert (await api.get("/admin/v1/models/m3")).status == 200  # known, not 404
        assert (await controller.supervisor.try_load("m3")).state.value == "ready"
    finally:
        await made.__aexit__(None, None, None)


class SlowStop(FakeAdapter):
    """Engines whose stop waits for `stop_gate` (an unload that takes its time)."""

    stop_gate: asyncio.Event | None = None

    async def start(self, launch):
        handle = await super().start(launch)
        stop = handle.stop

        async def slow_stop(grace_s: float) -> None:
            if self.stop_gate is not None:
                await self.stop_gate.wait()
            await stop(grace_s)
        handle.stop = slow_stop
        return handle


async def test_a_reload_behind_a_slow_unload_reports_its_own_digest_and_the_next_one_wins(tmp_path, aiohttp_client):
    """The first reload waited on an unload; the file changed meanwhile and a second reload came:
    the first was reported (and in force) under the second file's digest."""
    made, controller, api, path, adapter, events = await _served(
        tmp_path, aiohttp_client, [torch_model("x", "2GiB"), torch_model("m1", "2GiB")], FakeEngines(SlowStop))
    try:
        await controller.load("x")
        adapter.stop_gate = asyncio.Event()
        _write(tmp_path, [torch_model("m1", "2GiB")])
        first_digest = config_source(path)["digest"]
        first = asyncio.ensure_future(_reload(api))
        await until(lambda: controller.model("x")["state"] == "unloading", "x unloading for the first reload")
        _write(tmp_path, [torch_model("m1", "2GiB"), torch_model("m3", "2GiB")])
        second_digest = config_source(path)["digest"]
        second = asyncio.ensure_future(_reload(api))
        adapter.stop_gate.set()
        first, second = await first, await second
        assert (first["removed"], first["config"]["digest"]) == (["x"], first_digest), first
        assert (second["added"], second["config"]["digest"]) == (["m3"], second_digest), second
        assert controller.config_source["digest"] == second_digest
        assert [m["name"] for m in controller.models()] == ["m1", "m3"]
    finally:
        await made.__aexit__(None, None, None)


def _standin(name: str, tmp_path, **env) -> dict:
    return {"name": name, "engine": {"kind": "vllm", "model_path": str(ROOT / "tests"), "command": [sys.executable, STANDIN],
                                     "env": {"LESSOR_STANDIN_RECORD": str(tmp_path / f"{name}.json"), **env}},
            "memory": {"weights": "6GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096}, "restart": {"policy": "never"}}


def _get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=HANG_S) as r:
        return json.loads(r.read())


def _chat(router: str, model: str) -> int:
    data = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(f"{router}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sighup_churn_ends_with_the_last_file_in_force(tmp_path):
    """45 of 50 SIGHUPs were refused under on-demand churn ("model 'm2' is loading") and lessord
    ended on an older config than the file's. Here one model's load is held until the end (its
    engine never becomes ready), two others load and evict each other on demand, and each SIGHUP
    must be applied or pending, never refused; the last file is in force once the held load ends.
    The held model has a card of its own: loads on one card wait for each other."""
    slow = {**_standin("slow", tmp_path, LESSOR_STANDIN_READY_AFTER_S="3600"), "placement": {"devices": [1]}}
    cards = [{"name": "sim12", "total": "12GiB", "foreign": "0"}, {"name": "sim8", "total": "8GiB", "foreign": "0"}]
    fast = [_standin("f1", tmp_path), _standin("f2", tmp_path)]

    def variant(i: int) -> list[dict]:
        # Odd files change the held model (pending until its load ends), even ones only f1.
        models = [{**slow, "priority": 1 + i % 5 if i % 2 else 0}, {**fast[0], "priority": i % 7}, fast[1]]
        return models + ([_standin("newcomer", tmp_path)] if i == ROUNDS else [])

    ROUNDS = 15
    path = _write(tmp_path, variant(0), cards)
    output = tmp_path / "lessord.out"
    with running_lessord(path, output=output) as (proc, url, router):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        held = threading.Thread(target=_chat, args=(router, "slow"), daemon=True)
        held.start()
        models = lambda: {m["name"]: m["state"] for m in _get(f"{url}/admin/v1/models", token)}  # noqa: E731
        _until(lambda: models()["slow"] == "loading", "slow loading")
        stop = threading.Event()

        def churn():
            while not stop.is_set():
                for name in ("f1", "f2"):
                    _chat(router, name)
        churners = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
        for thread in churners:
            thread.start()
        for i in range(1, ROUNDS + 1):
            path = _write(tmp_path, variant(i), cards)
            digest = config_source(path)["digest"]
            proc.send_signal(signal.SIGHUP)

            def said(digest: str = digest) -> bool:
                assert "reload refused" not in output.read_text(), output.read_text()[-2000:]
                status = _get(f"{url}/admin/v1/status", token)
                pending = status.get("pending_reload") or {}
                return digest in (status["config"]["digest"], (pending.get("config") or {}).get("digest"))
            _until(said, f"reload {i} applied or pending")
        stop.set()
        status = _get(f"{url}/admin/v1/status", token)
        assert "slow" in status["pending_reload"]["waiting_for"], status["pending_reload"]
        record = json.loads((tmp_path / "slow.json").read_text())
        subprocess.run(["kill", str(record["pid"])], check=True)  # the held load ends, failed (SIGKILL would read as OOM: tried again)
        _until(lambda: _get(f"{url}/admin/v1/status", token)["config"]["digest"] == digest, "the last file in force")
        status = _get(f"{url}/admin/v1/status", token)
        assert status["pending_reload"] is None
        assert [m["name"] for m in status["models"]] == ["slow", "f1", "f2", "newcomer"]
        assert _chat(router, "newcomer") == 200
        for thread in (held, *churners):  # requests for f1 held by the pending reload were served once it applied
            thread.join(HANG_S)


def _until(condition, what: str) -> None:
    """Ask lessord again until `condition()` holds (a guard of HANG_S turns a hang into a failure)."""
    import time
    give_up = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < give_up, f"{what} never held"
        time.sleep(0.02)


async def test_a_pending_reload_never_applies_once_lessord_stops(tmp_path, aiohttp_client):
    """The stop's own unloads and a cancelled load end the transitions a pending reload waits for:
    it must not then add and remove models beside the stop (runtime closes the reloads first)."""
    made, controller, api, path, adapter, events = await _served(tmp_path, aiohttp_client,
                                                                 [torch_model("m1", "2GiB"), torch_model("m2", "2GiB")])
    try:
        loading = await _held_loading(controller, adapter, "m2")
        before = controller.config_source["digest"]
        _write(tmp_path, [torch_model("m2", "3GiB", priority=7), torch_model("m3", "2GiB")])
        assert (await _reload(api))["pending"]["waiting_for"] == ["m2"]

        await controller.reloads.close()  # what the runtime's stop does before the supervisor's
        adapter.gate.set()
        await loading
        assert controller.status()["pending_reload"] is None and controller.config_source["digest"] == before
        assert controller.supervisor.resolve("m2").spec.priority != 7 and controller.config.model("m1") is not None
        assert [e for e in _queued(events) if isinstance(e, ConfigReloaded) and e.result is ReloadResult.APPLIED] == []
        r = await api.post("/admin/v1/reload", headers=TOKEN)
        assert r.status == 409 and controller.config.model("m1") is not None, await r.text()
    finally:
        await made.__aexit__(None, None, None)


def _queued(events: asyncio.Queue) -> list:
    found = []
    while not events.empty():
        found.append(events.get_nowait())
    return found
