"""No request holds a model hostage (issue 39, finding 3): an engine that never answers, one that
stops mid-stream, a client that never reads, an engine that hangs whole, and a drain whose
requests never end. lessord's parts run in this process (the runtime, traffic control, the front
door on a socket) in front of real engine processes (tests/support/standin_engine.py, misbehaving as
asked); the router's own bounds are configured tiny and waited on as events (the outcome does not
depend on how long anything takes), the lanes' on an injected clock that only the test moves."""

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from lessor.daemon.models.lifecycle import ModelState
from lessor.daemon.planning.rejections import ModelsBusy
from lessor.daemon.runtime import runtime

from ..support.clocks import ManualClock
from ..support.configs import sim_config, standin
from ..support.lanes import READY, World
from ..support.router import Box, close_made, serve_router
from ..support.waiting import HANG_S, drain_events, until

READY_STATE = ModelState.READY.value


def misbehaving(name: str, tmp_path: Path, answer: str = "", **extra) -> dict:
    """A stand-in engine whose POSTs are answered the `answer` way (standin_engine.py's
    LESSOR_STANDIN_ANSWER; "" answers them); each request it ends because its client left is a
    line in NAME.ends."""
    spec = standin(name, tmp_path)
    spec["engine"]["env"]["LESSOR_STANDIN_ENDS"] = str(tmp_path / f"{name}.ends")
    if answer:
        spec["engine"]["env"]["LESSOR_STANDIN_ANSWER"] = answer
    return {**spec, **extra}


def ends(box: Box, name: str) -> list[str]:
    path = box.tmp_path / f"{name}.ends"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
async def stalled(tmp_path):
    """chat and coder, 8 GiB each, on a 16 GiB card that holds one of them (test_waiting's box)."""
    made = []

    async def make(chat: str = "", router: dict | None = None, reconciler: dict | None = None,
                   restart: dict | None = None):
        clock = ManualClock()
        chat_spec = misbehaving("chat", tmp_path, chat, **({"restart": restart} if restart else {}))
        config = sim_config(tmp_path, [chat_spec, misbehaving("coder", tmp_path)],
                            gpus=[{"name": "sim16", "total": "16GiB"}], router=router or {},
                            **({"reconciler": reconciler} if reconciler else {}))
        ctx = runtime(config, clock=clock, timers=clock)
        controller = await ctx.__aenter__()
        made.append(ctx)
        traffic, server, session = await serve_router(controller, made)
        return Box(controller, traffic, clock, session, controller.bus.subscribe(), tmp_path), server

    yield make
    await close_made(made)


async def test_an_engine_that_never_answers_gets_its_client_a_504_naming_the_setting_and_frees_the_model(stalled):
    box, server = await stalled(chat="stall", router={"first_byte_timeout": 0.2})
    status, answer, _ = await asyncio.wait_for(box.chat("chat"), HANG_S)
    assert status == 504 and answer["error"]["code"] == "upstream_timeout"
    assert "router.first_byte_timeout (0.2 s)" in answer["error"]["message"]
    assert box.controller.model("chat")["in_flight"] == 0
    await until(lambda: ends(box, "chat") == ["stall: client gone"], "the engine sees its request's client leave")
    assert not any(server.door.pool._idle.values())  # the stalled connection is never reused
    # The model it held is free: an operator's load of the other model evicts it.
    loaded = await box.controller.load("coder")
    assert loaded["state"] == READY_STATE and loaded["evicted"] == ["chat"]


async def test_a_stream_the_engine_stops_mid_way_ends_with_an_error_event(stalled):
    box, _ = await stalled(chat="stall_stream", router={"stream_idle_timeout": 0.2})
    request = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    async with box.session.post("/v1/chat/completions", json=request) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        body = await asyncio.wait_for(r.read(), HANG_S)  # the stream's proper end comes: no hang, no reset
    first, last, rest = body.split(b"\n\n")
    assert first == b'data: {"n": 0}' and rest == b""
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout" and "router.stream_idle_timeout (0.2 s)" in error["message"]
    assert box.controller.model("chat")["in_flight"] == 0
    await until(lambda: ends(box, "chat") == ["stall_stream: client gone"], "the engine sees its client leave")


async def test_a_client_that_never_reads_its_stream_is_disconnected_and_its_request_ends(stalled):
    box, server = await stalled(chat="flood", router={"stream_idle_timeout": 0.2})
    await box.controller.load("chat")
    body = json.dumps({"model": "chat", "stream": True, "messages": []}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:  # sends, then never reads
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (server.port, len(body), body))
        await until(lambda: ends(box, "chat") == ["flood: client gone"], "the engine's request ends")
        await until(lambda: box.controller.model("chat")["in_flight"] == 0, "the request's slot is free")
        assert not server.door.connections
    assert box.traffic.requests == {("chat", 499): 1}


async def test_an_engine_silent_at_hung_checks_checks_in_a_row_is_stopped_and_restarted_as_a_crash(stalled):
    box, _ = await stalled(reconciler={"health_timeout": 0.5, "hung_checks": 2},
                           restart={"policy": "on-failure", "backoff": 0, "max_restarts": 3})
    reconciler, health = box.controller.reconciler, box.controller.reconciler.health
    silent = health._config  # a stopped process never answers: the short deadline only ends the wait
    answering = silent.model_copy(update={"health_timeout": HANG_S})  # a resumed one, on a busy machine, may be slow
    await box.controller.load("chat")
    pid = box.controller.model("chat")["pid"]
    box.steps()
    try:
        os.kill(pid, signal.SIGSTOP)  # hung: the process runs on, its server answers nothing
        await reconciler.check()
        assert health.unanswered("chat") == 1 and box.controller.model("chat")["pid"] == pid
        os.kill(pid, signal.SIGCONT)  # only slow: an answer starts the count over
        health._config = answering
        await reconciler.check()
        health._config = silent
        assert health.unanswered("chat") == 0
        os.kill(pid, signal.SIGSTOP)
        await reconciler.check()
        assert health.unanswered("chat") == 1 and box.controller.model("chat")["state"] == READY_STATE
        await reconciler.check()  # the second in a row
    finally:
        if box.controller.model("chat")["pid"] == pid:  # failed half way: let the teardown stop it
            os.kill(pid, signal.SIGCONT)
    (exited,) = drain_events(box.events, "engine_exited")
    assert exited.hung and exited.pid == pid and exited.restart_in_s == 0
    assert exited.reason.startswith("engine hung: its health check") and "2 checks in a row" in exited.reason
    await until(lambda: box.controller.model("chat")["state"] == READY_STATE and box.starts("chat") == 2,
                "chat restarted by its restart policy")
    assert box.controller.model("chat")["pid"] != pid and box.controller.model("chat")["restarts"] == 1
    with pytest.raises(ProcessLookupError):  # the hung engine is gone, not left running
        os.kill(pid, 0)


class CuttingWorld(World):
    """test_lanes' world, with the effect that cuts a lane's running requests."""

    def __init__(self, **rules) -> None:
        super().__init__(**rules)
        self.cuts: list[tuple[str, str, str]] = []

    def cut(self, lane, error) -> None:
        self.cuts.append((lane.name, type(error).__name__, error.loading))


def busy_world() -> tuple[CuttingWorld, object, object]:
    """a ready with one request running and one waiting for its slot; b unloaded, wanted by one
    request; b's load must wait for a (a busy model of unknown service time)."""
    world = CuttingWorld(drain_after_s=30.0, drain_timeout_s=120.0)
    a, b = world.lane("a"), world.lane("b")
    world.lanes.set_slots(a, 1)
    world.records["a"].state = READY
    assert world.request("a", "running") and not world.request("a", "early")
    assert not world.request("b", "b1") and world.loads == ["b"]
    world.lanes.must_wait(b, ("a",))
    return world, a, b


def test_a_drain_cuts_what_still_runs_at_drain_timeout_then_the_load_goes_on():
    world, a, b = busy_world()
    world.advance(30.0)  # the patience: b's load is asked again, told to wait again, and drains a
    assert world.loads == ["b", "b"]
    world.lanes.must_wait(b, ("a",))
    assert a.drained
    assert not world.request("a", "late") and a.in_flight == 2  # held: running and early still count
    world.advance(119.0)
    assert world.cuts == []
    world.advance(1.0)  # the bound, from the drain
    assert world.cuts == [("a", "DrainTimedOut", "b")]
    assert a.in_flight == 1  # early waits for the swap now, as late does: only the running one counts
    world.lanes.finish(a)  # the cut request ends
    assert world.admitted == [] and world.loads == ["b", "b", "b"]  # a is idle: b's load goes


def test_a_drain_whose_load_happens_in_time_cuts_nothing():
    world, a, b = busy_world()
    world.advance(30.0)
    world.lanes.must_wait(b, ("a",))
    world.lanes.finish(a)  # running ends by itself; early runs and ends too
    assert world.admitted == ["early"]
    world.lanes.finish(a)
    world.set("a", ModelState.UNLOADED)
    world.set("b", READY)
    world.lanes.loaded(b)
    world.advance(200.0)
    assert world.cuts == [] and not a.drained


async def test_a_request_that_never_ends_cannot_starve_another_model(stalled):
    """The README's promise. chat's engine never answers the request it runs; coder cannot load
    beside chat. An operator's load of coder is refused while chat's request runs; coder's request
    waits, chat is drained after router.drain_after and its request cut after router.drain_timeout
    (503 drain_timeout), and coder's request is served: not a 503 at router.wait_timeout."""
    box, _ = await stalled(chat="stall", router={"drain_after": 1.0, "drain_timeout": 2.0})
    chat = asyncio.ensure_future(box.chat("chat"))
    coder = None
    try:
        await until(lambda: box.controller.model("chat")["in_flight"] == 1, "chat's request runs")
        with pytest.raises(ModelsBusy):
            await box.controller.load("coder")
        coder = asyncio.ensure_future(box.chat("coder"))
        await until(lambda: box.traffic.loads_wanted().get("coder") == "queued", "coder's load waits for chat")
        box.clock.advance(1.0)  # the patience: coder's load is asked again and drains chat
        await until(lambda: box.traffic.lane("chat").drained, "chat drained")
        box.clock.advance(2.0)  # the drain's bound: chat's request is cut
        status, answer, headers = await asyncio.wait_for(chat, HANG_S)
        assert status == 503 and answer["error"]["code"] == "drain_timeout" and "Retry-After" in headers
        assert "router.drain_timeout (2 s)" in answer["error"]["message"]
        status, answer, _ = await asyncio.wait_for(coder, HANG_S)
        assert status == 200 and answer["choices"][0]["message"]["content"] == "stand-in for coder"
    finally:
        for request in (chat, coder):
            if request is not None:
                request.cancel()
    assert box.controller.model("chat")["state"] == "unloaded" and box.controller.model("coder")["in_flight"] == 0
    await until(lambda: ends(box, "chat") == ["stall: client gone"], "chat's engine sees its request's client leave")
