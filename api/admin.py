"""The admin API: an aiohttp app factory over the controller. Handlers parse, call, serialize.

Routes and the OpenAPI document come from one table (ROUTES), so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..daemon.config.schema import problems_from
from ..daemon.controller import Controller
from ..daemon.errors import InvalidRequest
from ..engines.redaction import Redacting
from . import dashboard, schemas
from .auth import check_bearer, holds_token
from .errors import error_middleware, read_json
from .metrics import Metrics
from .openapi import build_openapi
from .origins import SiteRules

CONTROLLER = web.AppKey("controller", Controller)
TOKEN = web.AppKey("token", str)
READY = web.AppKey("ready", asyncio.Event)
METRICS = web.AppKey("metrics", Metrics)
REDACTING = web.AppKey("redacting", Redacting)  # the secrets of the config in force and lessord's environment

LINES = re.compile(r"[0-9]{1,5}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    many: bool = False
    auth: bool = False
    content_type: str = "application/json"
    query: tuple[str, ...] = ()  # optional query parameters (strings)


def parse(model: type[BaseModel], data: object):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = problems_from(exc)
        raise InvalidRequest(problems[0].path or None, "; ".join(str(p) for p in problems)) from None


def ctl(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def shown(request: web.Request, data):
    """What a public route shows: everything to the token holder; to anyone else, with the secrets a
    failed load's error or an engine's printed arguments may quote redacted (engines/redaction.py)."""
    return data if holds_token(request, request.app[TOKEN]) else request.app[REDACTING](data)


def public_json(request: web.Request, data, status: int = 200) -> web.Response:
    return web.json_response(shown(request, data), status=status)


async def get_devices(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).devices())


async def get_leases(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).leases(request.query.get("model")))


async def get_models(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).models())


async def get_model(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).model(request.match_info["name"]))


async def post_model(request: web.Request) -> web.Response:
    action = parse(schemas.ModelAction, await read_json(request))
    name = request.match_info["name"]
    if action.action == "load":
        return web.json_response(await ctl(request).load(name, action.overrides))
    return web.json_response(await ctl(request).unload(name))


async def get_model_log(request: web.Request) -> web.Response:
    raw = request.query.get("lines", "200")
    if not LINES.fullmatch(raw) or not 1 <= int(raw) <= 10000:  # not isdigit(): it takes '²', which int() refuses
        shown = raw if len(raw) <= 20 else f"{raw[:20]}... ({len(raw)} characters)"
        raise InvalidRequest("lines", f"must be an integer from 1 to 10000 in ASCII digits; got {shown!r}")
    return web.Response(text=ctl(request).log_tail(request.match_info["name"], int(raw)),
                        content_type="text/plain")


async def post_plan(request: web.Request) -> web.Response:
    body = parse(schemas.PlanRequest, await read_json(request))
    return public_json(request, ctl(request).plan(body.model, body.overrides))


async def get_fingerprints(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).fingerprints(request.query.get("model")))


async def delete_fingerprint(request: web.Request) -> web.Response:
    return web.json_response(await ctl(request).forget_fingerprint(request.match_info["key"]))


async def put_foreign(request: web.Request) -> web.Response:
    body = parse(schemas.ForeignUsage, await read_json(request))
    return web.json_response(ctl(request).set_foreign(request.match_info["device"], body.foreign_bytes))


async def get_status(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).status())


async def get_events(request: web.Request) -> web.StreamResponse:
    controller = ctl(request)
    bus, keepalive_s = controller.bus, controller.config.admin.sse_keepalive_s
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    queue = bus.subscribe()  # after the last await outside the try: nothing can leave it subscribed
    try:
        await response.write(b": connected\n\n")
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=keepalive_s)
            except asyncio.TimeoutError:  # a comment line keeps proxies from closing an idle stream
                await response.write(b": keep-alive\n\n")
                continue
            data = json.dumps(event.to_dict(), separators=(",", ":"))
            await response.write(f"event: {event.type}\ndata: {data}\n\n".encode())
    except ConnectionResetError:  # the subscriber left: that ends the stream, it is no failure
        pass
    finally:
        bus.unsubscribe(queue)
    return response


async def get_history(request: web.Request) -> web.Response:
    return public_json(request, ctl(request).history.to_dict())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reason: str | None
    if not request.app[READY].is_set():
        reason = "starting: adopting the previous lessord's engines and loading the pinned models"
        return web.json_response({"ready": False, "reason": reason}, status=503)
    reason = getattr(ctl(request).reconciler, "state_dir_problem", None) or ctl(request).readiness()
    return public_json(request, {"ready": False, "reason": reason} if reason else {"ready": True},
                       status=503 if reason else 200)


async def post_reload(request: web.Request) -> web.Response:
    return web.json_response(await ctl(request).reload_file())


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(ROUTES))


P = "/admin/v1"
ROUTES: list[Route] = [
    Route("GET", f"{P}/status", get_status, "Probe, policy, devices and models at once", response=schemas.StatusOut),
    Route("GET", f"{P}/devices", get_devices, "Every pool with its budget arithmetic", response=schemas.DeviceOut, many=True),
    Route("PUT", f"{P}/devices/{{device}}/foreign", put_foreign, "Set foreign usage of a simulated device",
          body=schemas.ForeignUsage, response=schemas.DeviceOut, auth=True),
    Route("GET", f"{P}/leases", get_leases, "Granted leases (optionally ?model=NAME)", response=schemas.LeaseOut, many=True,
          query=("model",)),
    Route("GET", f"{P}/models", get_models, "Configured models with state and leases", response=schemas.ModelOut, many=True),
    Route("GET", f"{P}/models/{{name}}", get_model, "One model", response=schemas.ModelOut),
    Route("GET", f"{P}/models/{{name}}/log", get_model_log, "The last lines of the model's engine log (?lines=N, default 200)",
          auth=True, content_type="text/plain"),
    Route("POST", f"{P}/models/{{name}}", post_model, "Load or unload a model", body=schemas.ModelAction,
          response=schemas.ModelOut, auth=True),
    Route("POST", f"{P}/plan", post_plan, "Dry run: would this load fit now, with which leases, after which evictions",
          body=schemas.PlanRequest, response=schemas.PlanOut),
    Route("GET", f"{P}/fingerprints", get_fingerprints, "What lessor measured per model, engine version, devices and flags (optionally ?model=NAME)",
          response=schemas.FingerprintOut, many=True, query=("model",)),
    Route("DELETE", f"{P}/fingerprints/{{key}}", delete_fingerprint, "Forget a fingerprint: plans of its key go back to the memory model",
          response=schemas.FingerprintOut, auth=True),
    Route("POST", f"{P}/reload", post_reload, "Read the config file again and apply it: what changed, or why it "
          "was refused (the running config kept), or that it is pending until the loads it waits for end (a newer "
          "reload replaces it), as SIGHUP does", response=schemas.ReloadOut, auth=True),
    Route("GET", f"{P}/events", get_events, "Event stream (server-sent events)", auth=True, content_type="text/event-stream"),
    Route("GET", f"{P}/history", get_history, "Device usage over the last hour (leased, foreign, engines, free), oldest first",
          response=schemas.HistoryOut),
    Route("GET", "/", dashboard.get_page, "The dashboard (read-only without the token)", content_type="text/html"),
    Route("GET", "/dashboard.js", dashboard.get_script, "The dashboard's script", content_type="text/javascript"),
    Route("GET", "/dashboard.css", dashboard.get_style, "The dashboard's style sheet", content_type="text/css"),
    Route("GET", "/healthz", healthz, "Liveness"),
    Route("GET", "/readyz", readyz,
          "Readiness: ledger open, probe working, the previous lessord's engines adopted or stopped, pinned models "
          "loaded; 503 with the reason otherwise (a pinned model that failed, the ledger's database not answering)"),
    Route("GET", "/metrics", metrics, "Prometheus metrics", content_type="text/plain"),
    Route("GET", "/openapi.json", openapi, "This document"),
]


def _guarded(route: Route) -> Handler:
    if not route.auth:
        return route.handler

    async def handler(request: web.Request) -> web.StreamResponse:
        check_bearer(request, request.app[TOKEN])
        return await route.handler(request)

    return handler


@web.middleware
async def same_site(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request from another site's page (its Host or Origin, api/origins.py) is refused before it
    does anything; over the unix socket (no browser reaches it) only its Origin is checked."""
    # Only a unix socket's name is text; a request whose transport is gone is checked as TCP.
    tcp = not isinstance(request.transport.get_extra_info("sockname") if request.transport else None, (str, bytes))
    SiteRules.cached(ctl(request).config.admin, "admin").check(request.headers.get("Host"),
                                                            request.headers.get("Origin"), tcp)
    return await handler(request)


def make_admin_app(controller: Controller, token: str, ready: asyncio.Event | None = None,
                   client_max_size: int = 1 << 20) -> web.Application:
    app = web.Application(middlewares=[error_middleware, same_site], client_max_size=client_max_size)
    app[CONTROLLER] = controller
    app[REDACTING] = Redacting(lambda: controller.config, os.environ)
    app[TOKEN] = token
    app[READY] = ready or asyncio.Event()
    app[METRICS] = Metrics(controller)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guarded(route))
    return app
