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
from typing import Any

from aiohttp import web

from ..daemon.config.reloading import Superseded
from ..daemon.config.schema import loc_path
from ..daemon.errors import (
    ConfigError,
    InvalidRequest,
    InvariantBroken,
    LessorError,
    NoEngineLog,
    Unauthorized,
    UnknownDevice,
    UnknownFingerprint,
    UnknownModel,
)
from ..daemon.ledger.ledger_errors import LedgerUnavailable
from ..daemon.models.load_errors import EngineUnavailable, LoadFailed, ModelAdopting, ModelBusy, ModelFailed
from ..daemon.planning.rejections import ModelTooLarge, NotEnoughMemory, PlanRejected
from ..daemon.traffic.request_errors import (
    DrainTimedOut,
    Forbidden,
    QueueFull,
    UpstreamFailed,
    UpstreamTimedOut,
    WaitTimedOut,
)
from .refusals import (
    BodyTooLarge,
    CrossSiteRequest,
    HeadTooLarge,
    InvalidApiKey,
    MalformedRequest,
    MethodNotAllowed,
    NoRoute,
    RequestTimedOut,
    UrlTooLong,
)

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
    CrossSiteRequest: HttpMapping(403, "permission_error"),
    UnknownModel: HttpMapping(404, INVALID),
    UnknownDevice: HttpMapping(404, INVALID),
    NoEngineLog: HttpMapping(404, INVALID),
    UnknownFingerprint: HttpMapping(404, INVALID),
    NoRoute: HttpMapping(404, INVALID),
    MethodNotAllowed: HttpMapping(405, INVALID),
    RequestTimedOut: HttpMapping(408, INVALID),
    ModelBusy: HttpMapping(409, "conflict_error"),
    Superseded: HttpMapping(409, "conflict_error"),  # a reload that will not apply: a newer one, or lessord's stop
    BodyTooLarge: HttpMapping(413, INVALID),
    UrlTooLong: HttpMapping(414, INVALID),
    HeadTooLarge: HttpMapping(431, INVALID),
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
    DrainTimedOut: HttpMapping(503, SERVER),
    UpstreamTimedOut: HttpMapping(504, SERVER),
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
    error: dict[str, Any] = {"type": exc.type, "message": exc.message()}
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


# No lessor or OpenAI body nests near this; past it the encoders and parsers lessor uses recurse
# (orjson's encoder stops at 254 levels, the standard library's parser at the recursion limit).
MAX_JSON_DEPTH = 128
# Every number lessor keeps is a signed 64-bit integer (the ledger's columns); and converting a
# long digit string costs time quadratic in its length, so it is refused before it is converted.
MAX_INT = (1 << 63) - 1
_MAX_INT_DIGITS = len(str(MAX_INT))


@dataclass(frozen=True)
class _Refused:
    """A number the parser met and would not take: the walk names its field with the reason."""

    reason: str


def _bounded_int(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    value = int(text) if digits <= _MAX_INT_DIGITS else None
    if value is None or not -MAX_INT - 1 <= value <= MAX_INT:
        return _Refused(f"an integer of {digits} digits; lessor takes integers that fit 64 bits (-2**63 to 2**63-1)")
    return value


def _bounded_float(text: str) -> float | _Refused:
    value = float(text)
    if math.isinf(value):
        return _Refused(f"{text[:20]}{'...' if len(text) > 20 else ''} is beyond a 64-bit float's range")
    return value


def _no_constant(name: str) -> float:
    raise InvalidRequest(None, f"the body is not valid JSON: {name} is not a JSON number; send a finite number")


def check_shape(data: object) -> None:
    """Refuse, naming the field, a body that nests deeper than MAX_JSON_DEPTH, holds a number
    that does not fit 64 bits, or text that is not Unicode (a lone surrogate such as \\ud800).
    Iterative, so no nesting can make it recurse."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, _Refused):
            raise InvalidRequest(loc_path(path) or None, value.reason)
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise too_deep(loc_path(path[:1]) or None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, path)
                stack.append((item, path + (key,), depth + 1))


def too_deep(field: str | None) -> InvalidRequest:
    return InvalidRequest(field, f"{'nests' if field else 'the body nests'} deeper than {MAX_JSON_DEPTH} levels, "
                          "the most lessor reads; flatten it")


def _check_text(text: str, path: tuple) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidRequest(loc_path(path) or None, f"holds {text[exc.start]!r}, a lone surrogate, which is "
                                 "not Unicode text; send the character itself or its surrogate pair") from None


def loads_checked(body: bytes) -> object:
    """A body parsed as JSON within lessor's bounds (check_shape), or InvalidRequest saying why not."""
    try:
        data = json.loads(body, parse_int=_bounded_int, parse_float=_bounded_float,
                          parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(None, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recursed past the interpreter's limit: far deeper than allowed
        raise too_deep(None) from None
    check_shape(data)
    return data


async def read_json(request: web.Request) -> object:
    return loads_checked(await request.read() or b"{}")
