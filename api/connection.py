"""The router's client side of HTTP/1.1: one asyncio protocol per client connection, parsed by
httptools (the parser uvicorn uses); the exchange that streams an engine's answer back is
api/exchange.py's.

Owns reading requests (head and body limits, request timeout, pipelining in order), writing answers
and errors, and back-pressure between a slow client and its engine. A request's head is fed to the
parser no further than `router.max_head`, so a huge header or URL costs at most the limit (httptools
joins a header's pieces by copying: fed whole, a 128 MB header held the loop for seconds).
Not here: what a request is answered with (api/router.py's FrontDoor decides) and the engine side (api/proxy.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import httptools

from ..daemon.config.schema import RouterConfig
from ..daemon.errors import InvariantBroken, LessorError
from .errors import http_headers, http_status, openai_envelope
from .exchange import CLIENT_GONE, REASONS, Exchange
from .origins import SiteRules
from .proxy import UpstreamConnection
from .refusals import BodyTooLarge, CrossSiteRequest, HeadTooLarge, MalformedRequest, RequestTimedOut, UrlTooLong

log = logging.getLogger("lessor.router")


@dataclass
class Request:
    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool
    authorization: bytes = b""
    host: bytes | None = None  # the Host and Origin headers, checked before anything is done (api/origins.py)
    origin: bytes | None = None
    browser: bool = False  # it carries a browser's Sec-Fetch-* headers


class Service(Protocol):
    """What a connection needs from the router: its limits, the set of open connections, and the
    answer to each request (api/router.py's FrontDoor)."""

    config: RouterConfig
    connections: set[ClientConnection]

    async def serve(self, request: Request, conn: ClientConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client's keep-alive connection. Requests are answered one at a time, in order."""

    transport: asyncio.Transport  # connection_made's: the loop makes the connection before it feeds it

    def __init__(self, door: Service) -> None:
        self.door = door
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []
        self.url_size = 0
        self.in_head = True  # no request's head is complete: what comes is fed up to router.max_head
        self.head_size = 0  # bytes fed while in a head
        self.begins = self.ends = 0  # requests begun, and ended, during the current feed
        self.headers = 0
        self.refusal: LessorError | None = None  # answered once the requests before it are
        self.head_only = False  # the request being answered is a HEAD: no body goes out
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.expect_continue = False
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task | None = None
        self.exchange: Exchange | None = None
        self.authorization = b""
        self.host: bytes | None = None  # the request's Host and Origin headers (Request's)
        self.origin: bytes | None = None
        self.browser = False
        self.closed = False
        self.reading = False  # between a request's first byte and its end
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # when the armed timeout is due; None: disarmed
        self.unread: asyncio.TimerHandle | None = None  # armed while the client reads nothing of what it is sent

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.door.connections.add(self)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """A client gets router.request_timeout to send a whole request, and as long to start the
        next one: a slow or silent client cannot hold a connection (and its memory) forever.
        No limit while its answer is being produced: generation takes as long as it takes.
        Re-arming moves the deadline; the one timer handle, when it fires early, waits on for the
        rest (two handles made and cancelled per request cost more than this check)."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.door.config.request_timeout
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.closed or self.deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._timed_out)
            return
        if self.reading:
            self._refuse(RequestTimedOut(self.door.config.request_timeout, "router.request_timeout"))
        elif self.task is None:  # idle keep-alive connection
            self.close()

    def data_received(self, data: bytes) -> None:
        try:
            while data and self.refusal is None and not self.closed:
                data = self._feed(data)
        except httptools.HttpParserUpgrade:
            self._refuse(MalformedRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            if not self.too_large and self.refusal is None:
                self._refuse(MalformedRequest(f"malformed HTTP request: {exc}"))

    def _feed(self, data: bytes) -> bytes:
        """Feed the parser what it may read now; the rest. In a head, no more than router.max_head
        in all. Exact for a head that began before this feed or alone in it; a head that follows
        another request in the same feed is counted from the next feed, so it may pass the limit by
        one feed (still bounded), and pipelined small requests are never refused for their sum."""
        if not self.in_head:
            self.parser.feed_data(data)
            return b""
        limit = self.door.config.max_head
        room = limit + 1 - self.head_size  # one byte past the limit tells "over" from "at"
        piece, rest = (data, b"") if len(data) <= room else (data[:room], data[room:])
        idle, self.begins, self.ends = not self.reading, 0, 0
        self.parser.feed_data(piece)
        if self.in_head and not self.ends and self.begins == (1 if idle else 0):
            self.head_size += len(piece)
            if self.head_size > limit:
                self._refuse(HeadTooLarge("the request head", limit, "router.max_head"))
        return rest

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.unread is not None:
            self.unread.cancel()
        self.door.connections.discard(self)
        if self.exchange is not None:
            self.exchange.client_gone()
        elif self.task is not None:
            self.task.cancel()  # waiting for a turn or a load: leave the queue

    def pause_writing(self) -> None:  # a slow reader: stop reading the engine until it catches up
        if self.unread is None:
            self.unread = asyncio.get_running_loop().call_later(self.door.config.stream_idle_timeout, self._unread)
        if self.exchange is not None:
            self.exchange.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.unread is not None:
            self.unread.cancel()
            self.unread = None
        if self.exchange is not None:
            self.exchange.upstream.resume_reading()

    def _unread(self) -> None:
        """The client read nothing for router.stream_idle_timeout while its answer waited: it holds
        the model's request (and the engine's slot) for nothing. Aborted, not closed: a close would
        wait for the unread bytes to go out first, for ever; connection_lost ends the exchange."""
        self.unread = None
        if self.closed:
            return
        model = self.exchange.model if self.exchange is not None else None
        log.warning("router: a client%s read nothing of its answer for %g s (router.stream_idle_timeout): its "
                    "connection is closed", f" of model '{model}'" if model else "", self.door.config.stream_idle_timeout,
                    extra={"model": model} if model else None)
        self.transport.abort()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url, self.url_size, self.body, self.body_size, self.expect_continue = [], 0, [], 0, False
        self.authorization, self.reading, self.head_size, self.headers = b"", True, 0, 0
        self.host = self.origin = None
        self.browser = False
        self.begins += 1
        self._arm_timer()

    def on_url(self, url: bytes) -> None:
        self.url_size += len(url)  # the URL comes in pieces, one per feed: joined once, at the end
        if len(self.parser.get_method()) + self.url_size + 10 > self.door.config.max_request_line:  # " ", " HTTP/1.1"
            self._refuse(UrlTooLong("the request line", self.door.config.max_request_line, "router.max_request_line"))
        else:
            self.url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        config = self.door.config
        if self.headers > config.max_headers:
            self._refuse(HeadTooLarge("the number of header lines", config.max_headers, "router.max_headers", "lines"))
        elif len(name) + len(value) + 2 > config.max_header_line:  # "name: value"
            self._refuse(HeadTooLarge(f"the header line {name[:64].decode(errors='replace')}", config.max_header_line,
                                      "router.max_header_line"))
        name = name.lower()
        if name == b"content-length" and value.isdigit() and int(value) > self.door.config.max_body:
            self._too_large()
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif name == b"authorization":
            self.authorization = value
        elif name == b"host":
            self.host = value
        elif name == b"origin":
            self.origin = value
        elif name.startswith(b"sec-fetch-"):
            self.browser = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.refusal is not None or self.closed:
            return
        if self.expect_continue and not self.too_large:  # curl waits for this before sending a large body
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.door.config.max_body:
            self._too_large()
            if self.body_size > 4 * self.door.config.max_body:  # read on to the end, but not forever
                self.close()
        elif not self.too_large:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.reading, self.in_head, self.head_size = False, True, 0
        self.ends += 1
        self.deadline = None  # no limit while the answer is produced; the handle fires and finds none
        if self.refusal is not None or self.closed:
            return
        if self.too_large:  # the 413 is sent; the body is read to its end so the client gets it, not a reset
            self.close()
            return
        url = self.url[0] if len(self.url) == 1 else b"".join(self.url)
        path = url.split(b"?", 1)[0]
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.queue.append(Request(self.parser.get_method(), path, body, self.parser.should_keep_alive(),
                                  self.authorization, self.host, self.origin, self.browser))
        if self.task is None:
            self.task = asyncio.ensure_future(self._serve_queue())

    # -- answering -------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue.popleft()
                self.head_only = request.method == b"HEAD"
                try:
                    same_site(request, self.door.config)
                    await self.door.serve(request, self)
                except LessorError as exc:
                    self.respond_error(exc, request.keep_alive)
                self.head_only = False
                if not request.keep_alive:
                    self.close()
            if self.refusal is not None:  # what followed the requests just answered could not be read
                self._answer_refusal(self.refusal)
        except Exception:
            log.exception("router: unhandled error")
            self.respond_error(InvariantBroken("internal error; see lessord's log"), False)
            self.close()
        finally:
            self.task = None
            if not self.closed and not self.reading:
                self._arm_timer()

    async def relay(self, upstream: UpstreamConnection, address: tuple[str, int], request: Request, model: str) -> int:
        """Send the request to the engine and its answer to this client as it arrives; the answer's
        status (CLIENT_GONE when the client left first)."""
        if self.closed:
            upstream.close()
            return CLIENT_GONE
        host, port = address
        exchange = self.exchange = Exchange(self, upstream, request.keep_alive, model)
        upstream.send(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                      % (request.path, host.encode(), port, len(request.body)) + request.body, exchange)
        try:
            return await exchange.done
        finally:
            self.exchange = None

    def respond(self, status: int, body: bytes, keep_alive: bool, headers: dict[str, str] | None = None,
                content_type: bytes = b"application/json") -> None:
        if self.closed:
            return
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
                             % (status, REASONS.get(status, b""), content_type, len(body), extra,
                                b"" if keep_alive else b"Connection: close\r\n") + (b"" if self.head_only else body))

    def respond_json(self, status: int, data: dict, keep_alive: bool) -> None:
        self.respond(status, json.dumps(data).encode(), keep_alive)

    def respond_error(self, exc: LessorError, keep_alive: bool) -> None:
        self.respond(http_status(exc), json.dumps(openai_envelope(exc)).encode(), keep_alive, http_headers(exc))

    def _too_large(self) -> None:
        if not self.too_large and self.refusal is None:
            self.too_large = True
            self.respond_error(BodyTooLarge(self.door.config.max_body, "router.max_body"), False)

    def _refuse(self, error: LessorError) -> None:
        """Answer a request that cannot be read on, then close: the rest of the stream is unusable.
        Requests read before it are answered first, in order; nothing more is read meanwhile."""
        if self.closed:
            return
        if self.refusal is None:
            self.refusal = error
        if self.task is not None or self.queue:
            self.transport.pause_reading()
        else:
            self._answer_refusal(self.refusal)

    def _answer_refusal(self, refusal: LessorError) -> None:
        self.head_only = False
        self.respond_error(refusal, False)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


def same_site(request: Request, config: RouterConfig) -> None:
    """A request from another site's page (its Host or Origin) is refused before it does anything:
    no load, no eviction; with API keys too (a page may hold none, but it must not try). The Host
    is checked on what a browser sent (an Origin, which it sends with every POST, or Sec-Fetch-*):
    a client that is no browser (an SDK, a container calling host.docker.internal) cannot be a
    rebound page, and may use whatever name reaches the box."""
    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("latin-1")
    host = text(request.host) if request.origin is not None or request.browser else None
    try:
        SiteRules.cached(config, "router").check(host, text(request.origin))
    except CrossSiteRequest as exc:
        if len(_REFUSED) < 64 and exc.value not in _REFUSED:  # once each: a page may retry without end
            _REFUSED.add(exc.value)
            log.warning("router: %s", exc)
        raise


_REFUSED: set[str] = set()  # the Host and Origin values same_site refused and said
