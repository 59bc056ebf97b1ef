"""lessord's router served in this process, in front of what the test chooses: `serve_router` over
a runtime's controller, `Upstream` (an engine's HTTP side that echoes, streams and holds as told),
and `Box` (a runtime with its router, a manual clock and a client session, as the waiting and
stalled tests drive it)."""

import asyncio
import json
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from lessor.api.router import RouterServer, start_router
from lessor.daemon.controller import Controller
from lessor.daemon.traffic.control import TrafficControl

from .clocks import ManualClock
from .waiting import drain_events, until


class Upstream:
    """An engine stand-in: echoes what it got; streams chunks until told to finish; counts streams."""

    def __init__(self) -> None:
        self.open_streams = 0
        self.streams_ended: list[str] = []
        self.release = asyncio.Event()
        self.hold = False
        self.adapter = None  # the fake adapter whose engines answer from here (set by the fixture)

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, self.answer)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.hold:
            await self.release.wait()
        if not json.loads(body).get("stream"):
            return web.json_response({"path": request.path, "echo": body.decode()})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.open_streams += 1
        how = "cancelled"
        try:
            await response.write(b'data: {"n": 0}\n\n')
            await self.release.wait()
            for n in range(1, 200):
                await response.write(f'data: {{"n": {n}}}\n\n'.encode())
                await asyncio.sleep(0.01)
            await response.write(b"data: [DONE]\n\n")
            how = "done"
        except ConnectionResetError:
            how = "client gone"
        finally:
            self.open_streams -= 1
            self.streams_ended.append(how)
        return response


async def serve_router(controller, made: list):
    """The router in front of `controller` (its runtime's traffic control, on its config's router
    settings) on a free loopback port, and a client session to it; both go into `made` (close_made
    closes them, last made first, with the runtimes there)."""
    traffic = controller.traffic
    server = await start_router(traffic, controller.supervisor, controller.config.router, "127.0.0.1", 0)
    made.append(server)
    session = aiohttp.ClientSession(f"http://127.0.0.1:{server.port}")
    made.append(session)
    return traffic, server, session


async def close_made(made: list) -> None:
    for thing in reversed(made):
        if isinstance(thing, (aiohttp.ClientSession, RouterServer)):
            await thing.close()
        else:
            await thing.__aexit__(None, None, None)


@dataclass
class Box:
    controller: Controller
    traffic: TrafficControl
    clock: ManualClock
    session: aiohttp.ClientSession
    events: asyncio.Queue
    tmp_path: object

    async def chat(self, model: str, **body) -> tuple[int, dict, dict]:
        """A chat request through the router: (status, JSON answer, headers)."""
        data = {"model": model, "messages": [{"role": "user", "content": "Hello"}], **body}
        async with self.session.post("/v1/chat/completions", json=data) as r:
            return r.status, await r.json(), dict(r.headers)

    async def answered(self, model: str) -> tuple[int, dict, dict]:
        """A request that must be answered without the clock moving: served, or refused at once.
        A request left waiting (its load queued) fails the test instead of hanging it."""
        request = asyncio.ensure_future(self.chat(model))
        try:
            await until(lambda: request.done() or self.traffic.loads_wanted().get(model) == "queued",
                        f"{model}'s request answered or its load queued")
            assert request.done(), f"{model}'s request is left waiting: {self.controller.model(model)}"
            return request.result()
        finally:
            request.cancel()

    def starts(self, model: str) -> int:
        path = self.tmp_path / f"{model}.starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def steps(self) -> list[tuple]:
        """The model states and admissions since the last look, in order."""
        out = []
        for e in drain_events(self.events, None):
            if e.type == "model_state":
                out.append((e.model, e.previous, e.state))
            elif e.type == "admission":
                out.append((e.model, "admission", e.result.value, e.victims))
        return out
