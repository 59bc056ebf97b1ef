"""The HTTP servers' own refusals: requests answered before any model is asked (bytes that are no
HTTP request, no route, a wrong method, a body or head too large, a client too slow, a missing key,
a page of another site). The router and the admin API raise the same classes, so api/errors.py's
one table gives both their status."""

from __future__ import annotations

from dataclasses import dataclass

from ..daemon.errors import LessorError, Unauthorized


@dataclass
class InvalidApiKey(Unauthorized):
    """The router's Authorization header names none of router.api_keys."""

    type = "invalid_api_key"


@dataclass
class CrossSiteRequest(LessorError):
    """A request whose Host or Origin header names a site the listener does not serve: a page of
    another site (through DNS rebinding, or a cross-origin form or fetch) may not drive lessor."""

    field: str  # the header: "Host" or "Origin"
    value: str
    setting: str  # the config field that would allow it, e.g. "admin.allowed_hosts"
    type = "cross_site_request"

    def message(self) -> str:
        shown = self.value if len(self.value) <= 100 else f"{self.value[:100]}..."
        if self.field == "Host":
            return (f"Host: '{shown}' is not a name this listener answers to (a web page reaching it through DNS "
                    f"rebinding?); nothing was done. If the name is yours, add it to {self.setting}")
        return (f"Origin: '{shown}' is a page of another site than this listener's; a browser page of another "
                f"origin may not call lessor, nothing was done. If the page is yours, add its origin to {self.setting}")


@dataclass
class MalformedRequest(LessorError):
    """Bytes that are not an HTTP/1.1 request the server can read on; the connection closes after the answer."""

    reason: str
    type = "bad_request"

    def message(self) -> str:
        return self.reason


@dataclass
class NoRoute(LessorError):
    method: str
    path: str
    server: str = ""  # who answers, for the message ("the router")
    serves: tuple[str, ...] = ()  # the paths that server does serve
    type = "not_found"

    def message(self) -> str:
        text = f"no route for {self.method} {self.path}"
        return f"{text}; {self.server or 'this server'} serves {', '.join(self.serves)}" if self.serves else text


@dataclass
class MethodNotAllowed(LessorError):
    method: str
    path: str
    allowed: tuple[str, ...]
    type = "method_not_allowed"

    def message(self) -> str:
        return f"{self.path} takes {' or '.join(self.allowed)}, not {self.method}"


@dataclass
class BodyTooLarge(LessorError):
    limit_bytes: int
    setting: str  # what sets the limit, so the message says what to raise
    type = "body_too_large"

    def message(self) -> str:
        return f"the body is larger than {self.setting} ({self.limit_bytes} bytes)"


@dataclass
class HeadTooLarge(LessorError):
    """A request head over a listener's limit: read no further than the limit, answered, then the
    connection closes (what follows cannot be framed)."""

    what: str  # "a header line", "the head": what was too long
    limit: int
    setting: str  # the config field that sets the limit
    unit: str = "bytes"
    type = "header_too_large"

    def message(self) -> str:
        return f"{self.what} is over {self.setting} ({self.limit} {self.unit}); send less, or raise {self.setting}"


@dataclass
class UrlTooLong(HeadTooLarge):
    type = "uri_too_long"


@dataclass
class RequestTimedOut(LessorError):
    """A client that did not send a whole request in time (a stalled or slowloris client)."""

    timeout_s: float
    setting: str
    type = "request_timeout"

    def message(self) -> str:
        return f"the request was not received whole within {self.setting} ({self.timeout_s:g} s)"
