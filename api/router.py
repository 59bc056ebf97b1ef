"""The router's HTTP side: the OpenAI-compatible front door on `router.listen`.

An HTTP/1.1 server on asyncio protocols and httptools (the parser uvicorn uses), because every
request to every model crosses it: a request's body is read once, parsed once to learn `model`
(and `stream`), and sent upstream as the same bytes; the answer's body comes back piece by piece
as the engine writes it (re-framed as chunked when the engine gave no length), so streams are
never buffered. A client that disconnects closes its upstream connection, so the engine stops.

Errors use OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, so OpenAI clients
show them; `code` is lessor's typed error name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from ..daemon.config import RouterConfig
from ..daemon.errors import Forbidden, InvalidRequest, LessorError, UnknownModel, UpstreamFailed
from ..daemon.lanes import Lane
from ..daemon.traffic import TrafficControl
from ..daemon.supervisor import Supervisor
from .errors import http_status, retry_after
from .proxy import UpstreamPool

try:
    from orjson import loads as json_loads
except ImportError:  # orjson is a dependency; the standard library still works without it
    from json import loads as json_loads

log = logging.getLogger("lessor.router")

PROXIED = frozenset((b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"))
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before the answer
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus} | {CLIENT_GONE: b"Client Closed Request"}


class ClientError(Exception):
    """A request the router answers itself with an error (before or instead of forwarding)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers or {}

    @classmethod
    def of(cls, exc: LessorError) -> "ClientError":
        status = http_status(exc)
        return cls(status, exc.message(), exc.type, getattr(exc, "field", None), retry_after(exc, status))

    def body(self) -> bytes:
        return json.dumps({"error": {"message": str(self), "type": ERROR_TYPES.get(self.status, "server_error"),
                                     "param": self.param, "code": self.code}}).encode()


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


@dataclass
class Request:
    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool
    authorization: bytes = b""


EVERY_MODEL = None  # a key whose models include "*"


@dataclass(frozen=True)
class KeyAccess:
    digest: bytes  # sha256 of the key: compared in constant time, the key itself is not kept
    models: frozenset[str] | None  # model names (aliases resolved); EVERY_MODEL for "*"


class ApiKeys:
    """router.api_keys: who may use which model. Empty: the router is open."""

    def __init__(self, config: RouterConfig, supervisor: Supervisor) -> None:
        self.keys = []
        for key in config.api_keys:
            models = EVERY_MODEL if "*" in key.models else frozenset(supervisor.resolve(m).spec.name for m in key.models)
            self.keys.append(KeyAccess(hashlib.sha256(key.secret().encode()).digest(), models))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: bytes) -> KeyAccess:
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise ClientError(401, "this router needs 'Authorization: Bearer <API key>' (router.api_keys)",
                              "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="lessor"'})
        digest = hashlib.sha256(given.strip()).digest()
        found = None
        for key in self.keys:  # every key is compared, so the time says nothing about which matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise ClientError(401, "the API key is not valid", "invalid_api_key",
                              headers={"WWW-Authenticate": 'Bearer realm="lessor"'})
        return found


def allows(access: KeyAccess | None, model: str) -> bool:
    return access is None or access.models is EVERY_MODEL or model in access.models


class FrontDoor:
    """What every client connection shares: the router, the model list, the upstream pool."""

    def __init__(self, router: TrafficControl, supervisor: Supervisor, config: RouterConfig) -> None:
        self.router, self.supervisor, self.config = router, supervisor, config
        self.keys = ApiKeys(config, supervisor)
        self.pool = UpstreamPool()
        self.connections: set[ClientConnection] = set()
        self._addresses: dict[str, tuple[str, int]] = {}

    def address(self, base_url: str) -> tuple[str, int]:
        address = self._addresses.get(base_url)
        if address is None:
            url = httptools.parse_url(base_url.encode())
            address = self._addresses[base_url] = (url.host.decode(), url.port or 80)
        return address

    def models(self, access: KeyAccess | None) -> dict:
        data = []
        for record in self.supervisor.records():
            spec = record.spec
            if not allows(access, spec.name):
                continue
            entry = {"object": "model", "created": 0, "owned_by": "lessor", "state": record.state.value,
                     "engine": spec.engine.kind}
            data.append({"id": spec.name, **entry, "aliases": list(spec.aliases)})
            data.extend({"id": alias, **entry, "alias_of": spec.name} for alias in spec.aliases)
        return {"object": "list", "data": data}

    def lane(self, name: str, access: KeyAccess | None) -> Lane:
        """The model's lane, if this key may use it. To a key limited to some models, the others
        do not exist: an unknown name lists only what the key may use."""
        try:
            lane = self.router.lane(name)
        except UnknownModel as exc:
            if access is not None and access.models is not EVERY_MODEL:
                raise UnknownModel(name, [n for n in exc.known if allows(access, self.router.lane(n).name)]) from None
            raise
        if not allows(access, lane.name):
            raise Forbidden(name, tuple(sorted(access.models or ())))
        return lane

    def model(self, name: str, access: KeyAccess | None) -> dict:
        record = self.lane(name, access).record
        return {"id": name, "object": "model", "created": 0, "owned_by": "lessor", "state": record.state.value,
                "model": record.spec.name}


class ClientConnection(asyncio.Protocol):
    """One client's keep-alive connection. Requests are answered one at a time, in order."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.expect_continue = False
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task | None = None
        self.exchange: Exchange | None = None
        self.authorization = b""
        self.closed = False
        self.reading = False  # between a request's first byte and its end
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.door.connections.add(self)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """A client gets router.request_timeout to send a whole request, and as long to start the
        next one: a slow or silent client cannot hold a connection (and its memory) forever.
        No limit while its answer is being produced: generation takes as long as it takes."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.door.config.request_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self.reading:
            self._refuse(ClientError(408, f"the request was not received whole within router.request_timeout "
                                          f"({self.door.config.request_timeout:g} s)", "request_timeout"))
        elif self.task is None:  # idle keep-alive connection
            self.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(ClientError(400, "protocol upgrades are not supported", "bad_request"))
        except httptools.HttpParserError as exc:
            if not self.too_large:
                self._refuse(ClientError(400, f"malformed HTTP request: {exc}", "bad_request"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.door.connections.discard(self)
        if self.exchange is not None:
            self.exchange.client_gone()
        elif self.task is not None:
            self.task.cancel()  # waiting for a turn or a load: leave the queue

    def pause_writing(self) -> None:  # a slow reader: stop reading the engine until it catches up
        if self.exchange is not None:
            self.exchange.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url, self.body, self.body_size, self.expect_continue = b"", [], 0, False
        self.authorization, self.reading = b"", True
        self._arm_timer()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" and value.isdigit() and int(value) > self.door.config.max_body:
            self._too_large()
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif name == b"authorization":
            self.authorization = value

    def on_headers_complete(self) -> None:
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
        self.reading = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.too_large:  # the 413 is sent; the body is read to its end so the client gets it, not a reset
            self.close()
            return
        path = self.url.split(b"?", 1)[0]
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.queue.append(Request(self.parser.get_method(), path, body, self.parser.should_keep_alive(),
                                  self.authorization))
        if self.task is None:
            self.task = asyncio.ensure_future(self._serve_queue())

    # -- answering -------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue.popleft()
                try:
                    await self._serve(request)
                except ClientError as exc:
                    self.respond(exc.status, exc.body(), request.keep_alive, exc.headers)
                except LessorError as exc:
                    error = ClientError.of(exc)
                    self.respond(error.status, error.body(), request.keep_alive, error.headers)
                if not request.keep_alive:
                    self.close()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("router: unhandled error")
            self.respond(500, ClientError(500, "internal error; see lessord's log", "internal_error").body(), False)
            self.close()
        finally:
            self.task = None
            if not self.closed and not self.reading:
                self._arm_timer()

    async def _serve(self, request: Request) -> None:
        access = None
        if self.door.keys and request.path != b"/health":
            access = self.door.keys.check(request.authorization)
        if request.path in PROXIED:
            if request.method != b"POST":
                raise ClientError(405, f"{request.path.decode()} takes POST", "method_not_allowed", headers={"Allow": "POST"})
            await self._proxy(request, access)
        elif request.method != b"GET":
            known = request.path.startswith(b"/v1/models") or request.path == b"/health"
            raise ClientError(405 if known else 404,
                              f"no route for {request.method.decode()} {request.path.decode(errors='replace')}",
                              "method_not_allowed" if known else "not_found", headers={"Allow": "GET"} if known else None)
        elif request.path == b"/v1/models":
            self.respond_json(200, self.door.models(access), request.keep_alive)
        elif request.path.startswith(b"/v1/models/"):
            self.respond_json(200, self.door.model(request.path[11:].decode(errors="replace"), access), request.keep_alive)
        elif request.path == b"/health":
            self.respond_json(200, {"status": "ok"}, request.keep_alive)
        else:
            raise ClientError(404, f"no route for GET {request.path.decode(errors='replace')}; the router serves "
                                   "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models", "not_found")

    async def _proxy(self, request: Request, access: KeyAccess | None) -> None:
        door = self.door
        model, stream = parse_body(request.body)
        router = door.router
        lane = door.lane(model, access)  # an unknown name is not counted: clients must not create metric labels
        try:
            base_url = router.try_start(lane) or await router.wait_turn(lane)
        except LessorError as exc:
            router.count(lane.name, http_status(exc))
            raise
        status = CLIENT_GONE
        try:
            status = await self._forward(lane, base_url, request, stream)
        except LessorError as exc:
            status = http_status(exc)
            raise
        finally:
            router.finish(lane)
            router.count(lane.name, status)

    async def _forward(self, lane: Lane, base_url: str, request: Request, stream: bool) -> int:
        host, port = self.door.address(base_url)
        try:
            upstream = await self.door.pool.acquire(host, port)
        except OSError as exc:
            raise UpstreamFailed(lane.name, f"cannot connect to {base_url}: {exc.strerror or exc}") from None
        if self.closed:
            upstream.close()
            return CLIENT_GONE
        exchange = self.exchange = Exchange(self, upstream, request.keep_alive, lane.name)
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
                                b"" if keep_alive else b"Connection: close\r\n") + body)

    def respond_json(self, status: int, data: dict, keep_alive: bool) -> None:
        self.respond(status, json.dumps(data).encode(), keep_alive)

    def _too_large(self) -> None:
        if not self.too_large:
            self.too_large = True
            error = ClientError(413, f"the body is larger than router.max_body ({self.door.config.max_body} bytes)",
                                "body_too_large")
            self.respond(error.status, error.body(), False)

    def _refuse(self, error: ClientError) -> None:
        """Answer a request that cannot be read on, then close: the rest of the stream is unusable."""
        self.respond(error.status, error.body(), False)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


class Exchange:
    """One forwarded request: the upstream's answer goes to the client as it arrives."""

    def __init__(self, client: ClientConnection, upstream, keep_alive: bool, model: str) -> None:
        self.client, self.upstream, self.keep_alive, self.model = client, upstream, keep_alive, model
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.chunked = False
        self.status = 0

    def upstream_head(self, status: int, content_type: bytes, length: int | None) -> None:
        self.status = status
        self.chunked = length is None
        framing = b"Transfer-Encoding: chunked\r\n" if self.chunked else b"Content-Length: %d\r\n" % length
        stream = b"Cache-Control: no-cache\r\n" if content_type.startswith(b"text/event-stream") else b""
        self.client.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n"
                                    % (status, REASONS.get(status, b""), content_type, framing, stream,
                                       b"" if self.keep_alive else b"Connection: close\r\n"))

    def upstream_body(self, data: bytes) -> None:
        if self.chunked:
            self.client.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.client.transport.write(data)

    def upstream_end(self) -> None:
        if self.chunked:
            self.client.transport.write(b"0\r\n\r\n")
        if not self.done.done():
            self.done.set_result(self.status)

    def upstream_lost(self, reason: str) -> None:
        if self.done.done():
            return
        if self.status:  # the head is sent: end the stream short (no final chunk) so the client sees it
            log.warning("router: the engine of %s broke an answer: %s", self.model, reason)
            self.client.close()
            self.done.set_result(502)
        else:
            self.done.set_exception(UpstreamFailed(self.model, reason))

    def client_gone(self) -> None:
        self.upstream.close()
        if not self.done.done():
            self.done.set_result(CLIENT_GONE)


class RouterServer:
    """The listening socket and its connections; closing drains, then cuts what is left."""

    def __init__(self, door: FrontDoor, server: asyncio.base_events.Server) -> None:
        self.door, self.server = door, server

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 10.0) -> None:
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.task is not None for c in self.door.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.door.connections):
            conn.close()
        self.door.pool.close()


async def start_router(router: TrafficControl, supervisor: Supervisor, config: RouterConfig,
                       host: str, port: int) -> RouterServer:
    door = FrontDoor(router, supervisor, config)
    server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(door), host, port)
    return RouterServer(door, server)
