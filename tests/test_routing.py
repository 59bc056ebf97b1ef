"""The router's traffic control (daemon/routing.py) against the real supervisor, ledger and policies;
only the engine process is faked. A device of 15 GiB free holds one 8 GiB model, not two."""

import asyncio
import time

import pytest

from lessor.daemon.config import RouterConfig
from lessor.daemon.errors import LoadFailed, QueueFull, UnknownModel, WaitTimedOut
from lessor.daemon.routing import Router
from lessor.daemon.runtime import runtime

from .conftest import FakeAdapter, drain_events, sim_config, torch_model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def routed(tmp_path):
    made = []

    async def make(models, policy="lru_idle", clock=time.monotonic, **router):
        config = sim_config(tmp_path, models, policy=policy)
        fakes = []

        def engines(probe, ledger):
            fakes.append(FakeAdapter(probe, ledger))
            return {"torch": fakes[0]}
        ctx = runtime(config, engines=engines, clock=clock)
        controller = await ctx.__aenter__()
        made.append(ctx)
        router_ = Router(controller.supervisor, RouterConfig(**router), controller.bus.listen)
        controller.supervisor.attach_traffic(router_)
        return controller, fakes[0], router_, controller.bus.subscribe()

    yield make
    for ctx in made:
        await ctx.__aexit__(None, None, None)


def big(name, **extra):
    return torch_model(name, "8GiB", **extra)


async def turn(router, name):
    lane = router.lane(name)
    return lane, router.try_start(lane) or await router.wait_turn(lane)


def loads(adapter):
    return [h.spec.name for h in adapter.handles]


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


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
    await asyncio.sleep(0.1)
    assert controller.model("a")["state"] == "ready" and not any(t.done() for t in b_requests)
    late_a = [asyncio.ensure_future(turn(router, "a")) for _ in range(2)]  # a is drained: these wait
    await asyncio.sleep(0.1)
    assert not any(t.done() for t in late_a) and controller.model("a")["in_flight"] == 1

    router.finish(running_a)  # a goes idle: b loads and its three requests run together
    b_done = await asyncio.wait_for(asyncio.gather(*b_requests), 5)
    assert controller.model("b")["in_flight"] == 3 and not any(t.done() for t in late_a)
    assert controller.model("a")["state"] in ("unloaded", "loading")
    for lane, _ in b_done:
        router.finish(lane)
    a_done = await asyncio.wait_for(asyncio.gather(*late_a), 5)  # then a comes back for its two
    assert loads(adapter) == ["a", "b", "a"] and controller.model("a")["in_flight"] == 2
    for lane, _ in a_done:
        router.finish(lane)


async def test_alternating_requests_swap_in_batches_and_neither_model_starves(routed):
    controller, adapter, router, _ = await routed([big("a"), big("b")], drain_after=0)
    loop = asyncio.get_running_loop()
    waits = []

    async def request(name):
        arrived = loop.time()
        lane, _ = await turn(router, name)
        waits.append(loop.time() - arrived)
        await asyncio.sleep(0.05)
        router.finish(lane)

    tasks = []
    for i in range(100):  # a, b, a, b, ... arriving every 10 ms, each served in 50 ms: always overlapping
        tasks.append(asyncio.ensure_future(request("ab"[i % 2])))
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    # Swapping per request would be 100 loads; never swapping would make one model wait for the
    # other's whole stream (about 1 s). Batches: few loads, and every wait is short.
    assert len(adapter.handles) <= 25, f"{len(adapter.handles)} loads for 100 alternating requests"
    assert max(waits) < 0.5, f"a request waited {max(waits):.2f} s"


async def test_a_load_waits_drain_after_for_busy_models_before_draining_them(routed):
    """Within the patience, the busy model keeps serving new requests; then it is drained."""
    controller, adapter, router, _ = await routed([big("a"), big("b")], drain_after=0.4)
    running_a, _ = await turn(router, "a")
    b_request = asyncio.ensure_future(turn(router, "b"))
    await asyncio.sleep(0.1)
    more_a, _ = await asyncio.wait_for(turn(router, "a"), 1)  # not drained yet: starts at once
    router.finish(running_a)
    assert controller.model("a")["in_flight"] == 1 and not b_request.done()
    await asyncio.sleep(0.5)  # patience over: a is drained, a request arriving now waits
    late_a = asyncio.ensure_future(turn(router, "a"))
    await asyncio.sleep(0.1)
    assert not late_a.done() and not b_request.done()
    router.finish(more_a)  # a idle: b loads; a's held request loads a back after b's turn
    b_lane, _ = await asyncio.wait_for(b_request, 5)
    router.finish(b_lane)
    a_lane, _ = await asyncio.wait_for(late_a, 5)
    router.finish(a_lane)
    assert loads(adapter) == ["a", "b", "a"]


async def test_a_model_that_goes_idle_within_the_patience_is_evicted_without_a_drain(routed):
    controller, adapter, router, _ = await routed([big("a"), big("b")], drain_after=60)
    running_a, _ = await turn(router, "a")
    b_request = asyncio.ensure_future(turn(router, "b"))
    await asyncio.sleep(0.1)
    router.finish(running_a)
    b_lane, _ = await asyncio.wait_for(b_request, 5)  # long before the 60 s patience ends
    router.finish(b_lane)
    assert loads(adapter) == ["a", "b"]


async def test_a_full_queue_answers_queue_full_with_a_retry_time(routed):
    controller, adapter, router, _ = await routed([big("a")], max_queue=2)
    adapter.load_delay_s = 0.5
    waiting = [asyncio.ensure_future(turn(router, "a")) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as err:
        await turn(router, "a")
    assert err.value.retry_after_s > 0 and "router.max_queue" in str(err.value)
    for lane, _ in await asyncio.wait_for(asyncio.gather(*waiting), 5):
        router.finish(lane)
    assert loads(adapter) == ["a"]


async def test_max_concurrency_holds_requests_until_a_slot_frees(routed):
    controller, _, router, _ = await routed([big("a", max_concurrency=2)])
    first = [await turn(router, "a") for _ in range(2)]
    third = asyncio.ensure_future(turn(router, "a"))
    await asyncio.sleep(0.05)
    assert not third.done() and controller.model("a")["in_flight"] == 3  # running 2 + due 1
    router.finish(first[0][0])
    lane, _ = await asyncio.wait_for(third, 1)
    for lane_ in (first[1][0], lane):
        router.finish(lane_)
    assert controller.model("a")["in_flight"] == 0


async def test_a_request_that_waits_too_long_gets_wait_timed_out(routed):
    _, _, router, _ = await routed([big("a", max_concurrency=1)], wait_timeout=0.2)
    lane, _ = await turn(router, "a")
    with pytest.raises(WaitTimedOut) as err:
        await turn(router, "a")
    assert "a free slot" in str(err.value) and "router.wait_timeout" in str(err.value)
    assert lane.in_flight == 1  # the timed-out request left no trace
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
    adapter.load_delay_s = 0.2
    load = asyncio.ensure_future(controller.load("a"))
    await settle()
    lane, _ = await asyncio.wait_for(turn(router, "a"), 5)
    await load
    router.finish(lane)
    assert loads(adapter) == ["a"]


async def test_keep_alive_unloads_idle_models_but_never_pinned_busy_or_forever_ones(routed):
    models = [torch_model("idle", keep_alive="30s"), torch_model("busy", keep_alive="30s"),
              torch_model("pinned", keep_alive=0, pinned=True), torch_model("forever", keep_alive=-1)]
    clock = Clock()
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


async def test_a_request_touches_the_last_use_time_lru_reads(routed):
    clock = Clock()
    controller, _, router, _ = await routed([torch_model("a"), torch_model("b")], clock=clock)
    await controller.load("a")
    await controller.load("b")
    clock.now += 10
    lane, _ = await turn(router, "a")
    clock.now += 5
    router.finish(lane)
    views = controller.supervisor.policy_snapshot().models
    assert views["a"].last_used_s == clock.now > views["b"].last_used_s
