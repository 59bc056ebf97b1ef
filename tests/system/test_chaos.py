"""The chaos storm (real lessord, real stand-in engines, the simulated GPU): concurrent router
clients, an operator loading and unloading, foreign usage moved up and down, engines killed with
SIGKILL and lessord killed with SIGKILL then started again on the same state folder. After it
settles, the ledger, the engines running and the API must agree, and the event stream, replayed,
must show no grant over the device's budget.

A fixed number of operations, paced by the requests answered (never by the clock); the choices
come from one seed (printed; LESSOR_CHAOS_SEED sets it), LESSOR_CHAOS_SCALE multiplies the storm."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from lessor.daemon.units import GiB, MiB

from ..support.lessord import running_lessord
from ..support.paths import STANDIN
from ..support.waiting import HANG_S

pytestmark = pytest.mark.chaos

SCALE = max(1, int(os.environ.get("LESSOR_CHAOS_SCALE", "1")))
MODELS = ["m0", "m1", "m2", "m3"]  # 4.3 GiB each, 14 GiB leasable: three fit, never four
TOTAL, HEADROOM, FOREIGN = 16 * GiB, 1 * GiB, 1 * GiB  # the simulated GPU of the config
# Up to 10 GiB: then not one model fits, and the ready ones are over the budget (overcommitted).
FOREIGN_STEPS = [0, 1 * GiB, 2 * GiB, 3 * GiB, 4 * GiB, 6 * GiB, 10 * GiB]
STABLE = {"ready", "unloaded", "failed"}
ADMIN_5XX = {"models_busy", "not_enough_memory"}


def chaos_config(tmp_path: Path) -> Path:
    models = [{"name": name, "keep_alive": -1,
               "engine": {"kind": "vllm", "model_path": f"/models/{name}", "command": [sys.executable, STANDIN]},
               "memory": {"weights": "4GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
               "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096},
               "restart": {"policy": "on-failure", "backoff": 0.5, "max_restarts": 3}} for name in MODELS]
    config = {"state_dir": str(tmp_path / "state"), "policy": {"name": "lru_idle"},
              "devices": {"probe": "sim", "headroom": "1GiB",
                          "simulated": [{"name": "sim16", "total": "16GiB", "foreign": "1GiB"}]},
              "admin": {"sse_keepalive_s": 0.5}, "reconciler": {"interval": 0.5}, "timeouts": {"stray_grace_s": 2, "stop_grace": 5},
              "models": models}
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Daemon:
    """One lessord of the run: its process and addresses; `killed` once the storm SIGKILLed it."""
    gen: int
    proc: object
    admin: str
    router: str
    token: str
    killed: bool = False


@dataclass
class Storm:
    session: aiohttp.ClientSession
    config: Path
    state: Path
    stack: ExitStack
    seed: int
    daemon: Daemon | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    events: list = field(default_factory=list)  # (generation, event dict), in the order received
    bases: dict = field(default_factory=dict)  # generation -> (index into events, the leases the API listed)
    answered: int = 0
    waiters: list = field(default_factory=list)
    router_statuses: Counter = field(default_factory=Counter)
    admin_statuses: Counter = field(default_factory=Counter)
    cut: Counter = field(default_factory=Counter)  # requests whose lessord was SIGKILLed under them
    kills: list = field(default_factory=list)  # (model, pid)
    # What may cut a request to a model's engine, and what each request to it saw, as steps of one
    # counter (an order, never a time): {model: [step]}, {model: [(sent, answered)]} of the 200s.
    disruptions: dict = field(default_factory=lambda: defaultdict(list))
    served: dict = field(default_factory=lambda: defaultdict(list))
    steps: int = 0
    explained_502: Counter = field(default_factory=Counter)
    bad_502: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    restarts: int = 0
    at_kill: Counter = field(default_factory=Counter)  # what the killed lessords were doing, per model state
    adoptions: Counter = field(default_factory=Counter)  # what the restarted ones found
    messages_503: Counter = field(default_factory=Counter)  # the router's 503 messages, each once
    readers: list = field(default_factory=list)
    closing: bool = False

    # -- pacing: operation k of n waits for its share of the requests answered -----------------

    def answer(self) -> None:
        self.answered += 1
        for threshold, future in list(self.waiters):
            if self.answered >= threshold and not future.done():
                future.set_result(None)
        self.waiters = [(t, f) for t, f in self.waiters if not f.done()]

    async def paced(self, k: int, n: int, total: int) -> None:
        threshold = (k + 1) * total // (n + 1)
        if self.answered < threshold:
            future = asyncio.get_running_loop().create_future()
            self.waiters.append((threshold, future))
            await future
        await self.up.wait()

    # -- lessord ---------------------------------------------------------------------------------

    async def start(self) -> None:
        gen = len(self.bases)
        output = self.state.parent / f"lessord-{gen}.log"
        proc, admin, router = await asyncio.to_thread(self.stack.enter_context, running_lessord(self.config, "--log-level", "INFO", output=output))
        self.daemon = Daemon(gen, proc, admin, router, (self.state / "admin.token").read_text().strip())
        connected = asyncio.Event()
        self.readers.append(asyncio.ensure_future(self._read_events(self.daemon, connected)))
        await asyncio.wait_for(connected.wait(), HANG_S)
        # The replay of this generation starts from what the ledger holds once subscribed.
        self.bases[gen] = (len(self.events), await self._get("/admin/v1/leases"))
        self.up.set()

    async def kill_and_restart(self) -> None:
        self.up.clear()
        self.at_kill.update(state_of(self, self.daemon.gen).values())
        self.daemon.killed = True
        self.daemon.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.daemon.proc.wait, HANG_S)
        self.restarts += 1
        began = time.monotonic()
        await self.start()
        print(f"chaos: lessord #{self.daemon.gen} serves {time.monotonic() - began:.1f} s after the SIGKILL")
        async with self.session.get(self.daemon.admin + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("lessor_engine_adoptions_total{"):
                    self.adoptions[line.split('"')[1]] += int(float(line.rsplit(" ", 1)[1]))

    async def _read_events(self, daemon: Daemon, connected: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {daemon.token}"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self.session.get(daemon.admin + "/admin/v1/events", headers=headers, timeout=timeout) as r:
                async for line in r.content:
                    if line.startswith(b": connected"):
                        connected.set()
                    elif line.startswith(b"data: "):
                        self.events.append((daemon.gen, json.loads(line[6:])))
        except aiohttp.ClientError:
            pass
        if not (daemon.killed or self.closing):
            self.problems.append(f"the event stream of lessord #{daemon.gen} ended while it ran")

    async def _get(self, path: str):
        async with self.session.get(self.daemon.admin + path) as r:
            assert r.status == 200, (path, r.status, await r.text())
            return await r.json()

    async def admin(self, method: str, path: str, body=None) -> tuple[int, dict] | None:
        """None: the lessord it was sent to was SIGKILLed under it."""
        daemon = self.daemon
        headers = {"Authorization": f"Bearer {daemon.token}"}
        try:
            async with self.session.request(method, daemon.admin + path, json=body, headers=headers) as r:
                data = await r.json(content_type=None)
                code = data.get("error", {}).get("type", "") if r.status >= 400 else ""
                self.admin_statuses[(method, r.status, code)] += 1
                if r.status >= 500 and not (r.status == 503 and code in ADMIN_5XX):
                    self.problems.append(f"admin {method} {path} {body}: {r.status} {data}")
                if r.status == 503 and "Retry-After" not in r.headers:
                    self.problems.append(f"admin {method} {path}: 503 without Retry-After: {data}")
                return r.status, data
        except aiohttp.ClientError as exc:
            self._cut(daemon, f"admin {method} {path}", exc)
            return None

    def step(self) -> int:
        self.steps += 1
        return self.steps

    def disrupt(self, model: str, how: str) -> None:
        self.disruptions[model].append((self.step(), how))

    def _explained(self, model: str, sent: int, answered: int) -> str | None:
        """Why a 502 for `model` is the storm's doing: its engine was killed or unloaded while the
        request ran, or before it and nothing served the model since (its exit not yet noticed)."""
        for at, how in self.disruptions[model]:
            if sent <= at <= answered:
                return how
        earlier = [(at, how) for at, how in self.disruptions[model] if at < sent]
        if earlier and not any(earlier[-1][0] < s and a < sent for s, a in self.served[model]):
            return earlier[-1][1]
        return None

    def _cut(self, daemon: Daemon, what: str, exc: Exception) -> None:
        if daemon.killed:
            self.cut[what.split()[0]] += 1
        else:
            self.problems.append(f"{what}: {exc!r} while lessord #{daemon.gen} ran")

    # -- the storm's actors ------------------------------------------------------------------------

    async def client(self, i: int, requests: int) -> None:
        rng = random.Random(f"{self.seed}-client-{i}")
        for _ in range(requests):
            model = rng.choice(MODELS)
            await self.up.wait()
            daemon = self.daemon
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            sent = self.step()
            try:
                async with self.session.post(daemon.router + "/v1/chat/completions", json=body) as r:
                    try:
                        raw = await r.read()
                    except aiohttp.ClientPayloadError as exc:  # the answer began, then its engine died?
                        self._cut_answer(model, daemon, r.status, exc, sent)
                    else:
                        self._judge(model, r.status, r.headers, raw, sent, self.step())
            except aiohttp.ClientError as exc:
                self._cut(daemon, f"router {model}", exc)
            self.answer()

    def _cut_answer(self, model: str, daemon: Daemon, status: int, exc: Exception, sent: int) -> None:
        self.router_statuses[(status, "cut mid-answer")] += 1
        why = self._explained(model, sent, self.step())
        if why:
            self.explained_502[why] += 1
        elif not daemon.killed:
            self.problems.append(f"router {model}: a {status} cut mid-answer ({exc!r}), no kill nor unload explains it")

    def _judge(self, model: str, status: int, headers, raw: bytes, sent: int, answered: int) -> None:
        data = json.loads(raw) if raw[:1] == b"{" else {}
        code = (data.get("error") or {}).get("code") or "" if status >= 400 else ""
        self.router_statuses[(status, code)] += 1
        if status == 200:
            content = data["choices"][0]["message"]["content"]
            self.served[model].append((sent, answered))
            if content != f"stand-in for {model}":
                self.problems.append(f"a request for {model} was answered by another engine: {content!r}")
        elif status == 502:
            # Only a request whose engine the storm killed under it.
            why = self._explained(model, sent, answered)
            if why:
                self.explained_502[why] += 1
            else:
                self.bad_502.append((model, self.daemon.gen, len(self.events), raw[:300]))
        elif status == 503 and code == "model_failed":
            # lessor gave up after max_restarts crashes (the storm's kills): answered without
            # Retry-After on purpose, since waiting does not help until an operator's load.
            self.messages_503["model_failed (gave up after the kills)"] += 1
        elif status >= 500 and not (status == 503 and "Retry-After" in headers):
            self.problems.append(f"router {model}: {status} {raw[:300]!r}")
        elif status == 503:
            self.messages_503[data["error"]["message"]] += 1

    async def operator(self, n: int, total: int) -> None:
        rng = random.Random(f"{self.seed}-operator")
        for k in range(n):
            await self.paced(k, n, total)
            model, action = rng.choice(MODELS), rng.choice(["load", "load", "unload"])
            if action == "unload":
                self.disrupt(model, "unload")
            await self.admin("POST", f"/admin/v1/models/{model}", {"action": action})

    async def foreigner(self, n: int, total: int) -> None:
        rng = random.Random(f"{self.seed}-foreign")
        for k in range(n):
            await self.paced(k, n, total)
            await self.admin("PUT", "/admin/v1/devices/gpu0/foreign", {"foreign_bytes": rng.choice(FOREIGN_STEPS)})

    async def killer(self, n: int, total: int) -> None:
        rng = random.Random(f"{self.seed}-killer")
        for k in range(n):
            await self.paced(k, n, total)
            try:
                models = await self._get("/admin/v1/models")
            except aiohttp.ClientError as exc:
                self._cut(self.daemon, "admin GET /admin/v1/models", exc)
                continue
            ready = sorted((m["name"], m["pid"]) for m in models if m["state"] == "ready" and m["pid"])
            if not ready:
                continue
            model, pid = rng.choice(ready)
            if pid in standin_pids(self.state):  # still that engine, never a pid recycled meanwhile
                self.kills.append((model, pid))
                self.disrupt(model, "SIGKILL")
                os.kill(pid, signal.SIGKILL)

    async def restarter(self, n: int, total: int) -> None:
        for k in range(n):
            await self.paced(k, n, total)
            await self.kill_and_restart()


def standin_pids(state: Path) -> set[int]:
    """The live stand-in engines of this state folder on the box (their environment names it)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if STANDIN not in (proc.info["cmdline"] or []) or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("LESSOR_STATE_DIR", "").rstrip("/") == str(state):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# -- the checks after it settles --------------------------------------------------------------------

def state_of(storm: Storm, gen: int) -> dict[str, str]:
    """Each model's last state in generation `gen`'s event stream."""
    return {e["model"]: e["state"] for g, e in storm.events if g == gen and e["type"] == "model_state"}


def pending_restart(storm: Storm) -> bool:
    """A crash whose restart lessor scheduled and nothing said of the model since."""
    last: dict[str, dict] = {}
    for gen, event in storm.events:
        if gen == storm.daemon.gen and "model" in event:
            last[event["model"]] = event
    return any(e["type"] == "engine_exited" and e.get("restart_in_s") is not None for e in last.values())


def steady(models: list) -> list:
    return [(m["name"], m["state"], m["pid"], m["leased_bytes"], m["in_flight"]) for m in models]


async def settle(storm: Storm) -> tuple[list, list]:
    """Poll (a safety net, not a timing) until every model is stable and idle, no restart is due,
    and two reads around an unchanged event count agree."""
    deadline = time.monotonic() + HANG_S
    while True:
        seen = len(storm.events)
        models = await storm._get("/admin/v1/models")
        if all(m["state"] in STABLE and not m["in_flight"] for m in models) and not pending_restart(storm):
            leases = await storm._get("/admin/v1/leases")
            again = await storm._get("/admin/v1/models")
            if len(storm.events) == seen and steady(again) == steady(models):
                return models, leases
        assert time.monotonic() < deadline, f"the storm never settled (seed {storm.seed}): {models}"
        await asyncio.sleep(0.05)


def replay(storm: Storm) -> tuple[dict, Counter]:
    """Leases per generation from the event stream, each grant checked against the budget: the
    bytes leased on the device after it must fit capacity − headroom − foreign, where foreign is
    the least it was since the ledger's previous change (the grant's check ran in that window; the
    events of one grant come in a row). Returns the last generation's leases, and figures."""
    figures: Counter = Counter()
    held: dict = {}
    for gen, (start, base) in sorted(storm.bases.items()):
        held = {lease["id"]: lease for lease in base}
        foreign = window = run_window = FOREIGN  # a new lessord's simulated GPU starts from the config's figure
        end = storm.bases[gen + 1][0] if gen + 1 in storm.bases else len(storm.events)
        previous: dict = {}
        for _, event in storm.events[start:end]:
            kind = event["type"]
            if kind == "foreign_usage":
                foreign = event["foreign_bytes"]
                window = min(window, foreign)
            elif kind == "lease_granted":
                if previous.get("type") != "lease_granted" or previous.get("model") != event["model"]:
                    run_window = window
                held.setdefault(event["lease_id"], event)  # a base lease was granted before the subscription
                figures["grants"] += 1
                leased = sum(lease["bytes"] for lease in held.values() if lease["device"] == event["device"])
                budget = TOTAL - HEADROOM - run_window
                figures["most leased (MiB)"] = max(figures["most leased (MiB)"], leased // MiB)
                if leased > budget:
                    storm.problems.append(f"grant {event} put {event['device']} at {leased} bytes leased, over its "
                                          f"budget {budget} (foreign {foreign}, least since the last change {run_window})")
            elif kind == "lease_released":
                held.pop(event["lease_id"], None)
            elif kind == "budget_overcommitted":
                figures["overcommitted"] += 1
            elif kind == "model_state" and event["state"] == "ready":
                figures["loads"] += 1
            elif kind == "admission" and event["result"] == "evict":
                figures["evictions"] += len(event["victims"])
            if kind in ("lease_granted", "lease_released"):
                window = foreign
            previous = event
    return held, figures


def check_agreement(storm: Storm, models: list, leases: list) -> None:
    by_model: dict[str, list] = defaultdict(list)
    for lease in leases:
        by_model[lease["model"]].append(lease)
    loaded = {m["name"] for m in models if m["state"] == "ready"}
    assert set(by_model) == loaded, f"leases held by {sorted(by_model)}, ready: {sorted(loaded)} (seed {storm.seed})"
    for name, held in by_model.items():
        assert len({lease["attempt"] for lease in held}) == 1, f"{name} holds leases of two attempts: {held}"
        kinds = [(lease["device"], lease["kind"]) for lease in held]
        assert len(kinds) == len(set(kinds)) and "load_peak" not in {k for _, k in kinds}, f"{name}: {held}"
        model = next(m for m in models if m["name"] == name)
        assert sum(model["leased_bytes"].values()) == sum(lease["bytes"] for lease in held)
    listed = {m["pid"] for m in models if m["pid"]}
    assert listed == {m["pid"] for m in models if m["state"] == "ready"}
    running = standin_pids(storm.state)
    assert listed <= running, f"engines the API lists but not running: {listed - running} (seed {storm.seed})"
    assert running <= listed, f"engines running but not in the API (orphans): {running - listed} (seed {storm.seed})"


def around(storm: Storm, model: str, at: int) -> list:
    """The model's events up to a moment of the stream, and a few after (what led to a failure)."""
    def said(event):
        return event.get("model") == model or model in event.get("victims", ())
    before = [e for _, e in storm.events[:at] if said(e)][-12:]
    return before + ["-- answered here --"] + [e for _, e in storm.events[at:] if said(e)][:4]


async def test_the_storm(tmp_path):
    seed = int(os.environ.get("LESSOR_CHAOS_SEED") or random.randrange(1 << 32))
    clients, requests = 12, 30 * SCALE
    total = clients * requests
    n_operator, n_foreign, n_kills, n_restarts = 40 * SCALE, 24 * SCALE, 12 * SCALE, SCALE
    print(f"\nchaos: seed {seed} (LESSOR_CHAOS_SEED={seed} replays its choices), scale {SCALE}")
    began = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=HANG_S)
    with ExitStack() as stack:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            storm = Storm(session, chaos_config(tmp_path), (tmp_path / "state").absolute(), stack, seed)
            try:
                await storm.start()
                await asyncio.gather(*(storm.client(i, requests) for i in range(clients)),
                                     storm.operator(n_operator, total), storm.foreigner(n_foreign, total),
                                     storm.killer(n_kills, total), storm.restarter(n_restarts, total))
                stormed = time.monotonic() - began
                print(f"chaos: the storm's operations done in {stormed:.1f} s")
                models, leases = await settle(storm)
                settled = time.monotonic() - began
                held, figures = replay(storm)
                check_agreement(storm, models, leases)
                assert set(held) == {lease["id"] for lease in leases}, \
                    f"the replayed leases differ from the ledger's: {set(held) ^ {lease['id'] for lease in leases}}"
            finally:
                storm.closing = True
                for reader in storm.readers:  # an open event stream would hold lessord's shutdown
                    reader.cancel()
                await asyncio.gather(*storm.readers, return_exceptions=True)
                await session.close()
                await asyncio.to_thread(stack.close)
    print(f"chaos: {total} requests {dict(sorted(storm.router_statuses.items()))}, cut by lessord's kill {dict(storm.cut)}")
    print(f"chaos: admin {dict(sorted(storm.admin_statuses.items()))}")
    print(f"chaos: {len(storm.kills)} engine SIGKILLs, {storm.restarts} lessord SIGKILL + restart, "
          f"{dict(figures)}, 502s cut by {dict(storm.explained_502)}, unexplained {len(storm.bad_502)}")
    print(f"chaos: at lessord's SIGKILL, models {dict(storm.at_kill)}; at its restart, engines {dict(storm.adoptions)}")
    negative = {m: n for m, n in storm.messages_503.items() if re.search(r"-[0-9.]+ [KMG]i?B", m)}
    print(f"chaos: {len(storm.messages_503)} distinct 503 messages, {sum(negative.values())} with a negative figure: "
          f"{list(negative)[:2]}")
    print(f"chaos: storm {stormed:.1f} s, settled at {settled:.1f} s, whole run {time.monotonic() - began:.1f} s")
    assert not storm.bad_502, "\n".join([f"502s no kill nor unload of their model explains (seed {seed}):", *(
        f"{model} (lessord #{gen}): {raw!r}; its last events: {around(storm, model, at)}"
        for model, gen, at, raw in storm.bad_502)])
    assert not storm.problems, "\n".join([f"seed {seed}:", *storm.problems[:30]])
    assert figures["grants"] and figures["loads"] and figures["evictions"], figures
