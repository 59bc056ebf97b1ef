"""Elastic KV end to end: lessord --sim with two models on the built-in torch engine. The second
load goes through by shrinking the first model's KV cache (the engine resized in place, its lease
smaller in the ledger), and once the second is unloaded the first grows back to its plan."""

import json
import time
import urllib.request

import pytest

from lessor.daemon.planning.rejections import ModelsBusy
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB, MiB
from lessor.engines.base import KvResizeRefused

from ..support.clients import Admin, chat, wait_for
from ..support.configs import sim_config, torch_model, write_config
from ..support.fakes import FakeAdapter, FakeEngines, FakeHandle
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S, drain_events

KV_PER_TOKEN = MiB


def elastic_spec(name: str, model_path, weights: str) -> dict:
    return {"name": name, "engine": {"kind": "torch", "model_path": str(model_path), "dtype": "float32"},
            "memory": {"weights": weights, "kv_bytes_per_token": KV_PER_TOKEN, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 256, "max_kv_tokens": 2048, "max_batch_size": 2}}


def kv_lease(admin: Admin, model: str) -> int:
    return sum(lease["bytes"] for lease in admin.leases(model) if lease["kind"] == "kv")


def engine_tokens(model: dict) -> int:
    """The KV tokens the engine itself says it holds (all sequences)."""
    with urllib.request.urlopen(model["endpoint"] + "/lessor/v1/state", timeout=HANG_S) as r:
        state = json.loads(r.read())
    return state["context_tokens"] * state["max_batch_size"]


def engine_reaches(model: dict, tokens: int) -> int:
    """A grow takes the lease first, then resizes the engine: its state says so once that is done
    (polled, the deadline only a guard against a hang)."""
    deadline = time.monotonic() + HANG_S
    while (held := engine_tokens(model)) != tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def test_a_load_goes_through_by_shrinking_an_idle_models_kv_cache_which_grows_back(tmp_path, tiny_qwen):
    # 6.5 GiB leasable: qa takes 3 GiB of weights and a 2 GiB KV cache; qb's 2 GiB of weights and
    # its smallest KV cache fit only if qa gives some of its cache back (evicting qa is not needed).
    config = write_config(tmp_path, [elastic_spec("qa", tiny_qwen, "3GiB"), elastic_spec("qb", tiny_qwen, "2GiB")],
                          reconciler={"interval": "200ms"})
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        status, qa = admin.load("qa")
        assert status == 200 and qa["state"] == "ready", qa
        planned = kv_lease(admin, "qa")
        assert planned == 2048 * KV_PER_TOKEN and engine_tokens(qa) == 2048
        events = admin.events()

        status, qb = admin.load("qb")
        assert status == 200 and qb["state"] == "ready", qb
        admitted, _ = wait_for(events, "admission", HANG_S, model="qb")
        assert admitted["result"] == "evict" and admitted["victims"] == [], admitted
        shrunk, _ = wait_for(events, "lease_resized", HANG_S, model="qa", reason="shrunk for 'qb'")
        assert admin.model("qa")["state"] == "ready"
        held = kv_lease(admin, "qa")
        assert shrunk["from_bytes"] == planned and shrunk["bytes"] == held
        assert 256 * KV_PER_TOKEN <= held < planned
        assert engine_tokens(admin.model("qa")) * KV_PER_TOKEN == held  # the engine holds what is leased
        assert chat(admin.model("qa")["endpoint"], "still there?")["choices"]

        status, _ = admin.call("POST", "/admin/v1/models/qb", {"action": "unload"})
        assert status == 200
        grown, _ = wait_for(events, "lease_resized", HANG_S, model="qa", bytes=planned)
        assert grown["from_bytes"] == held and grown["reason"] == "memory idle: grown back"
        assert kv_lease(admin, "qa") == planned and engine_reaches(admin.model("qa"), 2048) == 2048
        assert chat(admin.model("qa")["endpoint"], "and now?")["choices"]


# -- the daemon's side, the engine process faked at its boundary (tests/conftest.py) -------------

class ResizingHandle(FakeHandle):
    """A fake two-phase engine that resizes its KV cache in place, or refuses when told to."""

    resizes_kv = True

    async def resize_kv(self, kv_tokens: int, leased_bytes) -> int:
        if self.adapter.refuse_resize:
            raise KvResizeRefused("1 request(s) still ran after waiting 30 s")
        self.kv_tokens = kv_tokens
        self._use(self.spec.profile().weights + kv_tokens * 65536)
        return kv_tokens


class ResizingAdapter(FakeAdapter):
    refuse_resize = False

    async def start(self, launch):
        handle = await super().start(launch)
        handle.__class__ = ResizingHandle
        return handle


@pytest.fixture
async def elastic_env(tmp_path):
    """Two models on 15 GiB leasable: `a` (8 GiB of weights, a 1 GiB KV cache) loaded first; `b`
    (5.5 GiB of weights, a 1 GiB load peak) is 0.5 GiB short, which a's cache can give back."""
    engines = FakeEngines(ResizingAdapter)
    ctx = runtime(sim_config(tmp_path, [torch_model("a", "8GiB"), torch_model("b", "5632MiB")]), engines=engines)
    controller = await ctx.__aenter__()
    await controller.load("a")
    yield controller, engines.adapter, controller.bus.subscribe()
    await ctx.__aexit__(None, None, None)


def kv_of(controller, model: str) -> int:
    return sum(lease.bytes for lease in controller.ledger.leases() if lease.model == model and lease.kind.value == "kv")


async def test_a_shrink_the_engine_refuses_changes_nothing_and_the_load_waits(elastic_env):
    controller, adapter, events = elastic_env
    planned = kv_of(controller, "a")
    adapter.refuse_resize = True
    with pytest.raises(ModelsBusy, match="a model to shrink took a request"):
        await controller.load("b")
    assert kv_of(controller, "a") == planned and controller.model("a")["state"] == "ready"
    assert controller.model("b")["state"] == "unloaded" and drain_events(events, "lease_resized") == []

    adapter.refuse_resize = False  # idle again: the next load shrinks it
    await controller.load("b")
    assert controller.model("a")["state"] == "ready" and controller.model("b")["state"] == "ready"
    shrunk = kv_of(controller, "a")
    assert planned - shrunk >= GiB // 2 and adapter.handles[0].kv_tokens * 65536 == shrunk


async def test_a_grow_the_engine_refuses_gives_the_lease_back(elastic_env):
    controller, adapter, events = elastic_env
    planned = kv_of(controller, "a")
    await controller.load("b")
    shrunk = kv_of(controller, "a")
    await controller.reconciler.check()  # b holds the memory: nothing to grow into
    assert kv_of(controller, "a") == shrunk
    await controller.unload("b")
    drain_events(events, None)

    adapter.refuse_resize = True
    await controller.reconciler.check()
    assert kv_of(controller, "a") == shrunk
    assert [(e.from_bytes, e.bytes) for e in drain_events(events, "lease_resized")] == [(shrunk, planned),
                                                                                        (planned, shrunk)]
    adapter.refuse_resize = False
    await controller.reconciler.check()
    assert kv_of(controller, "a") == planned and adapter.handles[0].kv_tokens == 16384


async def test_a_snapshot_says_what_a_resizable_idle_model_could_give_back(elastic_env):
    controller, _, _ = elastic_env
    view = controller.supervisor.policy_snapshot().models
    assert view["a"].kv_spare_bytes == {"gpu0": (16384 - 1024) * 65536} and view["b"].kv_spare_bytes == {}


async def test_no_grow_while_a_load_holds_the_device(elastic_env):
    controller, _, _ = elastic_env
    planned = kv_of(controller, "a")
    await controller.load("b")
    await controller.unload("b")
    shrunk = kv_of(controller, "a")
    async with controller.supervisor.loads.device_locks.of("gpu0"):  # as a load from admission to ready holds it
        await controller.reconciler.check()
        assert kv_of(controller, "a") == shrunk < planned
    await controller.reconciler.check()
    assert kv_of(controller, "a") == planned
