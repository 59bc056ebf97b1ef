"""Upstream connections for the router: a keep-alive pool per engine address, and one exchange
(request out, response back) at a time per connection.

Built on asyncio protocols and httptools' C parser rather than an HTTP client library, because
this is the router's hot path: the request goes out as one buffer, the response is parsed only
to learn its status, content type and where it ends, and each body piece is handed to the
`Sink` (the client's connection) the moment it arrives. Nothing is buffered whole or
re-encoded.
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


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool", key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.content_type = b"application/json"
        self.length: int | None = None
        self.chunked = self.until_eof = False
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the engine sent a malformed response: {exc}")
            return
        if sink is not None and self.sink is sink:  # what this read brought goes out as one client write
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
            self.sink.upstream_body(body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
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
        self.chunked = self.until_eof = False
        self.transport.write(request)

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def _fail(self, reason: str) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.upstream_lost(reason)

    def close(self) -> None:
        """Drop the connection (never back to the pool): the engine sees its client gone."""
        self.sink = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (host, port); a busy one is never shared."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    async def acquire(self, host: str, port: int) -> UpstreamConnection:
        key = (host, port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and time.monotonic() - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConnection(self, key), host, port)
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
