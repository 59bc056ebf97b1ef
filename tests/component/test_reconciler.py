"""The reconciler's periodic check, against the real ledger, supervisor and policies: engines over
their leases are reported (event, metric, API) or stopped; foreign processes that grow past what is
free make the policy evict idle models instead of an engine running out of memory."""

import asyncio
import logging
import shutil
from pathlib import Path

from lessor.api.admin import make_admin_app
from lessor.api.metrics import Metrics
from lessor.daemon.units import GiB

from ..support.configs import torch_model
from ..support.fakes import FakeAdapter
from ..support.waiting import HANG_S, drain_events


def leased(controller, model):
    return sum(controller.model(model)["leased_bytes"].values())


async def test_an_engine_over_its_leases_is_reported_after_two_checks_and_cleared_when_back(env):
    controller, adapter, events = await env([torch_model("a")])
    metrics = Metrics(controller)
    await controller.load("a")
    adapter.measured = {"gpu0": leased(controller, "a") + GiB}  # 1 GiB over, beyond the 5 % tolerance

    await controller.reconciler.check()
    assert drain_events(events, "lease_overrun") == [] and controller.model("a")["overrun"] is None  # one spike is not enough
    await controller.reconciler.check()
    (event,) = drain_events(events, "lease_overrun")
    assert event.over and event.action == "reported" and event.used_bytes - event.leased_bytes == GiB
    model = controller.model("a")
    assert model["state"] == "ready" and model["overrun"] == {"device": "gpu0", "used_bytes": event.used_bytes,
                                                               "leased_bytes": event.leased_bytes}
    text = metrics.render()[0].decode()
    assert 'lessor_lease_overruns_total{action="reported",model="a"} 1.0' in text
    assert 'lessor_model_overrun{model="a"} 1.0' in text
    await controller.reconciler.check()
    assert drain_events(events, "lease_overrun") == []  # reported once per crossing, not every check

    adapter.measured = {"gpu0": leased(controller, "a")}
    await controller.reconciler.check()
    (cleared,) = drain_events(events, "lease_overrun")
    assert not cleared.over and cleared.action == "cleared" and controller.model("a")["overrun"] is None


async def test_within_the_tolerance_is_not_an_overrun(env):
    controller, adapter, events = await env([torch_model("a")])
    await controller.load("a")
    adapter.measured = {"gpu0": leased(controller, "a") + 200 * (1 << 20)}  # 5 % of 5 GiB is 256 MiB
    for _ in range(3):
        await controller.reconciler.check()
    assert drain_events(events, "lease_overrun") == [] and controller.model("a")["overrun"] is None


async def test_on_overrun_stop_unloads_the_engine_and_releases_its_leases(env):
    controller, adapter, events = await env([torch_model("a"), torch_model("b")],
                                            reconciler={"on_overrun": "stop", "overrun_checks": 1})
    await controller.load("a")
    await controller.load("b")
    adapter.measured = {"gpu0": leased(controller, "a") + 2 * GiB}
    controller.supervisor.resolve("b").handle.adapter = FakeAdapter(controller.probe, controller.ledger)  # b reports nothing
    await controller.reconciler.check()
    (event,) = drain_events(events, "lease_overrun")
    assert event.model == "a" and event.action == "stopped"
    a = controller.model("a")
    assert a["state"] == "unloaded" and controller.leases("a") == [] and "overrun" in a["error"]
    assert adapter.handles[0].stopped and controller.model("b")["state"] == "ready"


async def test_foreign_growth_evicts_the_least_recently_used_idle_model(env):
    controller, _, events = await env([torch_model("a"), torch_model("b")])
    await controller.load("a")
    await controller.load("b")  # b used last
    # 24 GiB - 1 headroom - 8 foreign - 2 x 5 GiB leased = 5 GiB free; foreign grows by 6.
    controller.probe.set_foreign("gpu0", 14 * GiB)
    assert controller.ledger.budgets()["gpu0"].free_bytes == -GiB
    await controller.reconciler.check()
    (event,) = drain_events(events, "budget_overcommitted")
    assert event.device == "gpu0" and event.short_bytes == GiB and event.victims == ("a",)
    assert controller.model("a")["state"] == "unloaded" and controller.model("b")["state"] == "ready"
    assert controller.ledger.budgets()["gpu0"].free_bytes == 4 * GiB


async def test_a_busy_model_is_never_evicted_for_foreign_growth(env):
    controller, _, events = await env([torch_model("a"), torch_model("b")])
    await controller.load("a")
    await controller.load("b")
    traffic = controller.traffic
    assert traffic.try_start(traffic.lane("a"))  # a is older but serving a request
    controller.probe.set_foreign("gpu0", 14 * GiB)
    await controller.reconciler.check()
    (event,) = drain_events(events, "budget_overcommitted")
    assert event.victims == ("b",) and controller.model("a")["state"] == "ready"


async def test_policy_fit_evicts_nothing_and_says_so_once(env):
    controller, _, events = await env([torch_model("a")], policy="fit")
    await controller.load("a")
    controller.probe.set_foreign("gpu0", 20 * GiB)
    await controller.reconciler.check()
    await controller.reconciler.check()
    (event,) = drain_events(events, "budget_overcommitted")
    assert event.victims == () and "never evicts" in event.reason
    assert controller.model("a")["state"] == "ready"


async def test_host_ram_of_an_engine_without_host_leases_is_not_an_overrun(env):
    """Every engine process uses some RAM; only a hybrid engine leases host RAM. A GPU model is
    watched on its GPUs alone (a demo run reported a 395 MiB 'overrun' on the host before this)."""
    controller, adapter, events = await env([torch_model("a")])
    await controller.load("a")
    adapter.measured = {"host": 2 * GiB}
    for _ in range(3):
        await controller.reconciler.check()
    assert drain_events(events, "lease_overrun") == [] and controller.model("a")["overrun"] is None


async def test_checks_in_a_row_start_again_after_a_reload(env):
    controller, adapter, events = await env([torch_model("a")])
    await controller.load("a")
    adapter.measured = {"gpu0": leased(controller, "a") + GiB}
    await controller.reconciler.check()  # one check over
    await controller.unload("a")
    adapter.measured = {}
    await controller.reconciler.check()
    await controller.load("a")
    adapter.measured = {"gpu0": leased(controller, "a") + GiB}
    await controller.reconciler.check()  # the new engine's first check over: not two in a row
    assert drain_events(events, "lease_overrun") == [] and controller.model("a")["overrun"] is None


async def test_a_model_unloaded_while_its_engine_is_measured_is_skipped_and_the_check_goes_on(env):
    """Issue 39, finding 8: the check read `record.handle.pid` after awaiting the engine's report;
    a model evicted meanwhile raised AttributeError and skipped every later part of the check."""
    controller, adapter, events = await env([torch_model("a"), torch_model("b")], reconciler={"overrun_checks": 1})
    await controller.load("a")
    await controller.load("b")
    asked, release = asyncio.Event(), asyncio.Event()
    handle = controller.supervisor.resolve("a").handle
    measure = handle.measure

    async def gated():  # the gate: a's report is held until the test has unloaded a
        asked.set()
        await release.wait()
        return await measure()

    handle.measure = gated
    adapter.measured = {"gpu0": leased(controller, "b") + GiB}  # b over its leases: its part must run
    check = asyncio.ensure_future(controller.reconciler.check())
    await asyncio.wait_for(asked.wait(), HANG_S)
    await controller.unload("a")
    release.set()
    await asyncio.wait_for(check, HANG_S)  # raised AttributeError before
    assert [e.model for e in drain_events(events, "lease_overrun")] == ["b"]  # b's part ran, a's was skipped
    assert controller.model("a")["state"] == "unloaded" and controller.model("b")["overrun"] is not None


async def test_an_error_in_one_models_check_is_logged_once_and_the_others_go_on(env, caplog, monkeypatch):
    controller, adapter, events = await env([torch_model("a"), torch_model("b")], reconciler={"overrun_checks": 1})
    await controller.load("a")
    await controller.load("b")
    broken = controller.supervisor.resolve("a").handle.pid
    meter = controller.supervisor.meter
    observe = meter.observe

    def failing(pid, reported):
        if pid == broken:
            raise RuntimeError("a fault in a's part")
        return observe(pid, reported)

    monkeypatch.setattr(meter, "observe", failing)
    adapter.measured = {"gpu0": leased(controller, "b") + GiB}
    with caplog.at_level(logging.DEBUG, logger="lessor.reconciler"):
        await controller.reconciler.check()
        await controller.reconciler.check()
    assert [e.model for e in drain_events(events, "lease_overrun")] == ["b"]  # b's part ran both times
    logged = [r for r in caplog.records if "a fault in a's part" in str(r.exc_info and r.exc_info[1])]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.DEBUG]  # the traceback once, then quiet


async def test_a_state_dir_deleted_under_lessord_is_said_in_the_log_and_by_readyz(env, caplog, aiohttp_client):
    """Issue 39, finding 10: lessord wrote on into a deleted state_dir (its open files) without a word."""
    controller, _, _ = await env([torch_model("a")])
    ready = asyncio.Event()
    ready.set()
    client = await aiohttp_client(make_admin_app(controller, "token", ready))
    assert (await client.get("/readyz")).status == 200
    state_dir = Path(controller.config.state_dir).absolute()
    shutil.rmtree(state_dir)
    with caplog.at_level(logging.WARNING, logger="lessor.reconciler"):
        await controller.reconciler.check()
        await controller.reconciler.check()
    (said,) = [r.getMessage() for r in caplog.records if "state_dir" in r.getMessage()]  # once, not every tick
    assert said.startswith(f"state_dir {state_dir} was deleted while lessord runs") and "restart lessord" in said
    response = await client.get("/readyz")
    assert response.status == 503 and (await response.json())["reason"] == said

    state_dir.mkdir(parents=True)  # a new folder by that name holds none of the open files: still said
    await controller.reconciler.check()
    reason = (await (await client.get("/readyz")).json())["reason"]
    assert reason.startswith(f"state_dir {state_dir} was replaced by another folder")
