"""The admin API's HTTP/1.1 listener: aiohttp's protocol, with the guards the router has.

aiohttp parses and serves; in front of its parser a `Framer` reads each byte once to learn where
each request ends and whether its head keeps within `admin.max_*`. So a request over a limit is
refused at the limit (414/431) without anything past it being read; a request whose head (or
whole body) is not in within `admin.request_timeout` gets 408; and the bytes of pipelined
requests reach aiohttp one request at a time, so a request that follows garbage is answered
before the garbage's 400 (fed together, aiohttp's parser dropped it with the error).

Owns the listening sites, the protocol and the body's deadline (a middleware). Not here: the
routes and their errors (api/admin.py, api/errors.py), the router's own HTTP (api/connection.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from ..daemon.config.schema import AdminConfig
from ..daemon.errors import LessorError
from .errors import error_response
from .refusals import HeadTooLarge, MalformedRequest, RequestTimedOut, UrlTooLong

log = logging.getLogger("lessor.api")

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, OPAQUE, DONE = range(8)
CHUNK_LINE = 1024  # a chunk-size line (hex size and extensions) longer than this is not framed
BROKEN = b"\x00"  # a byte no request head may hold: aiohttp's parser refuses at it, in order


@dataclass(frozen=True)
class HeadLimits:
    request_line: int
    header_line: int
    headers: int
    head: int
    section: str  # the config section, for the messages ("admin")

    @classmethod
    def of(cls, config, section: str) -> HeadLimits:
        return cls(config.max_request_line, config.max_header_line, config.max_headers, config.max_head, section)


class Framer:
    """Where each request of a byte stream begins, where its head ends, where it ends, and the
    first byte past a head limit. Each byte is looked at once and a head keeps at most one line
    (bounded by the limits), so the work is linear in the input. What it cannot frame (a bad
    Content-Length, a bad chunk) it passes on whole: aiohttp refuses it with a 400."""

    def __init__(self, limits: HeadLimits) -> None:
        self.limits = limits
        self.state = HEAD
        self._reset()

    def _reset(self) -> None:
        self.state, self.started, self.first_line = HEAD, False, True
        self.line = bytearray()
        self.head_size = self.headers = self.remaining = 0
        self.length: bytes | None = None
        self.chunked = self.unframed = False

    def feed(self, data: bytes) -> list[tuple[str, int, LessorError | None]]:
        """Events in `data` with their offsets: ("begin", i) a request's first byte, ("head", i)
        just past its head, ("end", i) just past the request, ("refuse", i, error) the byte that
        passed a limit (nothing after it is looked at)."""
        events: list[tuple[str, int, LessorError | None]] = []
        pos, size = 0, len(data)
        while pos < size and self.state not in (OPAQUE, DONE):
            if self.state == HEAD:
                pos = self._head(data, pos, events)
            elif self.state in (BODY, CHUNK_DATA):
                take = min(self.remaining, size - pos)
                pos, self.remaining = pos + take, self.remaining - take
                if not self.remaining:
                    self._body_done(pos, events)
            else:
                pos = self._chunk_line(data, pos, events)
        return events

    def _line(self, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int, int | None]:
        """The line from `pos` (without its CRLF) when its end is in `data`, the position after it,
        and the offset of the byte past `limit` if the line goes over it."""
        newline = data.find(b"\n", pos, pos + limit + 2 - len(self.line))
        end = newline if newline >= 0 else min(len(data), pos + limit + 2 - len(self.line))
        if len(self.line) + end - pos > limit + 1:  # + 1: the line's CR
            return None, end, pos + limit + 1 - len(self.line)
        if newline < 0:
            self.line += data[pos:end]
            return None, end, None
        line = bytes(self.line + data[pos:newline]) if self.line else data[pos:newline]
        self.line.clear()
        return line.removesuffix(b"\r"), newline + 1, None

    def _head(self, data: bytes, pos: int, events: list) -> int:
        if not self.started:
            if data[pos] in b"\r\n":  # the CRLF a client may send after a body
                return pos + 1
            self.started = True
            events.append(("begin", pos, None))
        limits = self.limits
        limit = limits.request_line if self.first_line else limits.header_line
        line, after, over = self._line(data, pos, limit)
        error = None if over is None else self._too_long()
        if self.head_size + after - pos > limits.head and (over is None or pos + limits.head - self.head_size < over):
            over = pos + limits.head - self.head_size
            error = HeadTooLarge("the request head", limits.head, f"{limits.section}.max_head")
        if error is not None:
            events.append(("refuse", over, error))
            self.state = DONE
            return len(data)
        self.head_size += after - pos
        if line is not None:
            self._head_line(line, after, events)
        return after

    def _too_long(self) -> LessorError:
        limits, section = self.limits, self.limits.section
        if self.first_line:
            return UrlTooLong("the request line", limits.request_line, f"{section}.max_request_line")
        return HeadTooLarge("a header line", limits.header_line, f"{section}.max_header_line")

    def _head_line(self, line: bytes, after: int, events: list) -> None:
        if self.first_line:
            self.first_line = False
        elif line:
            self.headers += 1
            if self.headers > self.limits.headers:
                events.append(("refuse", after, HeadTooLarge("the number of header lines", self.limits.headers,
                                                             f"{self.limits.section}.max_headers", "lines")))
                self.state = DONE
                return
            self._framing(line)
        else:
            events.append(("head", after, None))
            self._head_done(after, events)

    def _framing(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit() or (self.length is not None and self.length != value):
                self.unframed = True
            self.length = value
        elif name == b"transfer-encoding":
            self.chunked = value.lower().endswith(b"chunked")
            self.unframed = self.unframed or not self.chunked

    def _head_done(self, after: int, events: list) -> None:
        if self.unframed:  # the head is read whole (its limits hold), the rest is aiohttp's to refuse
            self.state = OPAQUE
        elif self.chunked:
            self.state = CHUNK_SIZE
        elif self.length is not None and int(self.length):
            self.state, self.remaining = BODY, int(self.length)
        else:
            self._end(after, events)

    def _body_done(self, pos: int, events: list) -> None:
        if self.state == CHUNK_DATA:
            self.state = CHUNK_END
        else:
            self._end(pos, events)

    def _chunk_line(self, data: bytes, pos: int, events: list) -> int:
        line, after, over = self._line(data, pos, CHUNK_LINE)
        if over is not None:
            self.state = OPAQUE
            return after
        if line is None:
            return after
        if self.state == CHUNK_SIZE:
            digits = line.split(b";", 1)[0].strip()
            try:
                size = int(digits, 16)
            except ValueError:
                self.state = OPAQUE
                return after
            self.state, self.remaining = (TRAILER, 0) if size == 0 else (CHUNK_DATA, size)
        elif self.state == CHUNK_END:
            self.state = CHUNK_SIZE if not line else OPAQUE
        elif not line:  # the empty line that ends the trailers
            self._end(after, events)
        return after

    def _end(self, after: int, events: list) -> None:
        events.append(("end", after, None))
        self._reset()


class AdminProtocol(web.RequestHandler):
    """aiohttp's protocol, fed through a Framer: limits, the head's timeout, one request at a time.
    A refusal is queued behind the requests read before it (aiohttp answers in order): the parser
    is fed a byte it refuses, and `handle_error` answers with the refusal's own status and JSON."""

    def __init__(self, manager: web.Server, config: AdminConfig) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(),
                         access_log=None,  # type: ignore[arg-type]  # None turns it off (aiohttp's annotation says Logger)
                         # after a 408 or 413, what is left of the body is read (so the client gets the
                         # answer, not a reset) for no longer than the request itself could take
                         keepalive_timeout=2 * config.request_timeout, lingering_time=min(10.0, config.request_timeout),
                         max_line_size=config.max_request_line,
                         max_field_size=config.max_header_line, max_headers=config.max_headers)
        self.config, self.clock = config, asyncio.get_running_loop()
        self.framer = Framer(HeadLimits.of(config, "admin"))
        self.refusal: LessorError | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.deadlines: deque[float] = deque()  # per request whose head is in: when it must be in whole

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return
        start = 0
        for kind, at, error in self.framer.feed(data):
            if kind == "begin":
                self.deadline = self.clock.time() + self.config.request_timeout
                self.timer = self.clock.call_at(self.deadline, self._timed_out)
            elif kind == "head":
                self._disarm()
                self.deadlines.append(self.deadline)
            elif kind == "end":
                super().data_received(data[start:at])
                start = at
            else:
                super().data_received(data[start:at])
                assert error is not None, "the Framer's refusal carries its error"
                self._refuse(error)
                return
        if start < len(data):
            super().data_received(data[start:])

    def _timed_out(self) -> None:
        self.timer = None
        if self.framer.state == HEAD and self.framer.started:  # a body's deadline is request_deadline's
            self._refuse(RequestTimedOut(self.config.request_timeout, "admin.request_timeout"))

    def _refuse(self, error: LessorError) -> None:
        self._disarm()
        self.refusal = error
        if self.transport is not None:  # nothing more is read: the answer goes out, then the connection closes
            self.transport.pause_reading()
        super().data_received(BROKEN)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request that could not be read: one INFO line and lessor's envelope, not aiohttp's
        ERROR with a traceback and text/plain (anyone who can connect could flood the log)."""
        if status != 400 or (self.refusal is None and not isinstance(exc, HttpProcessingError)):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is already on its way; the connection cannot carry another")
        if self.refusal is not None:
            error = self.refusal
        else:
            assert isinstance(exc, HttpProcessingError)  # the test above
            error = _typed(exc)
        response = error_response(error)
        log.info("admin API: request refused %d: %s", response.status, error.message()[:200])
        response.force_close()
        return response


def _typed(exc: HttpProcessingError) -> LessorError:
    if isinstance(exc, LineTooLong):  # aiohttp's own limits are ours, so the Framer refuses first; kept as a net
        return HeadTooLarge("a line of the request head", 0, "admin.max_header_line")
    return MalformedRequest(f"malformed HTTP request: {str(exc.message).splitlines()[0][:200]}")


@web.middleware
async def request_deadline(request: web.Request, handler) -> web.StreamResponse:
    """The body must be in by the request's deadline (its first byte + admin.request_timeout):
    read here, whole, before the handler runs (handlers read it again from aiohttp's cache).
    A client that leaves mid-body is one INFO line: nobody is left to answer."""
    protocol = request.protocol
    if isinstance(protocol, AdminProtocol) and request.can_read_body:
        config = protocol.config
        deadline = protocol.deadlines.popleft() if protocol.deadlines else protocol.clock.time() + config.request_timeout
        try:
            if request.content.is_eof():  # all in: a request whose turn came late (pipelined behind a
                await request.read()  # slow handler) is no slow client, and the read cannot block
            else:  # (asyncio.timeout_at, which lets a read that need not wait finish, is Python 3.11's)
                await asyncio.wait_for(request.read(), deadline - protocol.clock.time())
        except asyncio.TimeoutError:
            response = error_response(RequestTimedOut(config.request_timeout, "admin.request_timeout"))
            response.force_close()
            return response
        except ConnectionError as exc:
            log.info("admin API: %s %s: the client left before its body was in (%s)", request.method, request.path,
                     exc or type(exc).__name__)
            return web.Response(status=400)
    elif isinstance(protocol, AdminProtocol) and protocol.deadlines:
        protocol.deadlines.popleft()
    return await handler(request)


class AdminSite(web.BaseSite):
    """A listening socket (TCP, or a unix socket's path) whose connections get AdminProtocol."""

    def __init__(self, runner: web.BaseRunner, config: AdminConfig, host: str = "", port: int = 0,
                 path: str | None = None) -> None:
        super().__init__(runner)
        self.config, self.host, self.port, self.path = config, host, port, path

    @property
    def name(self) -> str:
        return f"http://unix:{self.path}:" if self.path else f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop, server, config = asyncio.get_running_loop(), self._runner.server, self.config
        assert server is not None  # super().start() set the runner up

        def protocol() -> AdminProtocol:
            return AdminProtocol(server, config)
        if self.path:
            self._server = await loop.create_unix_server(protocol, self.path)
        else:
            self._server = await loop.create_server(protocol, self.host, self.port)
