"""Upstream connections for the router: a keep-alive pool per engine address, and one exchange
(request out, response back) at a time per connection.

Built on asyncio protocols and httptools' C parser rather than an HTTP client library, because
this is the router's hot path: the request goes out as one buffer, the response is parsed only
to learn its status, content type and where it ends, and each body piece is handed to the
`Sink` (the client's connection) the moment it arrives. Nothing is buffered whole or
re-encoded.

An exchange is bounded in time (router.first_byte_timeout until the answer's body begins,
router.stream_idle_timeout between its pieces): an engine that stops answering is cut, its
connection closed (never pooled again), so one stalled request cannot hold its model for ever.
While the client's side has paused reading (a slow reader), the engine is not timed: the client's
connection times that wait (api/connection.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import httptools

# Engines close idle keep-alive connections after a while (aiohttp: 75 s, uvicorn: 5 s); a request
# written to one that is closing fails. Connections idle longer than this are not reused.
IDLE_S = 4.0


class Sink(Protocol):
    """Where an upstream response goes (the router's client connection)."""

    def upstream_head(self, status: int, content_type: bytes, length: int | None) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_lost(self, reason: str) -> None: ...
    def upstream_flush(self) -> None: ...
    def upstream_stalled(self, answering: bool, timeout_s: float) -> None:
        """The engine sent nothing for `timeout_s`: before its body began (`answering` False) or within it."""


class UpstreamConnection(asyncio.Protocol):
    transport: asyncio.Transport  # connection_made's: the pool hands a connection out once it is connected

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.content_type = b"application/json"
        self.length: int | None = None
        self.chunked = self.until_eof = False
        self.closed = False
        self.idle_since = 0.0
        # The exchange's deadline (loop time): moved on by each read once the body has begun, looked
        # at when its one timer fires (a timer per read would cost more than the read).
        self.timer: asyncio.TimerHandle | None = None
        self.due_s = 0.0
        self.answering = False  # the body has begun: the idle bound applies from now
        self.paused = False  # the client reads slowly: the engine is not timed meanwhile

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the engine sent a malformed response: {exc}")
            return
        if sink is not None and self.sink is sink:  # what this read brought goes out as one client write
            if self.answering:
                self.due_s = self.loop.time() + self.pool.idle_s
            sink.upstream_flush()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.sink is not None and exc is None and self.until_eof:
            self.on_message_complete()  # an HTTP/1.0-style answer: its end is the connection's end
        elif self.sink is not None:
            self._fail("the engine closed the connection" + (f": {exc}" if exc else ""))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name == b"content-length":
            self.length = int(value)
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.until_eof = self.length is None and not self.chunked
        if self.sink is not None:
            self.sink.upstream_head(self.parser.get_status_code(), self.content_type, self.length)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            if not self.answering:  # the idle bound from now: sooner than the first byte's, so a timer of its own
                self.answering = True
                self._disarm()
                self.due_s = self.loop.time() + self.pool.idle_s
                self.timer = self.loop.call_at(self.due_s, self._look)
            self.sink.upstream_body(body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        self._disarm()
        keep = self.parser.should_keep_alive()
        if keep:
            self.pool.release(self)
        else:
            self.close()
        if sink is not None:
            sink.upstream_end()

    # -- the exchange ----------------------------------------------------------------------

    def send(self, request: bytes, sink: Sink) -> None:
        self.sink, self.content_type, self.length = sink, b"application/json", None
        self.chunked = self.until_eof = self.answering = self.paused = False
        if self.closed or self.transport.is_closing():
            # Closed by the engine (killed, unloading) after the pool handed it out, its
            # connection_lost not yet run: uvloop raises on a write to it, asyncio drops it.
            self._fail("the engine closed the connection")
            return
        self.due_s = self.loop.time() + self.pool.first_byte_s
        self.timer = self.loop.call_at(self.due_s, self._look)
        self.transport.write(request)

    def pause_reading(self) -> None:
        if not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.paused = False
            if self.answering:  # the engine's silence counts from now, not from before the pause
                self.due_s = self.loop.time() + self.pool.idle_s
            self.transport.resume_reading()

    def _look(self) -> None:
        """The exchange's timer: cut it if the engine has been silent past its bound, else wait on."""
        self.timer = None
        if self.sink is None or self.closed:
            return
        now = self.loop.time()
        if self.paused:  # a slow client: its connection times that; the engine is looked at again later
            self.due_s = max(self.due_s, now + self.pool.idle_s)
        if now < self.due_s:
            self.timer = self.loop.call_at(self.due_s, self._look)
            return
        sink, self.sink = self.sink, None
        self.close()  # the engine sees its client gone and drops the request
        sink.upstream_stalled(self.answering, self.pool.idle_s if self.answering else self.pool.first_byte_s)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, reason: str) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.upstream_lost(reason)

    def close(self) -> None:
        """Drop the connection (never back to the pool): the engine sees its client gone."""
        self.sink = None
        self._disarm()
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (host, port); a busy one is never shared. `first_byte_s` bounds
    connecting and an answer's start, `idle_s` the silence within an answer."""

    def __init__(self, first_byte_s: float = 600.0, idle_s: float = 120.0) -> None:
        self.first_byte_s, self.idle_s = first_byte_s, idle_s
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    async def acquire(self, host: str, port: int) -> UpstreamConnection:
        key = (host, port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing() and time.monotonic() - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        # Bounded: an engine whose accept queue is full (stopped, hung) would hold it for the kernel's
        # minutes of SYN retries. asyncio.TimeoutError is raised to the caller.
        _, conn = await asyncio.wait_for(loop.create_connection(lambda: UpstreamConnection(self, key), host, port),
                                         self.first_byte_s)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in list(conns):
                conn.close()
        self._idle.clear()
