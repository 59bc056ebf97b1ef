"""The router's HTTP side: the OpenAI-compatible front door on `router.listen`.

A request's body is read once, parsed once to learn `model` (and `stream`), and sent upstream as
the same bytes; the answer comes back as the engine wrote it. Streams are passed through chunk by
chunk as they arrive. A client that goes away cancels its handler (handler cancellation is on
for this app), which closes the upstream connection, so the engine stops generating.

Errors use OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, so OpenAI clients
show them; `code` is lessor's typed error name.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from ..daemon.config import RouterConfig
from ..daemon.errors import InvalidRequest, LessorError, UpstreamFailed
from ..daemon.routing import Lane, Router
from ..daemon.supervisor import Supervisor
from .errors import http_status, retry_after

try:
    from orjson import loads as json_loads
except ImportError:  # orjson is a dependency; the standard library still works without it
    from json import loads as json_loads

log = logging.getLogger("lessor.router")

ROUTER = web.AppKey("router", Router)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
MAX_BODY = web.AppKey("max_body", int)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}
JSON = "application/json"
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer


def openai_error(status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LessorError as exc:
        status = http_status(exc)
        return openai_error(status, exc.message(), exc.type, getattr(exc, "field", None), retry_after(exc, status))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return openai_error(413, f"the body is larger than router.max_body ({request.app[MAX_BODY]} bytes)",
                                "body_too_large")
        return openai_error(exc.status, exc.reason, {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error"),
                            headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return openai_error(500, "internal error; see lessord's log", "internal_error")


def parse_body(body: bytes) -> tuple[str, bool]:
    """The request's `model` and whether it asks for a stream; nothing else is looked at."""
    try:
        data = json_loads(body)
    except ValueError as exc:
        raise InvalidRequest(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(None, f"the body must be a JSON object, not {type(data).__name__}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", "required: the name of a configured model (GET /v1/models lists them)")
    return model, data.get("stream") is True


async def proxy(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    body = await request.read()
    model, stream = parse_body(body)
    lane = router.lane(model)  # an unknown name is not counted: clients must not create metric labels
    status = CLIENT_GONE
    try:
        url = router.try_start(lane) or await router.wait_turn(lane)
    except LessorError as exc:
        router.count(lane.name, http_status(exc))
        raise
    try:
        response = await _forward(request, lane, url + request.path, body, stream)
        status = response.status
        return response
    except LessorError as exc:
        status = http_status(exc)
        raise
    finally:
        router.finish(lane)
        router.count(lane.name, status)


async def _forward(request: web.Request, lane: Lane, url: str, body: bytes, stream: bool) -> web.StreamResponse:
    session = request.app[UPSTREAM]
    try:
        upstream = await session.post(url, data=body, headers={"Content-Type": JSON})
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(lane.name, f"{type(exc).__name__}: {exc}") from None
    streaming = False
    try:
        content_type = upstream.headers.get("Content-Type", JSON)
        if not (stream and upstream.status == 200 and content_type.startswith("text/event-stream")):
            return web.Response(body=await upstream.read(), status=upstream.status,
                                headers={"Content-Type": content_type})
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        streaming = True
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    except aiohttp.ClientError as exc:  # the engine broke the connection mid-answer
        upstream.close()
        if streaming:  # the status is sent: end the stream short, the client sees no [DONE]
            log.warning("engine of %s broke a stream: %s", lane.name, exc)
            return response
        raise UpstreamFailed(lane.name, f"{type(exc).__name__}: {exc}") from None
    except BaseException:  # the client went away (cancelled): drop the upstream connection so the engine stops
        upstream.close()
        raise
    finally:
        upstream.release()


async def list_models(request: web.Request) -> web.Response:
    """Every configured name and alias, with the model's state."""
    data = []
    for record in request.app[SUPERVISOR].records():
        spec = record.spec
        entry = {"object": "model", "created": 0, "owned_by": "lessor", "state": record.state.value,
                 "engine": spec.engine.kind}
        data.append({"id": spec.name, **entry, "aliases": list(spec.aliases)})
        data.extend({"id": alias, **entry, "alias_of": spec.name} for alias in spec.aliases)
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    record = request.app[ROUTER].lane(request.match_info["model"]).record
    return web.json_response({"id": request.match_info["model"], "object": "model", "created": 0,
                              "owned_by": "lessor", "state": record.state.value, "model": record.spec.name})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_router_app(router: Router, supervisor: Supervisor, config: RouterConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body, middlewares=[openai_errors])
    app[ROUTER], app[SUPERVISOR], app[MAX_BODY] = router, supervisor, config.max_body
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, proxy)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(_upstream_session)
    return app


async def _upstream_session(app: web.Application):
    # One pool of keep-alive connections to the engines; no limit (engines and max_concurrency bound
    # the work), no total timeout (a long generation is not an error), and bodies passed as they are.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                    skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    app[UPSTREAM] = session
    yield
    await session.close()

