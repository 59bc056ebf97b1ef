"""The dashboard at the admin address `/`: the usage history's ring, the page's files, and the page
end to end in Debian's headless Chromium (driven over the DevTools protocol with aiohttp's
websocket client): the seed's devices, a load shown as it happens, read-only without the token
(nobody without it loads, unloads, reads a log or the event stream), the token never in a URL; the
first paint from the state the page arrives with (no poll needed); a given status drawn column by
column; each bar segment drawn as its legend says, headroom calm."""

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml

from lessor.api import dashboard
from lessor.api.admin import make_admin_app
from lessor.api.schemas import HistoryOut
from lessor.daemon import events
from lessor.daemon.config.fields import parse_listen
from lessor.daemon.config.schema import AdminConfig
from lessor.daemon.devices.history import UsageHistory
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.clients import Admin
from ..support.configs import sim_config, standin_spec, torch_model
from ..support.fakes import FakeEngines
from ..support.lessord import running_lessord
from ..support.paths import ROOT
from ..support.waiting import HANG_S, until

TOKEN = "dashboard-test-token-8c41"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
STATIC = ROOT / "api" / "static"


# -- the usage history's ring, on an injected clock ----------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def device(leased=0, foreign=8 * GiB, used=None) -> dict:
    used = foreign if used is None else used
    return {"id": "gpu0", "capacity_bytes": 24 * GiB, "headroom_bytes": GiB, "leased_bytes": leased,
            "foreign_bytes": foreign, "used_bytes": used, "free_bytes": 15 * GiB - leased}


def test_the_ring_keeps_an_hour_and_one_sample_per_gap():
    clock, readings = Clock(), [device()]
    history = UsageHistory(lambda: readings, clock=clock, window_s=3600, interval_s=10, min_gap_s=1)
    history.sample()
    clock.now += 0.4
    readings[:] = [device(leased=2 * GiB, used=10 * GiB)]  # a grant 0.4 s later: the same sample, newer figures
    history.sample()
    (only,) = history.samples()
    assert only.at_s == 1000.4 and only.devices["gpu0"].leased_bytes == 2 * GiB
    assert only.devices["gpu0"].engines_bytes == 2 * GiB and only.devices["gpu0"].free_bytes == 13 * GiB
    for _ in range(400):  # past the hour: the oldest go
        clock.now += 10
        history.sample()
    samples = history.samples()
    assert samples[0].at_s >= clock.now - 3600 and len(samples) == 361
    for _ in range(10000):  # a storm of changes: the ring stays bounded by window / min_gap
        clock.now += 0.3
        history.sample()
    assert len(history.samples()) <= 3601
    assert all(b.at_s - a.at_s >= 1 for a, b in zip(history.samples(), history.samples()[1:]))
    out = history.to_dict()
    assert out["now_s"] == clock.now and out["window_s"] == 3600
    HistoryOut.model_validate(out)


def test_only_lease_and_foreign_changes_wake_the_sampler():
    history = UsageHistory(lambda: [], clock=Clock())
    history.on_event(events.ModelStateChanged("m", "ready", "loading"))
    assert not history._changed.is_set()
    history.on_event(events.LeaseGranted("l", "m", "gpu0", "weights", GiB))
    assert history._changed.is_set()


async def test_lessords_runtime_samples_at_each_lease_change(env):
    controller, adapter, _ = await env([torch_model("a", "6GiB")])
    history = controller.history
    await until(lambda: history.samples(), "the first sample")
    await controller.load("a")
    await until(lambda: history.samples()[-1].devices["gpu0"].leased_bytes >= 6 * GiB, "a sample with the load's leases")
    await controller.unload("a")
    await until(lambda: history.samples()[-1].devices["gpu0"].leased_bytes == 0, "a sample after the unload")


# -- the session and the page's files through aiohttp's test client ------------------------------

@pytest.fixture
async def api(tmp_path, aiohttp_client):
    config = sim_config(tmp_path, [torch_model("a", "6GiB")])
    async with runtime(config, engines=FakeEngines()) as controller:
        client = await aiohttp_client(make_admin_app(controller, TOKEN))
        yield client


async def test_the_page_runs_only_its_own_files(api):
    page = await api.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "form-action 'none'" in policy and "frame-ancestors 'none'" in policy
    html = await page.text()
    assert "<script src=\"/dashboard.js\"" in html and not re.search(r"<script>|<style>| style=| on\w+=", html)
    assert not re.search(r"<input[^>]* name=", html), "a named field could be submitted into a URL"
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        r = await api.get(path)
        assert r.status == 200 and r.content_type == kind and await r.read() == (STATIC / path[1:]).read_bytes()
        assert "Set-Cookie" not in r.headers  # no ambient credential: no other page can act through a browser


FIRST_STATE = re.compile(r'<script type="application/json" id="initial-state">(.*?)</script>', re.S)


async def test_the_page_arrives_with_its_first_state_from_the_public_routes_only(api):
    html = await (await api.get("/")).text()
    (block,) = FIRST_STATE.findall(html)
    state = json.loads(block)
    assert set(state) == {"status", "history", "fingerprints"}
    public = await (await api.get("/admin/v1/status")).json()
    assert [m["name"] for m in state["status"]["models"]] == [m["name"] for m in public["models"]] == ["a"]
    assert [(d["id"], d["total_bytes"]) for d in state["status"]["devices"]] == [
        (d["id"], d["total_bytes"]) for d in public["devices"]]
    assert state["fingerprints"] == await (await api.get("/admin/v1/fingerprints")).json()
    HistoryOut.model_validate(state["history"])
    assert TOKEN not in html


def test_the_first_state_cannot_end_its_block_whatever_a_field_says():
    hostile = {"status": {"models": [{"error": "</script><script>alert(1)</script><!-- & -->"}]}}
    html = dashboard.render_page(hostile).decode()
    (block,) = FIRST_STATE.findall(html)
    assert "<" not in block and ">" not in block and json.loads(block) == hostile
    assert dashboard.render_page(None) == (STATIC / "dashboard.html").read_bytes()


async def test_history_is_public_and_as_documented(api):
    r = await api.get("/admin/v1/history")
    assert r.status == 200
    HistoryOut.model_validate(await r.json())


def test_the_dashboard_is_loopback_only_by_default():
    host, _ = parse_listen(AdminConfig().listen)
    assert host == "127.0.0.1"


# -- end to end: lessord on the seed's devices, the page in headless Chromium ---------------------

def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; make system-deps does)"
        if os.environ.get("CI") == "true" or os.environ.get("LESSOR_REQUIRE_CHROMIUM"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class Page:
    """One tab over the DevTools protocol: commands by id, events collected as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.pending, self.next_id = ws, {}, 0
        self.requests: list[tuple[str, dict]] = []  # every URL the page asked for, with its headers
        self.loaded = asyncio.Event()
        self.paused: asyncio.Queue[dict] = asyncio.Queue()  # requests held by Fetch.enable's patterns
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
            elif data["method"] == "Network.requestWillBeSent":
                request = data["params"]["request"]
                self.requests.append((request["url"], request["headers"]))
            elif data["method"] == "Page.loadEventFired":
                self.loaded.set()
            elif data["method"] == "Fetch.requestPaused":
                self.paused.put_nowait(data["params"])

    async def send(self, method: str, **params):
        self.next_id += 1
        future = self.pending[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, HANG_S)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer["result"]

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, condition: str, what: str):
        """Wait until the page's `condition` (a JS expression) holds; the page looks each 50 ms."""
        js = ("new Promise((done) => { const look = () => { let v; try { v = (" + condition + "); } catch (e) {} "
              "if (v) done(v); else setTimeout(look, 50); }; look(); })")
        try:
            return await asyncio.wait_for(self.evaluate(js), HANG_S)
        except asyncio.TimeoutError:
            raise AssertionError(f"{what} never showed ({HANG_S:g} s)") from None

    async def open(self, url: str) -> None:
        self.loaded.clear()
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), HANG_S)

    async def hold(self, path: str) -> None:
        """From now on, requests to `path` wait in `paused` until answered or let through."""
        await self.send("Fetch.enable", patterns=[{"urlPattern": f"*{path}*"}])

    async def answer_each(self, body: dict) -> None:
        """Answer every held request with `body` as JSON (run as a task; cancelled at the end)."""
        encoded = base64.b64encode(json.dumps(body).encode()).decode()
        while True:
            held = await self.paused.get()
            await self.send("Fetch.fulfillRequest", requestId=held["requestId"], responseCode=200, body=encoded,
                            responseHeaders=[{"name": "Content-Type", "value": "application/json"}])

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture
async def browser(tmp_path):
    exe = chromium_path()
    profile = tmp_path / "chromium"
    args = [exe, "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # chromium refuses root with its sandbox
    with open(tmp_path / "chromium.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    active = profile / "DevToolsActivePort"  # chromium writes its port here once it listens
    try:
        await until(lambda: active.is_file() and len(active.read_text().split()) == 2 or proc.poll() is not None,
                    "chromium's DevTools port")
        assert proc.poll() is None, (tmp_path / "chromium.log").read_text()
        port = active.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Network"):
                    await page.send(f"{domain}.enable")
                yield page
                page.reader.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(HANG_S)
        except subprocess.TimeoutExpired:
            proc.kill()


async def keep_screenshot(page: Page, shot: Path) -> None:
    """The page as it looks now, in the test's folder and in $LESSOR_ARTIFACTS when set."""
    await page.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = os.environ.get("LESSOR_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    print(f"dashboard screenshot: {shot}" + (f" and {Path(artifacts) / shot.name}" if artifacts else ""))


@pytest.fixture
def seed_daemon(tmp_path):
    """lessord on examples/seed.yaml's devices and models, plus a stand-in engine it can load on the
    simulator (the seed's DeepSeek-R1 needs ktransformers)."""
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    data["models"].append(standin_spec("standin", tmp_path))
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(data))
    with running_lessord(path, output=tmp_path / "lessord.out") as (_, url, _router):
        yield url, Admin(url, tmp_path / "state")


SIGNED_IN = "document.body.dataset.signedIn === 'yes' && document.getElementById('live').dataset.state === 'open'"


async def sign_in(page: Page, token: str) -> None:
    await page.evaluate(f"document.getElementById('token').value = {json.dumps(token)};"
                        " document.getElementById('signin').requestSubmit()")


def field(device: str, name: str) -> str:
    return f"document.querySelector('[data-device=\"{device}\"] [data-field=\"{name}\"]').textContent"


def state_of(model: str) -> str:
    return f"document.querySelector('#models tr[data-model=\"{model}\"] [data-field=\"state\"]').textContent"


def refused(url: str, method: str, path: str) -> int:
    request = urllib.request.Request(url + path, method=method, data=b'{"action": "load"}' if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_the_dashboard_in_chromium_shows_the_seed_and_a_load_as_it_happens(seed_daemon, browser, tmp_path):
    url, admin = seed_daemon
    page = browser
    await page.open(url + "/")
    await page.until("document.body.dataset.polled === 'yes'", "the first poll's status")
    assert await page.evaluate(field("gpu0", "total")) == "24.0 GiB"
    assert await page.evaluate(field("gpu0", "foreign")) == "8.0 GiB"
    assert await page.evaluate(field("gpu0", "headroom")) == "1.0 GiB"
    assert await page.evaluate(field("gpu0", "free")) == "15.0 GiB"
    assert await page.evaluate(state_of("deepseek-r1")) == "unloaded"

    # Without the token: read-only. No buttons to load or see logs, and the API refuses the page too.
    assert await page.evaluate("document.querySelectorAll('[data-action=load], [data-action=log]').length") == 0
    assert await page.evaluate("fetch('/admin/v1/models/standin', {method: 'POST', body: '{\"action\": \"load\"}',"
                               " headers: {'Content-Type': 'application/json'}}).then((r) => r.status)") == 401
    for method, path in (("POST", "/admin/v1/models/standin"), ("GET", "/admin/v1/models/standin/log"),
                         ("GET", "/admin/v1/events")):
        assert refused(url, method, path) == 401, (method, path)

    # A load by someone else shows on the read-only page (its once-a-second status).
    status, body = await asyncio.to_thread(admin.load, "standin")
    assert status == 200, body
    await page.until(f"{state_of('standin')} === 'ready'", "standin ready (read-only page)")
    await page.until("document.querySelector('[data-device=\"gpu0\"] [data-segment=\"standin weights\"]')",
                     "standin's weights in gpu0's bar")
    assert (await asyncio.to_thread(admin.call, "POST", "/admin/v1/models/standin", {"action": "unload"}))[0] == 200
    await page.until(f"{state_of('standin')} === 'unloaded'", "standin unloaded")

    # A wrong token signs nothing in; the right one opens the event stream (a reload keeps it).
    await sign_in(page, "not-the-token")
    await page.until("document.getElementById('signin-error').textContent === 'wrong token'", "'wrong token'")
    assert await page.evaluate("document.body.dataset.signedIn") == "no"
    await sign_in(page, admin.token)
    await page.until(SIGNED_IN, "signed in, the event stream open")
    await page.open(url + "/")
    await page.until(SIGNED_IN, "still signed in after a reload")
    await page.until("document.querySelector('#models tr[data-model=\"standin\"] [data-action=load]')", "a load button")
    await page.evaluate("document.querySelector('#models tr[data-model=\"standin\"] [data-action=load]').click()")
    await page.until(f"{state_of('standin')} === 'ready'", "standin ready (signed-in page)")
    await page.until("document.querySelector('#events li[data-type=\"model_state\"][data-model=\"standin\"]')",
                     "standin's model_state event in the list")
    # Where a model's numbers come from: the plan's components, each with its source.
    await page.evaluate("document.querySelector('#models tr[data-model=\"deepseek-r1\"] [data-action=plan]').click()")
    sources = await page.until("[...document.querySelectorAll('#detail-body tr[data-source]')].map((r) => r.dataset.source)"
                               ".join(' ')", "deepseek-r1's memory components")
    sources = sources.split()
    assert {"formula", "estimate"} <= set(sources), sources
    await page.until("document.querySelector('#models tr[data-model=\"standin\"] [data-action=log]')", "a log button")
    await page.evaluate("document.querySelector('#models tr[data-model=\"standin\"] [data-action=log]').click()")
    await page.until("document.querySelector('pre[data-log=\"standin\"]')", "standin's log")
    await page.until("Number(document.querySelector('svg.chart[data-device=\"gpu0\"]').dataset.samples) >= 2",
                     "the usage chart with the load in it")

    await keep_screenshot(page, tmp_path / "dashboard.png")
    assert not [u for u, _ in page.requests if admin.token in u], "the token was put in a URL"
    carried = {re.sub(r"\?.*", "", u.removeprefix(url)) for u, headers in page.requests
               if admin.token in headers.get("Authorization", "")}
    assert carried == {"/admin/v1/events", "/admin/v1/models/standin", "/admin/v1/models/standin/log"}, carried
    assert (await page.send("Network.getCookies", urls=[url]))["cookies"] == []


# -- the page on its own: the first paint, a given status, the legend against the bars ------------

async def test_the_first_paint_shows_the_devices_and_models_before_any_poll(api, browser, tmp_path):
    """A browser that takes the page as it is when loaded (a plain headless screenshot) sees the state,
    not "connecting…": the status requests are held unanswered, so only the page's own state can draw."""
    page = browser
    await page.hold("/admin/v1/status")
    await page.open(str(api.make_url("/")))  # returns at the load event
    await keep_screenshot(page, tmp_path / "dashboard-first-paint.png")
    assert await page.evaluate("document.getElementById('about').textContent") != "connecting…"
    assert await page.evaluate(state_of("a")) == "unloaded"
    assert await page.evaluate(field("gpu0", "foreign")) == "8.0 GiB"
    assert await page.evaluate("document.body.dataset.polled") is None  # no poll has answered
    held = await page.paused.get()
    await page.send("Fetch.continueRequest", requestId=held["requestId"])
    await page.until("document.body.dataset.polled === 'yes'", "the first poll, once let through")


def given_status(real: dict) -> dict:
    """The real status of `api` made into five models: serving, waiting, from a lessord that does not
    report the new fields, one that never unloads, one pinned; gpu0 holds every kind of lease."""
    status = json.loads(json.dumps(real))
    a = status["models"][0]
    a.update(state="ready", idle_s=75.4, in_flight=2, keep_alive_s=300, keep_alive_ends_in_s=224.6, waiting=None)
    b = {**a, "name": "b", "state": "waiting", "idle_s": None, "in_flight": 0, "keep_alive_s": -1,
         "keep_alive_ends_in_s": None,
         "waiting": {"reason": "room on gpu0: a is serving", "recheck_in_s": 20.0, "blockers": ["a"], "requests": 3}}
    c = {k: v for k, v in {**a, "name": "c", "idle_s": 5.0, "in_flight": 0}.items()
         if k not in ("waiting", "keep_alive_ends_in_s")}
    d = {**a, "name": "d", "idle_s": 3725.0, "in_flight": 0, "keep_alive_s": -1, "keep_alive_ends_in_s": None}
    e = {**a, "name": "e", "pinned": True, "keep_alive_ends_in_s": None}
    status["models"] = [a, b, c, d, e]
    gpu0 = status["devices"][0]
    gpu0["models"] = {"a": {"weights": 4 * GiB, "kv": GiB, "load_peak": GiB // 2, "reserve": GiB // 2},
                      "d": {"weights": 2 * GiB}}
    gpu0["leased_bytes"] = 8 * GiB
    return status


async def show_given_status(api, page) -> dict:
    status = given_status(await (await api.get("/admin/v1/status")).json())
    await page.hold("/admin/v1/status")
    answering = asyncio.ensure_future(page.answer_each(status))
    await page.open(str(api.make_url("/")))
    await page.until("document.querySelector('#models tr[data-model=\"e\"]')", "the given status drawn")
    return answering


def cells(model: str) -> str:
    return ("Object.fromEntries(['waiting', 'idle', 'in-flight', 'keep-alive'].map((f) => [f, document.querySelector("
            f"'#models tr[data-model=\"{model}\"] [data-field=\"' + f + '\"]').textContent]))")


async def test_the_models_table_shows_idle_in_flight_what_it_waits_for_and_keep_alive(api, browser, tmp_path):
    answering = await show_given_status(api, browser)
    try:
        await keep_screenshot(browser, tmp_path / "dashboard-given-status.png")
        assert await browser.evaluate(cells("a")) == {
            "waiting": "–", "idle": "1 min 15 s", "in-flight": "2", "keep-alive": "in 3 min 45 s"}
        assert await browser.evaluate(cells("b")) == {
            "waiting": "room on gpu0: a is serving3 requests · until a finishes · weighed again in 20 s",
            "idle": "–", "in-flight": "0", "keep-alive": "–"}
        assert await browser.evaluate(state_of("b")) == "waiting"
        # A lessord without the new fields: a dash, not "undefined" or an error.
        assert await browser.evaluate(cells("c")) == {"waiting": "–", "idle": "5 s", "in-flight": "0", "keep-alive": "–"}
        assert await browser.evaluate(cells("d")) == {"waiting": "–", "idle": "1 h 2 min", "in-flight": "0",
                                                      "keep-alive": "never"}
        assert (await browser.evaluate(cells("e")))["keep-alive"] == "pinned"
    finally:
        answering.cancel()


# Every colour a computed style names, as [r, g, b] lists.
RGB = "(css) => [...css.matchAll(/rgba?\\(([^)]*)\\)/g)].map((m) => m[1].split(',').slice(0, 3).map(Number))"


async def test_each_bar_segment_looks_exactly_as_its_legend_swatch(api, browser):
    answering = await show_given_status(api, browser)
    try:
        pairs = await browser.evaluate("""[...document.querySelectorAll('.bar [data-segment]')].map((seg) => {
            const device = seg.closest('[data-device]');
            const label = seg.dataset.segment;
            const swatch = [...device.querySelectorAll('[data-swatch]'), ...document.querySelectorAll('#legend [data-swatch]')]
                .find((s) => s.dataset.swatch === label);
            const look = (n) => n && ['backgroundColor', 'backgroundImage', 'backgroundSize', 'opacity']
                .map((p) => getComputedStyle(n)[p]).join(' | ');
            return [device.dataset.device, label, look(seg), look(swatch)];
        })""")
        labels = [label for device, label, _, _ in pairs if device == "gpu0"]
        assert labels == ["foreign", "headroom", "a weights", "a kv", "a load_peak", "a reserve", "d weights"], labels
        for device, label, bar, legend in pairs:
            assert legend == bar, f"{device} {label}: the bar draws {bar}, its legend {legend}"
        assert len({bar for _, _, bar, _ in pairs}) == len(set(labels)), "two segments look alike"
    finally:
        answering.cancel()


async def test_headroom_is_drawn_in_a_calm_neutral_and_red_still_means_something_is_wrong(api, browser):
    """Headroom is memory kept free on purpose: neutral (no channel far from the others) in the bar and
    the chart, unlike the red of an error."""
    page = browser
    await page.open(str(api.make_url("/")))
    await page.until("document.querySelector('.bar .seg.headroom') && document.querySelector('svg.chart')", "a bar and a chart")
    looks = await page.evaluate(f"""(() => {{ const rgb = {RGB};
        const css = (sel, prop) => {{ const n = document.querySelector(sel); return n ? getComputedStyle(n)[prop] : ''; }};
        return {{bar: rgb(css('.bar .seg.headroom', 'backgroundColor') + css('.bar .seg.headroom', 'backgroundImage')),
                 chart: rgb(css('svg.chart .headroom', 'fill') + css('svg.chart .hatch-line', 'fill')),
                 alarm: rgb(css('.error', 'color'))}}; }})()""")
    for where in ("bar", "chart"):
        assert looks[where], f"no headroom colour in the {where}"
        for colour in looks[where]:
            assert max(colour) - min(colour) < 40, f"the {where} draws headroom in rgb{tuple(colour)}, not a neutral colour"
    assert max(looks["alarm"][0]) - min(looks["alarm"][0]) >= 40  # red still says something is wrong
