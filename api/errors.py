"""Typed errors to HTTP, in one table and one JSON envelope: {"error": {"type", "message", "field"?}}."""

from __future__ import annotations

import json
import logging
import math

from aiohttp import web

from ..daemon.errors import (ConfigError, EngineUnavailable, Forbidden, InvalidRequest, InvariantBroken, LedgerUnavailable,
                             NoEngineLog,
                             LessorError, LoadFailed, ModelBusy, NotEnoughMemory, PlanRejected, QueueFull, Unauthorized, UnknownDevice,
                             UnknownModel, UpstreamFailed, WaitTimedOut)

log = logging.getLogger("lessor.api")

STATUS: dict[type[LessorError], int] = {
    InvalidRequest: 400,
    ConfigError: 400,
    Unauthorized: 401,
    Forbidden: 403,
    UnknownModel: 404,
    UnknownDevice: 404,
    NoEngineLog: 404,
    ModelBusy: 409,
    PlanRejected: 422,
    EngineUnavailable: 501,
    QueueFull: 429,
    LoadFailed: 502,
    UpstreamFailed: 502,
    NotEnoughMemory: 503,
    WaitTimedOut: 503,
    LedgerUnavailable: 503,
    InvariantBroken: 500,
}


def http_status(exc: LessorError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


def retry_after(exc: LessorError, status: int) -> dict[str, str]:
    retry = getattr(exc, "retry_after_s", None)
    if retry is None or status not in (409, 429, 503):
        return {}
    return {"Retry-After": str(max(1, math.ceil(retry)))}


def envelope(type_: str, message: str, field: str | None = None) -> dict:
    error = {"type": type_, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


def error_response(exc: LessorError) -> web.Response:
    status = http_status(exc)
    headers = retry_after(exc, status)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="lessor-admin"'
    body = envelope(exc.type, exc.message(), getattr(exc, "field", None))
    if isinstance(exc, PlanRejected):
        body["error"]["reasons"] = exc.reasons
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LessorError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        return web.json_response(envelope(type_, exc.reason if exc.text is None else exc.text.removeprefix(f"{exc.status}: ")),
                                 status=exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(envelope("internal_error", "internal error; see the daemon's log"), status=500)


async def read_json(request: web.Request) -> object:
    try:
        return json.loads(await request.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(None, f"the body is not valid JSON: {exc}") from None
