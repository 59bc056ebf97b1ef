"""Typed errors to HTTP: one table (ERRORS) gives each typed error its status, its OpenAI error type
and, for a 401, its challenge; both envelopes and every error header are rendered from it.

- lessor's envelope (the admin API): {"error": {"type", "message", "field"?, "reasons"?}}
- OpenAI's (the router), so OpenAI clients show it: {"error": {"message", "type", "param", "code"}},
  where `code` is lessor's error type and `param` the field the error is about.

The router's own refusals (malformed HTTP, no route, a timeout, a body too large, a missing key)
are typed errors too, so they go through the same table.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from aiohttp import web

from ..daemon.errors import (BodyTooLarge, ConfigError, EngineUnavailable, Forbidden, InvalidApiKey, InvalidRequest,
                             InvariantBroken, LedgerUnavailable, LessorError, LoadFailed, MalformedRequest, ModelFailed,
                             MethodNotAllowed, ModelAdopting, ModelBusy, ModelTooLarge, NoEngineLog, NoRoute,
                             NotEnoughMemory, PlanRejected, QueueFull, RequestTimedOut, Unauthorized, UnknownDevice,
                             UnknownFingerprint, UnknownModel, UpstreamFailed, WaitTimedOut)

log = logging.getLogger("lessor.api")


@dataclass(frozen=True)
class HttpMapping:
    status: int
    openai_type: str  # OpenAI's error `type`, which OpenAI clients switch on
    challenge: str | None = None  # WWW-Authenticate, for a 401


INVALID, SERVER = "invalid_request_error", "server_error"

ERRORS: dict[type[LessorError], HttpMapping] = {
    InvalidRequest: HttpMapping(400, INVALID),
    MalformedRequest: HttpMapping(400, INVALID),
    ConfigError: HttpMapping(400, INVALID),
    InvalidApiKey: HttpMapping(401, "authentication_error", 'Bearer realm="lessor"'),
    Unauthorized: HttpMapping(401, "authentication_error", 'Bearer realm="lessor-admin"'),
    Forbidden: HttpMapping(403, "permission_error"),
    UnknownModel: HttpMapping(404, INVALID),
    UnknownDevice: HttpMapping(404, INVALID),
    NoEngineLog: HttpMapping(404, INVALID),
    UnknownFingerprint: HttpMapping(404, INVALID),
    NoRoute: HttpMapping(404, INVALID),
    MethodNotAllowed: HttpMapping(405, INVALID),
    RequestTimedOut: HttpMapping(408, INVALID),
    ModelBusy: HttpMapping(409, "conflict_error"),
    BodyTooLarge: HttpMapping(413, INVALID),
    PlanRejected: HttpMapping(422, INVALID),
    # A model that can never fit the box: no wait helps, so never a status a client retries (the
    # openai client retries 408, 409, 429 and every 5xx; a 503 with Retry-After here made it retry
    # for good). 422 like PlanRejected: the request is well formed, the model cannot be served.
    ModelTooLarge: HttpMapping(422, INVALID),
    QueueFull: HttpMapping(429, "rate_limit_error"),
    InvariantBroken: HttpMapping(500, SERVER),
    EngineUnavailable: HttpMapping(501, SERVER),
    LoadFailed: HttpMapping(502, SERVER),
    UpstreamFailed: HttpMapping(502, SERVER),
    NotEnoughMemory: HttpMapping(503, SERVER),
    ModelFailed: HttpMapping(503, SERVER),
    ModelAdopting: HttpMapping(503, SERVER),
    WaitTimedOut: HttpMapping(503, SERVER),
    LedgerUnavailable: HttpMapping(503, SERVER),
}
UNMAPPED = HttpMapping(500, SERVER)
RETRYABLE = frozenset((409, 429, 503))  # the statuses whose Retry-After a client can act on


def row(cls: type[LessorError]) -> HttpMapping:
    """The row of the class or of its nearest mapped base (a subclass may refine its base's row)."""
    return next((ERRORS[c] for c in cls.__mro__ if c in ERRORS), UNMAPPED)


def mapping(exc: LessorError) -> HttpMapping:
    return row(type(exc))


def http_status(exc: LessorError) -> int:
    return mapping(exc).status


def http_headers(exc: LessorError) -> dict[str, str]:
    row = mapping(exc)
    headers = {}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None and row.status in RETRYABLE:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if row.challenge:
        headers["WWW-Authenticate"] = row.challenge
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allowed)
    return headers


def lessor_envelope(exc: LessorError) -> dict:
    error = {"type": exc.type, "message": exc.message()}
    field = getattr(exc, "field", None)
    if field:
        error["field"] = field
    if isinstance(exc, PlanRejected):
        error["reasons"] = exc.reasons
    return {"error": error}


def openai_envelope(exc: LessorError) -> dict:
    return {"error": {"message": exc.message(), "type": mapping(exc).openai_type,
                      "param": getattr(exc, "field", None), "code": exc.type}}


def error_response(exc: LessorError) -> web.Response:
    return web.json_response(lessor_envelope(exc), status=http_status(exc), headers=http_headers(exc))


def from_aiohttp(exc: web.HTTPException, request: web.Request) -> LessorError | None:
    """The typed error for what aiohttp refused itself (no route, wrong method, body too large)."""
    if isinstance(exc, web.HTTPNotFound):
        return NoRoute(request.method, request.path)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(exc.method, request.path, tuple(sorted(exc.allowed_methods)))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return BodyTooLarge(request.client_max_size, "the admin API's limit")
    return None


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LessorError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        typed = from_aiohttp(exc, request)
        if typed is not None:
            return error_response(typed)
        text = exc.reason if exc.text is None else exc.text.removeprefix(f"{exc.status}: ")
        return web.json_response({"error": {"type": "http_error", "message": text}}, status=exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(InvariantBroken("internal error; see the daemon's log"))


async def read_json(request: web.Request) -> object:
    try:
        return json.loads(await request.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(None, f"the body is not valid JSON: {exc}") from None
