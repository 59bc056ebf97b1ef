"""The router's traffic control (daemon/traffic/control.py driving daemon/traffic/lanes.py) against the real
supervisor, ledger and policies; only the engine process is faked. A device of 15 GiB free holds
one 8 GiB model, not two. Time is an injected clock: the router's timers (wait deadlines, the
drain patience) fire only when a test moves it, so no test races the machine's speed."""

import asyncio
import logging

import pytest

from lessor.api.metrics import Metrics
from lessor.daemon.config.schema import RouterConfig
from lessor.daemon.errors import UnknownModel
from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.runtime import runtime
from lessor.daemon.traffic.control import TrafficControl
from lessor.daemon.traffic.request_errors import NotServedInTime, QueueFull, WaitTimedOut

from ..support.clocks import ManualClock
from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeAdapter, FakeEngines
from ..support.waiting import HANG_S, drain_events, until


class GatedAdapter(FakeAdapter):
    """The fake engine, whose loads can be held after their weights: by `gate` (an event the
    test sets) or for `hold_s` of the injected clock."""

    def __init__(self, probe, ledger=None) -> None:
        super().__init__(probe, ledger)
        self.gate: asyncio.Event | None = None
        self.hold_s: float | None = None
        self.clock: ManualClock | None = None
        self.at_gate: list[str] = []

    async def start(self, launch):
        handle = await super().start(launch)
        weights_loaded = handle.wait_weights_loaded

        async def gated(timeout_s):
            name = handle.spec.name
            self.at_gate.append(name)
            try:
                if self.hold_s is not None:
                    held = asyncio.Event()

                    def release():  # off the gate at once, so the test never sees it there after
                        self.at_gate.remove(name)
                        held.set()
                    self.clock.call_at(self.clock() + self.hold_s, release)
                    await held.wait()
                elif self.gate is not None:
                    await self.gate.wait()
            finally:
                if name in self.at_gate:
                    self.at_gate.remove(name)
            await weights_loaded(timeout_s)
        handle.wait_weights_loaded = gated
        return handle


@pytest.fixture
async def routed(tmp_path):
    made = []

    async def make(models, policy="lru_idle", clock=None, **router):
        clock = clock or ManualClock()
        config = sim_config(tmp_path, models, policy=policy, router=router)
        engines = FakeEngines(GatedAdapter)
        ctx = runtime(config, engines=engines, clock=clock, timers=clock)
        controller = await ctx.__aenter__()
        made.append(ctx)
        traffic = controller.traffic
        engines.adapter.clock = clock
        return controller, engines.adapter, traffic, controller.bus.subscribe()

    yield make
    for ctx in made:
        await ctx.__aexit__(None, None, None)


def big(name, **extra):
    return torch_model(name, "8GiB", **extra)


async def turn(router, name):
    lane = router.lane(name)
    return lane, router.try_start(lane) or await router.wait_turn(lane)


async def done(*awaitables):
    return await asyncio.wait_for(asyncio.gather(*awaitables), HANG_S)


def loads(adapter):
    return [h.spec.name for h in adapter.handles]


def queued(router, name):
    return router.queued().get(name, 0)


async def test_a_request_loads_its_model_on_demand_and_evicts_an_idle_one(routed):
    controller, adapter, router, events = await routed([big("a"), big("b")])
    lane, url = await turn(router, "a")
    assert url == adapter.handles[0].base_url and controller.model("a")["in_flight"] == 1
    router.finish(lane)
    lane, _ = await turn(router, "b")
    router.finish(lane)
    assert (controller.model("a")["state"], controller.model("b")["state"]) == ("unloaded", "ready")
    assert [lease.model for lease in controller.ledger.leases()] == ["b", "b"]
    evicted = [e for e in drain_events(events) if e.model == "a" and e.state == "unloading"]
    assert evicted[0].reason == "evicted for 'b'"


async def test_aliases_route_to_their_model_and_unknown_names_list_the_known_ones(routed):
    _, _, router, _ = await routed([big("a", aliases=["alpha"])])
    assert router.lane("alpha") is router.lane("a")
    with pytest.raises(UnknownModel) as err:
        router.lane("gamma")
    assert "known models: a, alpha" in str(err.value)


async def test_a_busy_model_is_not_evicted_and_each_side_is_served_as_a_batch(routed):
    controller, adapter, router, _ = await routed([big("a"), big("b")], drain_after=0)
    running_a, _ = await turn(router, "a")  # one request on a, still running
    b_requests = [asyncio.ensure_future(turn(router, "b")) for _ in range(3)]
    await until(lambda: router.loads_wanted().get("b") == "queued", "b's load waiting for a")
    assert controller.model("a")["state"] == "ready" and not any(t.done() for t in b_requests)
    late_a = [asyncio.ensure_future(turn(router, "a")) for _ in range(2)]  # a is drained: these wait
    await until(lambda: queued(router, "a") == 2, "a's late requests queued")
    assert not any(t.done() for t in late_a) and controller.model("a")["in_flight"] == 1

    router.finish(running_a)  # a goes idle: b loads and its three requests run together
    b_done = await done(*b_requests)
    assert controller.model("b")["in_flight"] == 3 and not any(t.done() for t in late_a)
    # Its late requests want it back: a load the policy makes wait for b (busy) shows as waiting.
    await until(lambda: controller.model("a")["state"] in ("waiting", "loading"), "a waiting for b")
    for lane, _ in b_done:
        router.finish(lane)
    a_done = await done(*late_a)  # then a comes back for its two
    assert loads(adapter) == ["a", "b", "a"] and controller.model("a")["in_flight"] == 2
    for lane, _ in a_done:
        router.finish(lane)


async def test_alternating_requests_swap_in_batches_and_neither_model_starves(routed):
    """100 requests alternating between a and b, one every 10 ms, each served in 50 ms, each load
    taking 10 ms: all in the injected clock, which moves only once everything it caused has
    settled, so the figures are the same on any machine."""
    clock = ManualClock()
    controller, adapter, router, _ = await routed([big("a"), big("b")], clock=clock, drain_after=0)
    adapter.hold_s = 0.01
    waits, arrived, admitted = [], [0], [0]

    def served(lane, since_s):
        admitted[0] += 1
        waits.append(clock() - since_s)
        clock.call_at(clock() + 0.05, lambda: router.finish(lane))

    async def waiting(lane, since_s):
        await router.wait_turn(lane)
        served(lane, since_s)

    def arrive(name):
        arrived[0] += 1
        lane = router.lane(name)
        if router.try_start(lane):
            served(lane, clock())
        else:
            asyncio.ensure_future(waiting(lane, clock()))

    for i in range(100):
        clock.call_at(clock() + 0.01 * i, lambda name="ab"[i % 2]: arrive(name))

    def settled():
        """Every request arrived so far runs or waits, and every load under way is held at its
        10 ms (or waits for the device lock behind the one that is)."""
        if admitted[0] + sum(router.queued().values()) != arrived[0]:
            return False
        return all(phase != "asking" or name in adapter.at_gate
                   or (adapter.at_gate and controller.model(name)["state"] == "loading")
                   for name, phase in router.loads_wanted().items())

    while True:
        await until(settled, "the router settled")
        if not clock.step():
            break
    assert admitted[0] == 100 and controller.model("a")["in_flight"] == controller.model("b")["in_flight"] == 0
    # Swapping per request would be 100 loads; never swapping would make one model wait for the
    # other's whole stream (about 1 s). Batches: few loads, and every wait is short.
    assert len(adapter.handles) <= 25, f"{len(adapter.handles)} loads for 100 alternating requests"
    assert max(waits) < 0.5, f"a request waited {max(waits):.2f} s"
    # The figures README.md quotes: this run is the same on every machine.
    assert (len(adapter.handles), round(max(waits), 3)) == (19, 0.12)


async def test_a_load_waits_drain_after_for_busy_models_before_draining_them(routed):
    """Within the patience, the busy model keeps serving new requests; then it is drained."""
    clock = ManualClock()
    controller, adapter, router, _ = await routed([big("a"), big("b")], clock=clock, drain_after=30)
    running_a, _ = await turn(router, "a")
    b_request = asyncio.ensure_future(turn(router, "b"))
    await until(lambda: router.loads_wanted().get("b") == "queued", "b's load waiting for a")
    clock.advance(29)
    more_a = router.lane("a")
    assert router.try_start(more_a)  # not drained yet: starts at once
    router.finish(running_a)
    assert controller.model("a")["in_flight"] == 1 and not b_request.done()
    clock.advance(1)  # patience over: b's load asks again, and drains a
    await until(lambda: router.lane("a").drained, "a drained")
    late_a = asyncio.ensure_future(turn(router, "a"))  # a request arriving now waits
    await until(lambda: queued(router, "a") == 1, "a's late request queued")
    assert not late_a.done() and not b_request.done()
    router.finish(more_a)  # a idle: b loads; a's held request loads a back after b's turn
    ((b_lane, _),) = await done(b_request)
    router.finish(b_lane)
    ((a_lane, _),) = await done(late_a)
    router.finish(a_lane)
    assert loads(adapter) == ["a", "b", "a"]


async def test_a_model_that_goes_idle_within_the_patience_is_evicted_without_a_drain(routed):
    controller, adapter, router, _ = await routed([big("a"), big("b")], drain_after=60)
    running_a, _ = await turn(router, "a")
    b_request = asyncio.ensure_future(turn(router, "b"))
    await until(lambda: router.loads_wanted().get("b") == "queued", "b's load waiting for a")
    router.finish(running_a)
    ((b_lane, _),) = await done(b_request)  # the injected clock never reached the 60 s patience
    assert not router.lane("a").drained
    router.finish(b_lane)
    assert loads(adapter) == ["a", "b"]


async def test_a_full_queue_answers_queue_full_with_a_retry_time(routed):
    controller, adapter, router, _ = await routed([big("a")], max_queue=2, retry_after_loading_s=7)
    adapter.gate = asyncio.Event()  # the load stays under way until the queue is full
    waiting = [asyncio.ensure_future(turn(router, "a")) for _ in range(2)]
    await until(lambda: queued(router, "a") == 2 and adapter.at_gate == ["a"], "two requests waiting for the load")
    with pytest.raises(QueueFull) as err:
        await turn(router, "a")
    assert err.value.retry_after_s > 0 and "router.max_queue" in str(err.value)
    assert err.value.retry_after_s == 7  # router.retry_after_loading_s: the model is not ready
    adapter.gate.set()
    for lane, _ in await done(*waiting):
        router.finish(lane)
    assert loads(adapter) == ["a"]


async def test_a_full_queue_of_a_ready_model_says_retry_after_busy(routed):
    controller, _, router, _ = await routed([big("a", max_concurrency=1)], max_queue=1, retry_after_busy_s=3)
    running, _ = await turn(router, "a")
    waiting = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: queued(router, "a") == 1, "one request waiting for a slot")
    with pytest.raises(QueueFull) as err:
        await turn(router, "a")
    assert err.value.retry_after_s == 3
    router.finish(running)
    ((lane, _),) = await done(waiting)
    router.finish(lane)


async def test_max_concurrency_holds_requests_until_a_slot_frees(routed):
    controller, _, router, _ = await routed([big("a", max_concurrency=2)])
    first = [await turn(router, "a") for _ in range(2)]
    third = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: queued(router, "a") == 1, "the third request queued")
    assert not third.done() and controller.model("a")["in_flight"] == 3  # running 2 + due 1
    router.finish(first[0][0])
    ((lane, _),) = await done(third)
    for lane_ in (first[1][0], lane):
        router.finish(lane_)
    assert controller.model("a")["in_flight"] == 0


async def test_a_request_that_waits_too_long_gets_wait_timed_out(routed):
    clock = ManualClock()
    _, _, router, _ = await routed([big("a", max_concurrency=1)], clock=clock, wait_timeout=10)
    lane, _ = await turn(router, "a")
    late = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: queued(router, "a") == 1, "the second request queued")
    clock.advance(9.9)
    await asyncio.sleep(0)
    assert not late.done()
    clock.advance(0.1)
    with pytest.raises(WaitTimedOut) as err:
        await done(late)
    assert "a free slot" in str(err.value) and "router.wait_timeout" in str(err.value)
    assert lane.in_flight == 1  # the timed-out request left no trace
    router.finish(lane)


async def test_a_request_whose_client_leaves_while_it_waits_leaves_no_trace(routed):
    controller, _, router, _ = await routed([big("a", max_concurrency=1)])
    lane, _ = await turn(router, "a")
    gone = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: queued(router, "a") == 1, "the second request queued")
    gone.cancel()
    await until(lambda: queued(router, "a") == 0, "the cancelled request gone")
    assert controller.model("a")["in_flight"] == 1
    router.finish(lane)
    assert controller.model("a")["in_flight"] == 0 and router.try_start(lane)
    router.finish(lane)


async def test_a_failed_load_fails_the_requests_waiting_for_it_and_the_next_request_retries(routed):
    controller, adapter, router, _ = await routed([big("a")])
    adapter.fail_at = "start"
    with pytest.raises(LoadFailed):
        await turn(router, "a")
    assert controller.ledger.leases() == ()
    adapter.fail_at = None
    lane, _ = await turn(router, "a")
    router.finish(lane)
    assert controller.model("a")["state"] == "ready"


async def test_a_request_during_an_admin_load_waits_for_it(routed):
    controller, adapter, router, _ = await routed([big("a")])
    adapter.gate = asyncio.Event()
    load = asyncio.ensure_future(controller.load("a"))
    await until(lambda: adapter.at_gate == ["a"], "the admin load under way")
    request = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: queued(router, "a") == 1, "the request waiting for the load")
    assert router.loads_wanted() == {"a": "held"}  # it waits for the admin load, starts none
    adapter.gate.set()
    ((lane, _),) = await done(request)
    await load
    router.finish(lane)
    assert loads(adapter) == ["a"]


async def test_keep_alive_unloads_idle_models_but_never_pinned_busy_or_forever_ones(routed):
    models = [torch_model("idle", keep_alive="30s"), torch_model("busy", keep_alive="30s"),
              torch_model("pinned", keep_alive=0, pinned=True), torch_model("forever", keep_alive=-1)]
    clock = ManualClock()
    controller, _, router, _ = await routed(models, clock=clock)
    for name in ("idle", "busy", "pinned", "forever"):
        await controller.load(name)
    busy, _ = await turn(router, "busy")
    clock.now += 29
    assert router.idle_expired() == []
    clock.now += 2
    assert await router.unload_idle() == ["idle"]
    assert controller.model("idle")["state"] == "unloaded" and controller.model("busy")["state"] == "ready"
    router.finish(busy)  # idle from now on
    clock.now += 31
    assert router.idle_expired() == ["busy"]


async def test_a_keep_alive_unload_is_its_own_cause_not_an_eviction(routed, caplog):
    """The finding: a keep_alive unload was logged "chat: evicted (idle for 10 s (keep_alive))", as
    if the policy had chosen it. Now it says it unloaded, idle past its keep_alive, and is counted
    apart from the policy's evictions."""
    caplog.set_level(logging.INFO, "lessor.supervisor")
    clock = ManualClock()
    controller, _, router, events = await routed([torch_model("chat", keep_alive="10s")], clock=clock)
    metrics = Metrics(controller)
    await controller.load("chat")
    clock.now += 12
    assert await router.unload_idle() == ["chat"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chat: ")]
    assert not any("evicted" in line for line in said), said
    assert any(line.startswith("chat: unloaded (idle 12 s, past its keep_alive (10 s))") for line in said), said
    (unloaded,) = [e for e in drain_events(events, "model_state") if e.state == "unloaded"]
    assert unloaded.reason == "idle 12 s, past its keep_alive (10 s)"
    text = metrics.render()[0].decode()
    assert 'lessor_model_idle_unloads_total{model="chat"} 1.0' in text
    assert 'lessor_model_evictions_total{model="chat"}' not in text


async def test_a_request_touches_the_last_use_time_lru_reads(routed):
    clock = ManualClock()
    controller, _, router, _ = await routed([torch_model("a"), torch_model("b")], clock=clock)
    await controller.load("a")
    await controller.load("b")
    clock.now += 10
    lane, _ = await turn(router, "a")
    clock.now += 5
    router.finish(lane)
    views = controller.supervisor.policy_snapshot().models
    assert views["a"].last_used_s == clock.now > views["b"].last_used_s


NOTHING_LEARNED = {"request_rate": 0.0, "started_share": 1.0, "kept_up_share": 1.0, "starved_s": 0.0, "load_s": None}


async def test_the_router_learns_rates_and_load_times_and_keeps_them_across_a_restart(routed, tmp_path, caplog):
    clock = ManualClock()
    controller, adapter, router, _ = await routed([big("a")], clock=clock)
    adapter.hold_s = 30.0  # the load takes 30 s of the injected clock
    pending = asyncio.ensure_future(turn(router, "a"))
    await until(lambda: adapter.at_gate == ["a"], "the load at its weights")
    clock.advance(30.0)
    lane, _ = await asyncio.wait_for(pending, HANG_S)
    router.finish(lane)
    learned = router.learned("a")
    assert learned["load_s"] == pytest.approx(30.0) and learned["request_rate"] > 0

    path = tmp_path / "traffic.json"
    def restarted(wall_s: float) -> TrafficControl:
        return TrafficControl(lambda: controller.supervisor, clock, RouterConfig(), timers=clock, stats_path=path,
                              wall=lambda: wall_s)
    before = restarted(5000.0)  # the file is absent: it starts empty
    assert before.learned("a") == NOTHING_LEARNED
    before.stats = router.stats
    before.save_stats()
    after = restarted(5000.0 + before.stats.half_life_s)  # down for one half-life
    assert after.learned("a")["request_rate"] == pytest.approx(learned["request_rate"] / 2, rel=1e-3)
    assert after.learned("a")["load_s"] == pytest.approx(30.0)

    path.write_text("{not json", encoding="utf-8")
    damaged = restarted(6000.0)
    assert damaged.learned("a") == NOTHING_LEARNED
    assert "traffic statistics in" in caplog.text and "unreadable" in caplog.text


async def test_the_policy_sees_what_the_router_learned(routed):
    clock = ManualClock()
    controller, adapter, router, _ = await routed([big("a"), big("b")], clock=clock)
    lane, _ = await turn(router, "a")
    router.finish(lane)
    clock.advance(5.0)
    view = controller.supervisor.policy_snapshot().models
    assert view["a"].request_rate == pytest.approx(router.stats.rate("a", clock())) and view["a"].request_rate > 0
    assert view["a"].load_cost_s == router.stats.measured_load_s("a") and view["a"].size_bytes == sum(view["a"].held_bytes.values()) > 8 << 30
    assert view["a"].ready_since_s > 0 and view["a"].waiting == 0
    assert view["b"].request_rate == 0.0 and view["b"].size_bytes == 0  # never planned: nothing known


async def _hot_and_cold(routed, clock):
    """Two models that cannot share the device under the value policy; `hot` loaded and asked
    for ten times."""
    controller, adapter, router, _ = await routed([big("hot"), big("cold")], policy="value", clock=clock)
    for _ in range(10):
        lane, _ = await turn(router, "hot")
        router.finish(lane)
    return controller, adapter, router


async def served_or_refused(router, name):
    """("served", lane) or ("refused", error): what a request to `name` got, which must come without
    the injected clock moving (a request the router cannot serve in time is answered at once)."""
    request = asyncio.ensure_future(turn(router, name))
    await until(lambda: request.done() or router.loads_wanted().get(name) == "queued", f"{name}'s request answered")
    assert request.done(), f"{name}'s request waits: {router.lane(name).record.state}"
    try:
        return "served", request.result()[0]
    except NotServedInTime as exc:
        return "refused", exc


async def test_the_value_policy_serves_the_other_model_or_refuses_at_once_never_leaving_it_waiting(routed):
    clock = ManualClock()
    controller, adapter, router = await _hot_and_cold(routed, clock)
    clock.advance(120.0)  # past policy.churn_age
    lane, _ = await turn(router, "hot")  # hot is in use now
    router.finish(lane)
    for asked in range(1, 41):  # noqa: B007 (the assertion after the loop reads it) each request to cold is served, or answered at once with when to retry
        outcome, got = await served_or_refused(router, "cold")
        if outcome == "served":
            router.finish(got)
            break
        assert 1 <= got.retry_after_s <= 300 and "router.wait_timeout" in str(got)
        assert controller.model("hot")["state"] == "ready" and controller.model("cold")["state"] == "unloaded"
    assert controller.model("hot")["state"] == "unloaded" and loads(adapter) == ["hot", "cold"], asked


async def test_the_value_policy_makes_room_for_an_operators_load_whatever_the_rates(routed):
    controller, _, _ = await _hot_and_cold(routed, ManualClock())
    await controller.load("cold")
    assert controller.model("hot")["state"] == "unloaded" and controller.model("cold")["state"] == "ready"


async def test_a_request_beyond_the_planned_batch_counts_as_not_started_at_once(routed):
    controller, _, router, _ = await routed([big("a", plan={"min_kv_tokens": 1024, "max_kv_tokens": 16384,
                                                          "max_batch_size": 2})])
    lanes = [(await turn(router, "a"))[0]]  # loads it; the engine runs it at once
    batch = controller.supervisor.resolve("a").plan.params["max_batch_size"]
    for _ in range(batch - 1):
        lanes.append((await turn(router, "a"))[0])
    assert router.stats.started_share("a") == 1.0
    lanes.append((await turn(router, "a"))[0])  # the router sends it (no max_concurrency): the engine queues it
    assert router.stats.started_share("a") < 1.0
    # Fewer than a batch ahead of it: the model kept up, so a full batch is not held against it
    # (the value policy weighs kept_up_share); a batch and more ahead, it did not.
    assert router.stats.kept_up_share("a") == 1.0
    for _ in range(batch + 1):
        lanes.append((await turn(router, "a"))[0])
    assert router.stats.kept_up_share("a") < 1.0
    assert router.stats.start_rate("a", router._clock()) > 0  # the starts are timed: the policy's floor
    for lane in lanes:
        router.finish(lane)


async def test_a_requests_keep_alive_applies_within_the_models_own_unless_the_operator_allows_more(routed):
    clock = ManualClock()
    models = [torch_model("a", keep_alive="10m"), torch_model("b", keep_alive="10m")]
    controller, _, router, _ = await routed(models, clock=clock)
    lane, _ = await turn(router, "a")
    assert router.request_keep_alive(lane, 0) == 0  # Ollama's 0: unload once idle
    assert router.idle_expired() == []  # it runs
    router.finish(lane)
    assert await router.unload_idle() == ["a"]
    lane, _ = await turn(router, "a")  # loaded again: its config's keep_alive until a request says otherwise
    router.finish(lane)
    assert router.keep_alive_s(lane.record) == 600
    assert router.request_keep_alive(lane, 3600) == 600  # never above the model's own
    assert router.request_keep_alive(lane, -1) == 600  # forever neither
    assert router.request_keep_alive(lane, 30) == 30
    clock.now += 31
    assert router.idle_expired() == ["a"]
    wider = TrafficControl(lambda: controller.supervisor, clock, RouterConfig(request_keep_alive_max=-1), timers=clock)
    lane_b = wider.lane("b")
    assert wider.request_keep_alive(lane_b, 3600) == 3600 and wider.request_keep_alive(lane_b, -1) == -1
    capped = TrafficControl(lambda: controller.supervisor, clock, RouterConfig(request_keep_alive_max="1h"),
                            timers=clock)
    assert capped.request_keep_alive(capped.lane("b"), -1) == 3600
