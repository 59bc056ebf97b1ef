"""The router's HTTP side: the OpenAI-compatible front door on `router.listen`.

Every request to every model crosses it, so it is built for the hot path: a request's body is
read once, parsed once to learn `model`, and sent upstream as the same bytes (an alias is written
over with the model's name for an engine that serves under one name); the answer's body
comes back piece by piece as the engine writes it (re-framed as chunked when the engine gave no
length), so streams are never buffered. A client that disconnects closes its upstream
connection, so the engine stops. No request holds its model for ever: an engine that stays
silent is cut (router.first_byte_timeout, router.stream_idle_timeout: api/proxy.py), a client
that reads nothing is disconnected (api/connection.py), and a request that runs on while its
model is drained for another model's load is cut at router.drain_timeout (daemon/traffic/lanes.py
decides, `Running.cut` carries it out).

This module owns what a request is answered with (the routes, the model list, which lane serves
it, the metrics count) and the listening socket. The HTTP/1.1 protocol is api/connection.py's,
the engine side api/proxy.py's, API keys api/keys.py's. Errors are typed and rendered in OpenAI's
envelope by api/errors.py, so OpenAI clients show them.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace

import httptools

from ..daemon.config.schema import RouterConfig
from ..daemon.errors import InvalidRequest, LessorError, UnknownModel
from ..daemon.models.load_errors import LoadFailed, ModelFailed
from ..daemon.models.supervisor import Supervisor
from ..daemon.traffic.control import TrafficControl
from ..daemon.traffic.lanes import Lane
from ..daemon.traffic.request_errors import Forbidden, UpstreamFailed, UpstreamTimedOut
from ..daemon.units import parse_duration_or_never
from .connection import ClientConnection, Request
from .errors import MAX_JSON_DEPTH, check_shape, http_status, too_deep
from .exchange import CLIENT_GONE
from .keys import EVERY_MODEL, ApiKeys, KeyAccess, allows
from .proxy import UpstreamPool
from .refusals import MethodNotAllowed, NoRoute

try:
    from orjson import dumps as json_dumps
    from orjson import loads as json_loads
except ImportError:  # orjson is a dependency; the standard library still works without it
    from json import loads as json_loads  # type: ignore[assignment]  # orjson's signature is not json's

    def json_dumps(data) -> bytes:  # type: ignore[misc]
        return json.dumps(data, ensure_ascii=False).encode()

PROXIED = frozenset((b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"))
SERVES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


def parse_body(body: bytes) -> tuple[str, bool, dict]:
    """The request's `model`, whether it asks for a stream, and the parsed body; nothing else is looked at."""
    try:
        data = json_loads(body)
    except ValueError as exc:
        raise InvalidRequest(None, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the standard library's parser (orjson stops at 1024 levels with a ValueError)
        raise too_deep(None) from None
    if not isinstance(data, dict):
        raise InvalidRequest(None, f"the body must be a JSON object, not {type(data).__name__}")
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:  # counted in C: most bodies cannot nest that deep
        check_shape(data)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", "required: the name of a configured model (GET /v1/models lists them)")
    return model, data.get("stream") is True, data


def renamed(data: dict, name: str) -> bytes:
    """The body with `model` set to the model's name: for an alias, to an engine that serves under one name."""
    data["model"] = name
    return json_dumps(data)


def take_keep_alive(data: dict) -> float | None:
    """A request's `keep_alive` (Ollama's field), taken out of the body: lessor honours it, the
    engine does not know it. Seconds, or a duration such as "5m"; 0 = unload once idle; -1 (or
    "never") = forever; other negatives are refused, as in the config (units.DURATION_RULE), not
    read as forever the way Ollama reads them; None when absent."""
    if "keep_alive" not in data:
        return None
    value = data.pop("keep_alive")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest("keep_alive", f"must be seconds or a duration such as \"5m\", not {type(value).__name__}")
    try:
        seconds = parse_duration_or_never(value)
    except ValueError as exc:
        raise InvalidRequest("keep_alive", str(exc)) from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        raise InvalidRequest("keep_alive", f"{value!r} is not a number of seconds: use seconds, \"5m\", or -1 for forever")
    return -1.0 if seconds < 0 else seconds


# Where engines/process.py's last_lines() appends an engine's last log lines to an exit's reason.
LOG_LINES = "; last log lines: "
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s;,:'\"()|]+")


def for_client(exc: LessorError) -> LessorError:
    """The error as a router client is told it. A failed load's reason quotes its engine's log
    (tracebacks, the server's paths): the client gets the reason without them, and where the
    operator reads the rest (the engine log; the admin API keeps the whole reason)."""
    if isinstance(exc, (LoadFailed, ModelFailed)):
        reason = ABSOLUTE_PATH.sub("<path>", exc.reason.split(LOG_LINES, 1)[0])
        return replace(exc, reason=f"{reason}; its engine's log says why (lessor logs {exc.model})")
    return exc


class Running:
    """One request's turn on its model, which the router may cut (a drain's bound: TrafficControl.cut).
    Cut before its exchange began, it is refused when it would begin; during it, the exchange ends."""

    __slots__ = ("conn", "error")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.error: LessorError | None = None

    def cut(self, error: LessorError) -> None:
        if self.error is None:
            self.error = error
            exchange = self.conn.exchange
            if exchange is not None:
                exchange.abort(error)


class FrontDoor:
    """What every client connection shares: the traffic control, the model list, the keys, the upstream pool."""

    def __init__(self, traffic: TrafficControl, supervisor: Supervisor, config: RouterConfig) -> None:
        self.traffic, self.supervisor, self.config = traffic, supervisor, config
        self.keys = ApiKeys(config, supervisor)
        self.pool = UpstreamPool(config.first_byte_timeout, config.stream_idle_timeout)
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
                     "engine": spec.engine.kind}  # type: ignore[attr-defined]  # until EngineArgsBase declares kind
            data.append({"id": spec.name, **entry, "aliases": list(spec.aliases)})
            data.extend({"id": alias, **entry, "alias_of": spec.name} for alias in spec.aliases)
        return {"object": "list", "data": data}

    def lane(self, name: str, access: KeyAccess | None) -> Lane:
        """The model's lane, if this key may use it. To a key limited to some models, the others
        do not exist: an unknown name lists only what the key may use."""
        try:
            lane = self.traffic.lane(name)
        except UnknownModel as exc:
            if access is not None and access.models is not EVERY_MODEL:
                raise UnknownModel(name, [n for n in exc.known if allows(access, self.traffic.lane(n).name)]) from None
            raise
        if access is not None and not allows(access, lane.name):
            raise Forbidden(name, tuple(sorted(access.models or ())))
        return lane

    def model(self, name: str, access: KeyAccess | None) -> dict:
        record = self.lane(name, access).record
        return {"id": name, "object": "model", "created": 0, "owned_by": "lessor", "state": record.state.value,
                "model": record.spec.name}

    async def serve(self, request: Request, conn: ClientConnection) -> None:
        """Answer one request on `conn`; a refusal is raised as a typed error, which the connection renders."""
        access = None
        if self.keys and request.path != b"/health":
            access = self.keys.check(request.authorization)
        if request.path in PROXIED:
            if request.method != b"POST":
                raise MethodNotAllowed(request.method.decode(), request.path.decode(), ("POST",))
            await self._proxy(conn, request, access)
        elif request.method not in (b"GET", b"HEAD"):  # a HEAD is answered as a GET, less the body
            method, path = request.method.decode(), request.path.decode(errors="replace")
            if request.path.startswith(b"/v1/models") or request.path == b"/health":
                raise MethodNotAllowed(method, path, ("GET", "HEAD"))
            raise NoRoute(method, path, "the router", SERVES)
        elif request.path == b"/v1/models":
            conn.respond_json(200, self.models(access), request.keep_alive)
        elif request.path.startswith(b"/v1/models/"):
            conn.respond_json(200, self.model(request.path[11:].decode(errors="replace"), access), request.keep_alive)
        elif request.path == b"/health":
            conn.respond_json(200, {"status": "ok"}, request.keep_alive)
        else:
            raise NoRoute("GET", request.path.decode(errors="replace"), "the router", SERVES)

    async def _proxy(self, conn: ClientConnection, request: Request, access: KeyAccess | None) -> None:
        model, _, data = parse_body(request.body)
        traffic = self.traffic
        keep_alive = take_keep_alive(data) if b'"keep_alive"' in request.body else None
        lane = self.lane(model, access)  # an unknown name is not counted: clients must not create metric labels
        if model != lane.name and not lane.record.spec.engine.takes_aliases:
            request = replace(request, body=renamed(data, lane.name))
        elif keep_alive is not None:
            request = replace(request, body=json_dumps(data))
        running = Running(conn)
        try:
            base_url = traffic.try_start(lane, running) or await traffic.wait_turn(lane, running)
        except LessorError as exc:
            traffic.count(lane.name, http_status(exc))
            raise for_client(exc) from None
        except asyncio.CancelledError:  # the client left while it waited: connection_lost cancelled its task
            traffic.count(lane.name, CLIENT_GONE)
            raise
        if keep_alive is not None:
            traffic.request_keep_alive(lane, keep_alive)
        status = CLIENT_GONE
        try:
            status = await self._forward(conn, lane, base_url, request, running)
        except LessorError as exc:
            status = http_status(exc)
            raise
        finally:
            traffic.finish(lane, running)
            traffic.count(lane.name, status)

    async def _forward(self, conn: ClientConnection, lane: Lane, base_url: str, request: Request,
                       running: Running) -> int:
        address = self.address(base_url)
        try:
            upstream = await self.pool.acquire(*address)
        except OSError as exc:
            raise UpstreamFailed(lane.name, f"cannot connect to {base_url}: {exc.strerror or exc}") from None
        except asyncio.TimeoutError:
            raise UpstreamTimedOut(lane.name, "accepted no connection", self.pool.first_byte_s,
                                   "router.first_byte_timeout") from None
        if running.error is not None:  # cut while it connected: the connection is unused, it stays pooled
            self.pool.release(upstream)
            raise running.error
        return await conn.relay(upstream, address, request, lane.name)


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


async def start_router(traffic: TrafficControl, supervisor: Supervisor, config: RouterConfig,
                       host: str, port: int) -> RouterServer:
    door = FrontDoor(traffic, supervisor, config)
    server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(door), host, port)
    return RouterServer(door, server)
