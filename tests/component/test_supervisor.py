"""The load protocol, against the real ledger and policies; only the engine process is faked."""

import asyncio

import pytest

from lessor.daemon.models.load_errors import EngineUnavailable, LoadFailed, ModelBusy, ModelFailed, OutOfMemory
from lessor.daemon.planning.admission import MustWait
from lessor.daemon.planning.rejections import ModelsBusy, NotEnoughMemory
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.configs import sim_config, torch_model
from ..support.waiting import HANG_S, drain_events, until


def kinds(snapshot, model):
    return sorted(lease.kind.value for lease in snapshot.of_model(model))


async def test_weights_first_then_kv_sized_from_what_is_left(env):
    controller, adapter, _ = await env([torch_model("a", "6GiB")])
    free_before = controller.ledger.budgets()["gpu0"].free_bytes

    def someone_else_grabs_2gib(handle):
        controller.probe.set_foreign("gpu0", 10 * GiB)
    adapter.during_weights = someone_else_grabs_2gib

    await controller.load("a")
    (step1, _, at_weights), (step2, _, at_kv) = adapter.seen
    assert kinds(at_weights, "a") == ["load_peak", "weights"]
    assert kinds(at_kv, "a") == ["kv", "weights"]  # load_peak released before the kv lease
    kv = next(lease for lease in at_kv.of_model("a") if lease.kind.value == "kv")
    # 7 GiB are left after the weights and the foreign growth; the cache is capped by max_kv_tokens.
    assert kv.bytes == 16384 * 65536
    assert controller.ledger.budgets()["gpu0"].free_bytes == free_before - 6 * GiB - GiB - 2 * GiB
    assert controller.model("a")["state"] == "ready"
    assert controller.model("a")["params"] == {"context_tokens": 4096, "max_batch_size": 4}


async def test_kv_is_sized_from_the_measured_leftover_not_the_estimate(env):
    controller, adapter, _ = await env([{**torch_model("a", "10GiB"), "plan": {"min_kv_tokens": 1024}}])
    adapter.during_weights = lambda h: controller.probe.set_foreign("gpu0", 12 * GiB)
    await controller.load("a")
    kv = next(lease for lease in controller.ledger.snapshot().leases if lease.kind.value == "kv")
    # 24 - 1 headroom - 12 foreign - 10 weights = 1 GiB left: 16 384 tokens of 64 KiB.
    assert kv.bytes == 16384 * 65536 == GiB


async def test_failed_load_rolls_back_every_lease_and_keeps_the_other_model(env):
    controller, adapter, events = await env([torch_model("a", "4GiB"), torch_model("b", "4GiB")])
    await controller.load("a")
    before = {lease.id for lease in controller.ledger.snapshot().leases}
    for step in ("start", "weights", "kv", "ready"):
        adapter.fail_at = step
        with pytest.raises(LoadFailed) as info:
            await controller.load("b")
        assert "every lease of the attempt was released" in str(info.value)
        assert {lease.id for lease in controller.ledger.snapshot().leases} == before
        assert controller.model("b")["state"] == "failed"
        assert controller.model("a")["state"] == "ready"
    assert all(h.stopped for h in adapter.handles if h.spec.name == "b")
    adapter.fail_at = None
    await controller.load("b")
    assert controller.model("b")["state"] == "ready"


async def test_missing_engine_adapter_takes_no_lease(tmp_path):
    async with runtime(sim_config(tmp_path, [torch_model("a")]), engines={}) as controller:
        with pytest.raises(EngineUnavailable, match="engine 'torch'"):
            await controller.load("a")
        assert controller.ledger.snapshot().leases == ()


async def test_lru_idle_evicts_the_idle_model_to_make_room(env):
    controller, adapter, events = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")])
    await controller.load("a")
    await controller.load("b")
    assert controller.model("a")["state"] == "unloaded"
    assert controller.model("b")["state"] == "ready"
    assert {lease.model for lease in controller.ledger.snapshot().leases} == {"b"}
    seen = []
    while not events.empty():
        seen.append(events.get_nowait())
    admission = [e for e in seen if e.type == "admission" and e.model == "b"]
    assert admission[-1].result == "evict" and admission[-1].victims == ("a",)


async def test_pinned_models_are_not_evicted(env):
    controller, adapter, _ = await env([torch_model("a", "8GiB", pinned=True), torch_model("b", "8GiB")])
    await controller.load("a")
    with pytest.raises(NotEnoughMemory) as info:
        await controller.load("b")
    assert info.value.device == "gpu0" and info.value.wanted_bytes > info.value.free_bytes
    assert controller.model("a")["state"] == "ready"
    b = controller.model("b")
    assert b["state"] == "unloaded" and "short by" in b["error"]  # refused, not failed


async def test_a_grant_the_ledger_refuses_is_a_shortfall_not_a_failed_load(env):
    """Admitted, then the memory went elsewhere before the grant (foreign usage grew while the
    victim stopped): a 503-class shortfall with the numbers, nothing held, the model unloaded."""
    controller, adapter, _ = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")])
    await controller.load("a")
    adapter.on_stop = lambda handle: controller.probe.set_foreign("gpu0", 16 * GiB)
    with pytest.raises(NotEnoughMemory) as info:
        await controller.load("b")
    assert info.value.device == "gpu0" and info.value.wanted_bytes > info.value.free_bytes
    assert controller.leases("b") == [] and controller.model("b")["state"] == "unloaded"


async def test_a_one_phase_plan_the_memory_left_is_a_shortfall_not_a_failed_load(env):
    """The same for an engine that sizes its KV cache at start: its plan at the grant no longer
    fits. Not a failed load (it counted as a crash: a foreign process growing made lessor give up
    on the model), but a shortfall with the numbers."""
    one_phase = {"name": "b", "engine": {"kind": "vllm", "model_path": "/models/b"},
                 "memory": {"weights": "8GiB", "kv_bytes_per_token": 65536, "load_peak": "512MiB"},
                 "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096}}
    controller, adapter, _ = await env([torch_model("a", "8GiB"), one_phase])
    await controller.load("a")
    adapter.on_stop = lambda handle: controller.probe.set_foreign("gpu0", 16 * GiB)
    with pytest.raises(NotEnoughMemory, match="went elsewhere between the admission and the plan") as info:
        await controller.load("b")
    assert info.value.device == "gpu0" and info.value.wanted_bytes > info.value.free_bytes
    assert controller.leases("b") == [] and controller.model("b")["state"] == "unloaded"


async def test_a_cancelled_load_rolls_back_every_lease_and_re_raises(env):
    controller, adapter, _ = await env([torch_model("a", "4GiB")])
    adapter.load_delay_s = 3600  # the weights never finish loading: the load is cancelled mid-way
    load = asyncio.ensure_future(controller.load("a"))
    await until(lambda: adapter.loading == 1)
    assert {lease["kind"] for lease in controller.leases("a")} == {"weights", "load_peak"}
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert controller.leases("a") == [] and adapter.handles[0].stopped
    assert controller.model("a")["state"] == "unloaded" and controller.ledger.engines() == {}


async def test_close_cancels_a_pending_restart_and_nothing_restarts_after_it(env):
    restart = {"backoff": "1h", "max_backoff_s": "1h"}  # longer than HANG_S: only a cancel ends the wait
    controller, adapter, events = await env([{**torch_model("a"), "restart": restart}])
    await controller.load("a")
    exited = await crash(controller, adapter, events, "a")
    assert exited.restart_in_s == 3600
    await controller.supervisor.close()  # what lessord does when it stops
    await asyncio.wait_for(controller.supervisor.settled(), HANG_S)  # the waiting restart was cancelled
    adapter.launches[-1].on_exit(-9)  # a late exit report finds the supervisor closed
    await controller.supervisor.settled()
    assert len(adapter.handles) == 1 and controller.model("a")["state"] == "unloaded"


async def test_dry_run_names_the_evictions_without_doing_them(env):
    controller, adapter, _ = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")])
    await controller.load("a")
    plan = controller.plan("b")
    assert plan["fits"] and plan["evictions"] == ["a"]
    assert controller.model("a")["state"] == "ready"


async def test_loads_on_one_device_never_overlap(env):
    controller, adapter, _ = await env([torch_model(n, "2GiB") for n in "abc"])
    await asyncio.gather(*(controller.load(n) for n in "abc"))
    assert adapter.max_loading == 1
    assert all(controller.model(n)["state"] == "ready" for n in "abc")


async def test_loads_on_different_devices_may_overlap(env):
    gpus = [{"total": "24GiB"}, {"total": "24GiB"}]
    controller, adapter, _ = await env([torch_model("a", "2GiB"), {**torch_model("b", "2GiB"), "placement": {"devices": [1]}}],
                                       gpus=gpus)
    adapter.gate = asyncio.Event()  # both loads hold their weights phase until both are in it
    loads = asyncio.gather(controller.load("a"), controller.load("b"))
    await until(lambda: adapter.loading == 2, "both loads under way at once")
    adapter.gate.set()
    await loads
    assert adapter.max_loading == 2


async def test_a_model_mid_load_is_busy_to_what_cannot_join_its_load(env):
    controller, adapter, _ = await env([torch_model("a", "2GiB")])
    adapter.gate = asyncio.Event()  # the load holds its weights phase until the test lets it end
    task = asyncio.create_task(controller.load("a"))
    await until(lambda: controller.model("a")["state"] == "loading")
    with pytest.raises(ModelBusy):  # other overrides: another load, not this one
        await controller.load("a", {"max_batch_size": 2})
    with pytest.raises(ModelBusy):
        await controller.unload("a")
    adapter.gate.set()
    await task


async def test_loads_of_a_loading_model_join_it_one_engine_starts(env):
    """One load per model (issue 35 item 4): a second caller of the same cause awaits the first
    one's outcome instead of ModelBusy; one attempt, one engine start. Another cause is another
    decision (the policy weighs a request's load apart from an operator's): ModelBusy, as before."""
    controller, adapter, _ = await env([torch_model("a", "2GiB")])
    supervisor = controller.supervisor
    adapter.gate = asyncio.Event()
    first = asyncio.create_task(supervisor.load("a"))
    await until(lambda: adapter.loading == 1, "a's load in its weights phase")
    joiners = [asyncio.create_task(supervisor.try_load("a", cause="operator")), asyncio.create_task(supervisor.load("a"))]
    await until(lambda: supervisor.underway("a").joined == 2, "both callers joined a's load")
    with pytest.raises(ModelBusy):
        await supervisor.try_load("a")  # a request's load
    adapter.gate.set()
    records = await asyncio.gather(first, *joiners)
    assert records[0].state.value == "ready" and all(r is records[0] for r in records)
    assert len(adapter.launches) == 1 and supervisor.underway("a") is None


async def test_a_joined_load_that_fails_fails_every_caller_once(env):
    controller, adapter, _ = await env([torch_model("a", "2GiB")])
    supervisor = controller.supervisor
    adapter.gate, adapter.fail_at = asyncio.Event(), "weights"
    first = asyncio.create_task(supervisor.load("a"))
    await until(lambda: adapter.loading == 1, "a's load in its weights phase")
    joiner = asyncio.create_task(supervisor.load("a"))
    await until(lambda: supervisor.underway("a").joined == 1, "the second caller joined a's load")
    adapter.gate.set()
    outcomes = await asyncio.gather(first, joiner, return_exceptions=True)
    assert all(isinstance(o, LoadFailed) for o in outcomes), outcomes
    assert len(adapter.launches) == 1 and controller.model("a")["state"] == "failed"


async def test_a_joiner_whose_load_was_cancelled_loads_itself(env):
    controller, adapter, _ = await env([torch_model("a", "2GiB")])
    supervisor = controller.supervisor
    adapter.gate = asyncio.Event()
    first = asyncio.create_task(supervisor.load("a"))
    await until(lambda: adapter.loading == 1, "a's load in its weights phase")
    joiner = asyncio.create_task(supervisor.load("a"))
    await until(lambda: supervisor.underway("a").joined == 1, "the second caller joined a's load")
    first.cancel()
    await until(lambda: len(adapter.launches) == 2, "the joiner's own load started")
    adapter.gate.set()
    assert (await joiner).state.value == "ready"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_load_that_must_wait_changes_no_state(env):
    """Admission comes before LOADING: an operator's load refused for busy models publishes no
    model_state event, and a request's load weighed again to the same wait publishes none either."""
    controller, _, events = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")],
                                      gpus=[{"name": "sim16", "total": "16GiB", "foreign": "0"}])
    await controller.load("a")
    assert controller.traffic.try_start(controller.traffic.lane("a"))  # a serves a request: it cannot be evicted
    drain_events(events)
    with pytest.raises(ModelsBusy):
        await controller.load("b")
    assert drain_events(events) == [] and controller.model("b")["state"] == "unloaded"
    assert isinstance(await controller.supervisor.try_load("b"), MustWait)  # a request's: waiting, one event
    assert [(e.previous, e.state) for e in drain_events(events)] == [("unloaded", "waiting")]
    assert isinstance(await controller.supervisor.try_load("b"), MustWait)
    assert drain_events(events) == []


async def test_unload_releases_every_lease_and_stops_the_engine(env):
    controller, adapter, _ = await env([torch_model("a", "2GiB")])
    await controller.load("a")
    await controller.unload("a")
    assert controller.ledger.snapshot().leases == ()
    assert adapter.handles[0].stopped
    assert controller.ledger.budgets()["gpu0"].foreign_bytes == 8 * GiB


async def crash(controller, adapter, events, name):
    adapter.launches[-1].on_exit(-9)
    while True:
        event = await asyncio.wait_for(events.get(), HANG_S)
        if event.type == "engine_exited" and event.model == name:
            return event


async def test_a_crash_releases_leases_and_policy_never_leaves_it_failed(env):
    controller, adapter, events = await env([{**torch_model("a"), "restart": {"policy": "never"}}])
    await controller.load("a")
    exited = await crash(controller, adapter, events, "a")
    assert exited.restart_in_s is None and exited.returncode == -9
    assert controller.leases("a") == [] and controller.model("a")["state"] == "failed"
    assert "signal SIGKILL" in controller.model("a")["error"]


async def test_restarts_back_off_then_give_up(env):
    controller, adapter, events = await env([{**torch_model("a"),
                                               "restart": {"policy": "on-failure", "max_restarts": 1, "backoff": 0.01}}])
    await controller.load("a")
    first = await crash(controller, adapter, events, "a")
    assert first.restart_in_s == 0.01
    await controller.supervisor.settled()
    assert controller.model("a")["state"] == "ready"
    assert len(adapter.handles) == 2 and controller.model("a")["restarts"] == 1
    second = await crash(controller, adapter, events, "a")
    assert second.restart_in_s is None  # max_restarts within the window: given up
    await controller.supervisor.settled()
    assert controller.model("a")["state"] == "failed" and controller.leases("a") == []


CRASHY = {"policy": "never", "max_restarts": 1, "window_s": 3600}


async def test_requests_stop_loading_a_model_that_keeps_crashing_until_an_operator_loads_it(env):
    controller, adapter, events = await env([{**torch_model("a"), "restart": CRASHY}])
    supervisor = controller.supervisor
    await controller.load("a")
    assert (await crash(controller, adapter, events, "a")).restart_in_s is None  # policy never: lessor does not
    await supervisor.try_load("a")  # a request may, once: max_restarts 1
    assert len(adapter.launches) == 2
    await crash(controller, adapter, events, "a")
    with pytest.raises(ModelFailed) as refused:
        await supervisor.try_load("a")
    assert len(adapter.launches) == 2, "no load for a request once lessor gave up"
    message = str(refused.value)
    assert "2 crashes within 3600 s, more than restart.max_restarts 1" in message and "signal SIGKILL" in message
    assert "lessor load a" in message and controller.model("a")["state"] == "failed"
    await controller.load("a")  # the operator's load tries it again, and the count starts over
    assert controller.model("a")["state"] == "ready" and controller.model("a")["restarts"] == 0


async def test_a_config_reload_lets_requests_load_a_model_lessor_gave_up_on(env):
    controller, adapter, events = await env([{**torch_model("a"), "restart": {**CRASHY, "max_restarts": 0}}])
    await controller.load("a")
    await crash(controller, adapter, events, "a")
    with pytest.raises(ModelFailed):
        await controller.supervisor.try_load("a")
    await controller.reload(controller.config)
    await controller.supervisor.try_load("a")
    assert controller.model("a")["state"] == "ready" and len(adapter.launches) == 2


async def test_loads_a_request_started_that_fail_count_as_crashes(env):
    controller, adapter, _ = await env([{**torch_model("a"), "restart": CRASHY}])
    adapter.fail_at = "weights"
    for _ in range(2):
        with pytest.raises(LoadFailed):
            await controller.supervisor.try_load("a")
    with pytest.raises(ModelFailed) as refused:
        await controller.supervisor.try_load("a")
    assert len(adapter.launches) == 2 and "while loading weights" in str(refused.value)
    with pytest.raises(LoadFailed):  # the operator's own load is tried, and its error is theirs to see
        await controller.load("a")
    assert len(adapter.launches) == 3


async def test_an_engine_that_ends_right_after_its_health_check_is_a_crash(env):
    controller, adapter, events = await env([{**torch_model("a"), "restart": {"policy": "never"}}])
    adapter.during_weights = lambda handle: setattr(handle.process, "returncode", 0)  # before ready: report dropped
    await controller.load("a")
    await controller.supervisor.settled()
    model = controller.model("a")
    assert model["state"] == "failed" and "code 0 while serving" in model["error"] and controller.leases("a") == []


async def test_an_exit_report_from_an_older_engine_is_ignored(env):
    controller, adapter, events = await env([torch_model("a")])
    await controller.load("a")
    old = adapter.launches[-1]
    await controller.unload("a")
    await controller.load("a")
    old.on_exit(-9)
    await controller.supervisor.settled()
    assert controller.model("a")["state"] == "ready" and controller.leases("a")


async def test_usage_over_the_leases_fails_verification(env):
    controller, adapter, _ = await env([torch_model("a", "4GiB")], planner={"oom_retries": 0})
    adapter.measured = {"gpu0": 9 * GiB}  # far above 4 GiB of weights + the KV lease
    with pytest.raises(OutOfMemory, match="verify.*the engine uses 9.0 GiB"):
        await controller.load("a")
    assert controller.leases("a") == [] and adapter.handles[-1].stopped and len(adapter.handles) == 1


async def test_a_retry_whose_measurement_does_not_fit_fails_with_both_attempts(env):
    controller, adapter, _ = await env([torch_model("a", "4GiB")])
    adapter.measured = {"gpu0": 15 * GiB}  # 15 GiB free on the card: 15 GiB + 3 % does not fit
    with pytest.raises(OutOfMemory) as failed:
        await controller.load("a")
    message = str(failed.value)
    assert "attempt 1: verify: gpu0: the engine uses 15.0 GiB" in message
    assert "attempt 2: not started: model 'a' needs" in message and "15.0 GiB is free" in message
    model = controller.model("a")
    assert model["state"] == "failed" and "attempt 2" in model["error"] and controller.leases("a") == []
    assert len(adapter.handles) == 1, "the retry was planned, found not to fit, and never started"


async def test_a_load_plans_once_and_again_only_after_evictions(env, monkeypatch):
    """The admission's plan is the attempt's (issue 35 item 2): planned again only where evictions
    changed the memory. A load that must evict also asks, once, whether it could ever fit."""
    from lessor.daemon.models import loading
    from lessor.daemon.planning import planner
    planned, original = [], planner.plan

    def counted(spec, budgets, *args, **kwargs):
        planned.append(spec.name)
        return original(spec, budgets, *args, **kwargs)
    monkeypatch.setattr(planner, "plan", counted)
    monkeypatch.setattr(loading, "plan", counted)
    controller, _, _ = await env([torch_model("a", "8GiB"), torch_model("b", "8GiB")],
                                 gpus=[{"name": "sim16", "total": "16GiB", "foreign": "0"}])
    await controller.load("a")
    assert planned == ["a"]
    assert (await controller.load("b"))["evicted"] == ["a"]
    assert planned == ["a", "b", "b", "b"]  # the admission's, the ceiling's (never_fits), after the eviction
