"""One forwarded request's answer on its way back: what the engine sends is written to the client
as it arrives (api/connection.py's ClientConnection owns the client's side, api/proxy.py's
UpstreamConnection the engine's). Owns the answer's framing, one client write per upstream read,
and how an answer ends early: the engine failed or stalled, a drain cut it, or the client left.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

from ..daemon.errors import LessorError
from ..daemon.traffic.request_errors import UpstreamFailed, UpstreamTimedOut
from .errors import http_status, openai_envelope
from .proxy import UpstreamConnection

if TYPE_CHECKING:
    from .connection import ClientConnection

log = logging.getLogger("lessor.router")

CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus} | {CLIENT_GONE: b"Client Closed Request"}


class Exchange:
    """One forwarded request: the upstream's answer goes to the client as it arrives.

    One client write per upstream read (a write is a syscall, and the router's CPU per request is
    mostly syscalls): what the parser hands over during one read is gathered in `out` and written by
    `upstream_flush` (or `upstream_end`, with the chunked terminator). The head is held until the
    first body piece or the end, so a plain answer is one write, and an engine that fails before
    its body gets the client a clean 502 rather than a cut stream."""

    def __init__(self, client: ClientConnection, upstream: UpstreamConnection, keep_alive: bool, model: str) -> None:
        self.client, self.upstream, self.keep_alive, self.model = client, upstream, keep_alive, model
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.chunked = False
        self.status = 0
        self.withheld = False  # an engine's 5xx: its body stays in its log, the client gets engine_error()
        self.out: list[bytes] = []  # this read's pieces, the held head first
        self.sent = False  # any byte of the answer has gone to the client
        self.stream = False  # an event stream: a cut one ends with an error event the client's SDK raises

    def upstream_head(self, status: int, content_type: bytes, length: int | None) -> None:
        self.status = status
        if status >= 500:
            self.withheld = True
            return
        self.chunked = length is None
        framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
        self.stream = content_type.startswith(b"text/event-stream")
        stream = b"Cache-Control: no-cache\r\n" if self.stream else b""
        self.out.append(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n"
                        % (status, REASONS.get(status, b""), content_type, framing, stream,
                           b"" if self.keep_alive else b"Connection: close\r\n"))

    def upstream_body(self, data: bytes) -> None:
        if self.withheld:
            return
        if self.chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def upstream_flush(self) -> None:
        """The end of one upstream read: what it brought goes out, unless that is the head alone."""
        if len(self.out) > (0 if self.sent else 1):
            self._write()

    def _write(self) -> None:
        out, self.out = self.out, []
        self.sent = True
        if not self.client.closed:
            self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def upstream_end(self) -> None:
        if self.withheld:
            self.client.respond(self.status, engine_error(self.model, self.status), self.keep_alive)
        else:
            if self.chunked:
                self.out.append(b"0\r\n\r\n")
            self._write()
        if not self.done.done():
            self.done.set_result(self.status)

    def upstream_lost(self, reason: str) -> None:
        if self.done.done():
            return
        if self.sent:  # the head is out: end the stream short (no final chunk) so the client sees it
            log.warning("router: the engine of %s broke an answer: %s", self.model, reason)
            if self.out:
                self._write()
            self.client.close()
            self.done.set_result(502)
        else:  # nothing went out: the client gets a whole 502
            self.out = []
            self.done.set_exception(UpstreamFailed(self.model, reason))

    def client_gone(self) -> None:
        self.upstream.close()
        if not self.done.done():
            self.done.set_result(CLIENT_GONE)

    def upstream_stalled(self, answering: bool, timeout_s: float) -> None:
        if answering:
            error = UpstreamTimedOut(self.model, "sent nothing more of its answer", timeout_s, "router.stream_idle_timeout")
        else:
            error = UpstreamTimedOut(self.model, "sent no first byte of its answer", timeout_s, "router.first_byte_timeout")
        log.warning("router: %s", error.message(), extra={"model": self.model})
        self.abort(error)

    def abort(self, error: LessorError) -> None:
        """End the exchange with `error` before the engine ended it (the engine stalled, or a drain's
        bound cut it); the engine's connection is closed, so it drops the request. Nothing sent yet:
        the client gets the error whole. A stream under way ends with the error as its last event
        (OpenAI's SDKs raise it) and its proper end; another answer under way is cut short."""
        if self.done.done():
            return
        self.upstream.close()
        if not self.sent:
            self.out = []
            self.done.set_exception(error)
            return
        if self.out:
            self._write()
        client = self.client
        if self.stream and self.chunked and not client.closed:
            event = b"data: %s\n\n" % json.dumps(openai_envelope(error)).encode()
            client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            if not self.keep_alive:
                client.close()
        else:
            client.close()
        self.done.set_result(http_status(error))


def engine_error(model: str, status: int) -> bytes:
    """What a client is told of an engine's own failure. Not the engine's body: an engine may put a
    traceback or the server's paths in it, which are the operator's (the engine log keeps them)."""
    return json.dumps({"error": {"message": f"model '{model}': its engine failed ({status} "
                                            f"{REASONS.get(status, b'').decode()}); its log says why "
                                            f"(lessor logs {model})",
                                 "type": "server_error", "param": None, "code": "engine_error"}}).encode()
