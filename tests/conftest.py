"""The fixtures every tier shares: a real PostgreSQL server the tests start themselves, the ledger
on SQLite and on PostgreSQL, the runtime with its engines faked at the process boundary, the router
in front of a stand-in upstream, a real mosquitto, the tiny models. What they are built from (and
what tests import) is in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.pgcluster import postgres_cluster, postgres_server
from lessor.daemon.units import GiB

from .support.configs import sim_config, torch_model
from .support.fakes import FakeAdapter, FakeEngines
from .support.ledger import drop_ledger_tables
from .support.mqtt import Broker
from .support.postgres import server_bindir
from .support.router import Upstream, close_made, serve_router


@pytest.fixture(autouse=True)
def _umask_kept():
    """lessord's main() sets its umask (027) for the process: a test that runs it in-process would
    leave later tests' files unreadable to the servers they start (mosquitto reads as its own user)."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


# -- PostgreSQL: a private cluster per test session --------------------------------------------

@pytest.fixture(scope="session")
def postgres_url():
    with postgres_cluster(server_bindir()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        await drop_ledger_tables(url)
        yield url


# -- lessord's parts in this process, engines faked ------------------------------------------------

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


@pytest.fixture
async def front(tmp_path, aiohttp_server):
    """make(models, **router config) -> (controller, upstream, client session, router port): the
    router on a loopback port in front of the runtime, whose fake engines serve from `Upstream`."""
    from lessor.daemon.runtime import runtime

    made = []

    async def make(models=None, **router_config):
        upstream = Upstream()
        upstream_server = await aiohttp_server(upstream.app())
        config = sim_config(tmp_path, models or [torch_model("a", aliases=["alpha"]), torch_model("b")],
                            router=router_config)

        def engines(probe, ledger):  # the fake engines serve from the stand-in upstream
            upstream.adapter = FakeAdapter(probe, ledger)
            upstream.adapter.base_url = str(upstream_server.make_url("")).rstrip("/")
            return {"torch": upstream.adapter}
        ctx = runtime(config, engines=engines)
        controller = await ctx.__aenter__()
        made.append(ctx)
        _, server, session = await serve_router(controller, made)
        return controller, upstream, session, server.port

    yield make
    await close_made(made)


@pytest.fixture
def gib():
    return GiB


# -- real servers: mosquitto, PostgreSQL -------------------------------------------------------

@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def pg_server():
    """A PostgreSQL server of the test's own: pausing or restarting it disturbs no other test."""
    with postgres_server(server_bindir()) as server:
        yield server


# -- the tiny models ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def measure_model(tmp_path_factory) -> Path:
    """A random bf16 Qwen2 of 291 MB (bench/torch_measure.py), large enough to measure; written once per session."""
    from bench import torch_measure

    return torch_measure.write_model(tmp_path_factory.mktemp("models") / "qwen2-291mb")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """The project's tiny Qwen2 model, written once per test session (no download)."""
    from lessor.engines.tiny_qwen import write

    return write(tmp_path_factory.mktemp("models") / "tiny-qwen")
