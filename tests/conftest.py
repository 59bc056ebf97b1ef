"""Shared fixtures: simulated configs, a real PostgreSQL server the tests start themselves, a fake
engine at the process boundary (the only place, besides the simulated probe, where tests fake)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from lessor.daemon.config.schema import LessorConfig, parse_config
from lessor.daemon.units import GiB

from bench.pgcluster import free_port, pg_bindir, postgres_cluster  # noqa: F401 (free_port: for the tests)


@pytest.fixture(autouse=True)
def _umask_kept():
    """lessord's main() sets its umask (027) for the process: a test that runs it in-process would
    leave later tests' files unreadable to the servers they start (mosquitto reads as its own user)."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


ROOT = Path(__file__).resolve().parent.parent
# How long a test waits for what should happen before calling it a hang. Only a guard: nothing in
# a normal run, on however busy a machine, comes near it (tests wait on the event, not a window).
HANG_S = 600.0


def sim_config(tmp_path: Path, models: list[dict] | None = None, gpus: list[dict] | None = None,
               policy: str = "lru_idle", **extra) -> LessorConfig:
    data = {
        "state_dir": str(tmp_path / "state"),
        "devices": {"probe": "sim", "headroom": "1GiB",
                    "simulated": gpus or [{"name": "sim24", "total": "24GiB", "foreign": "8GiB"}],
                    "host": {"headroom": "4GiB", "simulated_total": "64GiB"}},
        "policy": {"name": policy},
        "models": models or [],
        **extra,
    }
    return parse_config(data)


def torch_model(name: str, weights: str = "4GiB", **extra) -> dict:
    return {"name": name, "engine": {"kind": "torch", "model_path": f"/models/{name}"},
            "memory": {"weights": weights, "kv_bytes_per_token": 65536, "load_peak": "1GiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 16384}, **extra}


# -- PostgreSQL: a private cluster per test session --------------------------------------------

@pytest.fixture(scope="session")
def postgres_url():
    bindir = pg_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does)"
        if os.environ.get("LESSOR_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    with postgres_cluster(bindir) as url:
        yield url


async def drop_ledger_tables(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from lessor.daemon.ledger.database import metadata

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        await drop_ledger_tables(url)
        yield url


# -- a fake engine at the process boundary ------------------------------------------------------

class FakeProcess:
    """What the supervisor reads of an engine's process: its exit status (None: running) and log."""

    returncode: int | None = None
    log: list[str] = []

    def tail(self, lines: int = 50) -> list[str]:
        return self.log[-lines:]


class FakeHandle:
    """Stands in for an engine process: reports its usage to the simulated probe like NVML would."""

    def __init__(self, adapter: "FakeAdapter", spec, params, kv_tokens: int, pid: int) -> None:
        self.adapter, self.spec, self.params, self.pid = adapter, spec, params, pid
        self.identity = f"fake:{pid}"  # never a live process's identity: a restart finds it gone
        self.started_at = time.time()
        self.base_url = adapter.base_url or f"http://127.0.0.1:{pid % 50000 + 10000}"
        self.kv_tokens = None
        self.stopped = False
        self.engine_times: dict[str, float] = {}
        self.process = FakeProcess()

    def _use(self, nbytes: int) -> None:
        self.adapter.probe.set_process_usage("gpu0", self.pid, nbytes)

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        adapter = self.adapter
        adapter.loading += 1
        adapter.max_loading = max(adapter.max_loading, adapter.loading)
        try:
            self._use(self.spec.profile().weights + self.spec.profile().load_peak)
            adapter.seen.append(("weights", self.spec.name, adapter.ledger.snapshot()))
            if adapter.gate is not None:  # the test decides when the weights are in
                await adapter.gate.wait()
            else:
                await asyncio.sleep(adapter.load_delay_s)
            if adapter.during_weights:
                adapter.during_weights(self)
            if adapter.fail_at == "weights":
                raise RuntimeError("engine exited with code 1 while loading weights")
            self._use(self.spec.profile().weights)
        finally:
            adapter.loading -= 1

    async def allocate_kv(self, kv) -> None:
        kv_tokens, kv_bytes = kv.tokens, kv.bytes
        self.kv_tokens = kv_tokens
        self.adapter.seen.append(("kv", self.spec.name, self.adapter.ledger.snapshot()))
        if self.adapter.fail_at == "kv":
            raise RuntimeError("CUDA out of memory while allocating the KV cache")
        self._use(self.spec.profile().weights + kv_bytes)

    async def wait_ready(self, timeout_s: float) -> None:
        if self.adapter.fail_at == "ready":
            raise TimeoutError(f"not ready after {timeout_s} s")

    async def measure(self) -> dict[str, int]:
        self.adapter.measures += 1  # each sample of the load asks: a test can wait for one
        return dict(self.adapter.measured)

    async def stop(self, grace_s: float) -> None:
        self.stopped = True
        self._use(0)
        if self.adapter.on_stop:
            self.adapter.on_stop(self)


class FakeAdapter:
    kind = "torch"
    two_phase = True

    def __init__(self, probe, ledger=None) -> None:
        self.probe, self.ledger = probe, ledger
        self.fail_at: str | None = None
        self.during_weights = None
        self.on_stop = None  # called with the handle once its engine stopped
        self.gate: asyncio.Event | None = None  # set: loads wait for it instead of load_delay_s
        self.loading = self.max_loading = 0
        self.load_delay_s = 0.01
        self.seen: list = []
        self.handles: list[FakeHandle] = []
        self.measured: dict[str, int] = {}
        self.measures = 0
        self.launches: list = []
        self.base_url: str | None = None  # where handles say they serve (a stand-in upstream in router tests)

    async def start(self, launch):
        spec, params, kv_tokens = launch.spec, launch.params, launch.kv_tokens
        self.launches.append(launch)
        if self.fail_at == "start":
            raise FileNotFoundError(f"{spec.engine.model_path}: no such model folder")
        handle = FakeHandle(self, spec, params, kv_tokens, pid=900000 + len(self.handles))
        self.handles.append(handle)
        return handle


class FakeEngines:
    """An engine factory for `runtime(engines=...)`: one fake adapter (of `kind`) for the torch
    engine, made over the runtime's own probe and ledger; `.adapter` once the runtime is up."""

    def __init__(self, kind: type = None) -> None:
        self.kind = kind or FakeAdapter
        self.adapter = None

    def __call__(self, probe, ledger) -> dict:
        self.adapter = self.kind(probe, ledger)
        return {"torch": self.adapter, "vllm": self.adapter}  # vllm: a one-phase spec (the plan differs, not the fake)


@pytest.fixture
async def env(tmp_path):
    """make(models, policy, gpus, **config) -> (controller, fake adapter, event queue): the real
    runtime (ledger, supervisor, policies) with the engine process faked."""
    from lessor.daemon.runtime import runtime

    made = []

    async def make(models, policy="lru_idle", gpus=None, clock=None, **extra):
        engines = FakeEngines()
        ctx = runtime(sim_config(tmp_path, models, gpus=gpus, policy=policy, **extra), engines=engines,
                      **({"clock": clock} if clock else {}))
        controller = await ctx.__aenter__()
        made.append(ctx)
        return controller, engines.adapter, controller.bus.subscribe()
    yield make
    for ctx in made:
        await ctx.__aexit__(None, None, None)


async def until(condition, what: str = "the condition", hang_s: float = HANG_S) -> None:
    """Wait until `condition()` holds, looking again each time the loop has run others' work.
    `hang_s` only turns a hang into a failure: a slow machine never reaches it in normal runs."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + hang_s
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"{what} never held ({hang_s:g} s)")
        await asyncio.sleep(0.005)


def until_sync(check, what: str) -> None:
    """`until` for a test without an event loop: poll `check` until it holds; the deadline only
    turns a hang into a failure."""
    deadline = time.monotonic() + HANG_S
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


def drain_events(queue, kind="model_state"):
    """The events of one type (None: all) waiting in a bus subscription, in order; the others are dropped."""
    out = []
    while not queue.empty():
        event = queue.get_nowait()
        if kind is None or event.type == kind:
            out.append(event)
    return out


@pytest.fixture
def gib():
    return GiB


# -- real processes: lessord, the tiny model ----------------------------------------------------

BIN = Path(sys.executable).parent


@contextmanager
def running_lessord(config_path: Path, *args: str, timeout_s: float = HANG_S, output: Path | None = None,
                    env: dict[str, str] | None = None, not_ready: bool = False):
    """lessord as operators run it (simulated devices), on free ports; yields (process, admin url, router url).
    `output`: a file for its stdout and stderr (a pipe nobody reads would block a chatty daemon).
    `not_ready`: yield once /readyz answers 503 for a reason other than the start (a pinned model failed)."""
    port, router_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}, **(env or {})}
    sink = open(output, "w") if output else subprocess.PIPE
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config_path), "--sim",
                             "--admin-listen", f"127.0.0.1:{port}", "--router-listen", f"127.0.0.1:{router_port}", *args],
                            stdout=sink, stderr=subprocess.STDOUT if output else subprocess.PIPE, text=True, env=env)
    if output:
        sink.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                if not_ready and not json.loads(exc.read()).get("reason", "").startswith("starting"):
                    break
                time.sleep(0.1)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"lessord did not start: {proc.communicate()}")
                time.sleep(0.1)
        yield proc, url, f"http://127.0.0.1:{router_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(HANG_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def measure_model(tmp_path_factory) -> Path:
    """A random bf16 Qwen2 of 291 MB (bench/torch_measure.py), large enough to measure; written once per session."""
    from lessor.bench import torch_measure

    return torch_measure.write_model(tmp_path_factory.mktemp("models") / "qwen2-291mb")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """The project's tiny Qwen2 model, written once per test session (no download)."""
    from lessor.engines.tiny_qwen import write

    return write(tmp_path_factory.mktemp("models") / "tiny-qwen")
