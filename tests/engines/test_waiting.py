"""A request is served or answered, never left waiting on nothing: lessord's parts in this process
(the runtime, the router's traffic control, the OpenAI front door on a socket) with an injected
clock, and two real engine processes (tests/support/standin_engine.py, started by the vllm adapter). The
simulated 16 GiB card holds one of the two 8 GiB models, not both. The tests count steps and
states (the events), never seconds: the clock moves only when a test moves it."""

import asyncio
import logging

import pytest

from lessor.api.metrics import Metrics
from lessor.daemon.runtime import runtime

from ..support.clocks import ManualClock
from ..support.configs import sim_config, standin
from ..support.router import Box, close_made, serve_router
from ..support.waiting import until


@pytest.fixture
async def box(tmp_path):
    made = []

    async def make(policy: str = "value", **router) -> Box:
        clock = ManualClock()
        config = sim_config(tmp_path, [standin("chat", tmp_path), standin("coder", tmp_path)],
                            gpus=[{"name": "sim16", "total": "16GiB"}], policy=policy, router=router)
        ctx = runtime(config, clock=clock, timers=clock)
        controller = await ctx.__aenter__()
        made.append(ctx)
        traffic, _, session = await serve_router(controller, made)
        return Box(controller, traffic, clock, session, controller.bus.subscribe(), tmp_path)

    yield make
    await close_made(made)


async def test_a_model_asked_for_the_first_time_while_another_sits_idle_is_served_after_one_unload_and_one_load(box):
    """The finding: after requests to chat, the first request to coder waited out the client's
    timeout while chat sat idle. Now: chat's unload, coder's load, the answer; nothing else."""
    box = await box()  # the default policy
    for _ in range(5):
        assert (await box.chat("chat"))[0] == 200
    box.clock.advance(120.0)  # chat idle past policy.churn_age
    box.steps()
    status, answer, _ = await box.answered("coder")
    assert status == 200 and answer["choices"][0]["message"]["content"] == "stand-in for coder"
    assert box.steps() == [("coder", "admission", "evict", ("chat",)),
                           ("chat", "ready", "unloading"), ("chat", "unloading", "unloaded"),
                           ("coder", "unloaded", "loading"), ("coder", "loading", "ready")]
    assert (box.starts("chat"), box.starts("coder")) == (1, 1)
    assert box.controller.model("coder")["waiting"] is None and box.controller.model("coder")["error"] is None


async def hold_chat_busy(box: Box, measured_s: float | None) -> None:
    """chat loaded by its requests and one of them running now (a long generation, held open at
    the router as the front door holds a request); `measured_s`: what each of three earlier
    requests took on the injected clock (None: none finished, its service time unknown)."""
    lane = box.traffic.lane("chat")
    for _ in range(3 if measured_s is not None else 0):
        assert box.traffic.try_start(lane) or await box.traffic.wait_turn(lane)
        box.clock.advance(measured_s)
        box.traffic.finish(lane)
    assert box.traffic.try_start(lane) or await box.traffic.wait_turn(lane)
    box.steps()


async def test_a_request_that_cannot_be_served_within_its_wait_gets_a_503_at_once_and_the_model_waits_only_meanwhile(box):
    """chat is busy with a request held open, and its requests take 10 minutes: coder's load would
    come past router.wait_timeout, so its request is answered now (not after 5 minutes), with
    when to retry; coder was waiting in between, one event in and one out, never loading."""
    box = await box("lru_idle")
    await hold_chat_busy(box, measured_s=600.0)
    status, answer, headers = await box.answered("coder")
    assert status == 503 and answer["error"]["code"] == "not_served_in_time"
    assert 1 <= int(headers["Retry-After"]) <= 300 and "chat to finish their requests" in answer["error"]["message"]
    assert box.steps() == [("coder", "admission", "queue", ()),
                           ("coder", "unloaded", "waiting"), ("coder", "waiting", "unloaded")]
    assert box.controller.model("coder")["state"] == "unloaded" and box.controller.model("coder")["error"] is None
    assert box.starts("coder") == 0 and box.controller.model("chat")["state"] == "ready"
    box.traffic.finish(box.traffic.lane("chat"))


async def test_a_waiting_model_says_why_is_weighed_again_without_flapping_and_loads_once_its_blocker_is_idle(box, caplog):
    """chat's running request has no measured end: coder's request waits for it. coder is
    `waiting` (why, for whom, when it is weighed again; never an error), in the metrics too;
    weighed again as the clock moves, with no event; served once chat is idle."""
    caplog.set_level(logging.DEBUG, "lessor.supervisor")
    box = await box("lru_idle")
    await hold_chat_busy(box, measured_s=None)
    request = asyncio.ensure_future(box.chat("coder"))
    try:
        await until(lambda: box.traffic.loads_wanted().get("coder") == "queued" or request.done(), "coder's load queued")
        model = box.controller.model("coder")
        assert model["state"] == "waiting" and model["error"] is None
        assert model["waiting"] == {"reason": "the models that could make room are busy", "recheck_in_s": 30.0,
                                    "blockers": ["chat"], "requests": 1}
        metrics = Metrics(box.controller).render()[0].decode()
        assert 'lessor_model_state{model="coder",state="waiting"} 1.0' in metrics
        for _ in range(31):  # past router.drain_after: weighed again (chat is drained); nothing new is said
            box.clock.advance(1.0)
            await until(lambda: box.traffic.loads_wanted().get("coder") == "queued", "coder weighed")
        assert box.traffic.lane("chat").drained and box.controller.model("coder")["waiting"]["recheck_in_s"] is None
        assert box.steps() == [("coder", "admission", "queue", ()), ("coder", "unloaded", "waiting")]
        weighed = [r for r in caplog.records if r.getMessage().startswith("coder: queued behind chat")]
        assert [r.levelname for r in weighed] == ["INFO", "DEBUG"]  # the second weighing said nothing new
        box.traffic.finish(box.traffic.lane("chat"))  # chat idle: coder's load goes
        status, answer, _ = await asyncio.wait_for(request, 600)
        assert status == 200 and answer["choices"][0]["message"]["content"] == "stand-in for coder"
    finally:
        request.cancel()
    assert box.steps() == [("coder", "admission", "evict", ("chat",)),
                           ("chat", "ready", "unloading"), ("chat", "unloading", "unloaded"),
                           ("coder", "waiting", "loading"), ("coder", "loading", "ready")]
    assert box.controller.model("coder")["waiting"] is None and box.starts("coder") == 1
