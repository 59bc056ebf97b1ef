"""Hostile HTTP on both listeners (issue 23, item 1): a head over a limit is refused at the limit
(414/431) and the connection closed, without the rest being read; a slow or incomplete request gets
408 on the admin API as on the router; HEAD has no body; a valid request pipelined before garbage
is answered before the garbage's 400; a client that leaves mid-body is one INFO line.

Real listeners on loopback, raw sockets; no timing is asserted (the latency under a 128 MB header is
bench/http_attack.py's)."""

import asyncio
import json
import logging
import socket
from contextlib import AsyncExitStack

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request

from lessor.api import service
from lessor.api.admin_http import AdminProtocol, Framer, HeadLimits, request_deadline
from lessor.api.refusals import HeadTooLarge, UrlTooLong
from lessor.api.router import start_router
from lessor.daemon.config.schema import AdminConfig
from lessor.daemon.runtime import runtime
from lessor.engines.process import free_port

from ..support.configs import sim_config, torch_model
from ..support.waiting import HANG_S, until

TOKEN = "t" * 32


@pytest.fixture
async def listeners(tmp_path):
    """make(admin={...}, router={...}) -> (admin port, router port): the real listeners of lessord."""
    async with AsyncExitStack() as stack:
        async def make(admin: dict | None = None, router: dict | None = None) -> tuple[int, int]:
            admin_port = free_port()
            config = sim_config(tmp_path, [torch_model("a")],
                                admin={"listen": f"127.0.0.1:{admin_port}", **(admin or {})}, router=router or {})
            controller = await stack.enter_async_context(runtime(config))
            ready = asyncio.Event()
            ready.set()
            await service._serve_admin(stack, controller, TOKEN, ready)
            server = await start_router(controller.traffic, controller.supervisor, controller.config.router,
                                        "127.0.0.1", 0)
            stack.push_async_callback(server.close)
            return admin_port, server.port
        yield make


async def exchange(port: int, data: bytes, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """Send `data` (in pieces, while reading) and read until the server closes: what came back, and
    how many bytes were sent before the server stopped taking them. A raw socket: a reset after the
    answer must not hide the answer (asyncio's streams raise the reset before the bytes they hold)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    sent = 0

    async def send() -> None:
        nonlocal sent
        try:
            for at in range(0, len(data), chunk):
                await loop.sock_sendall(sock, data[at:at + chunk])
                sent = min(at + chunk, len(data))
        except OSError:
            pass
    sending = asyncio.ensure_future(send())
    out = b""
    try:
        while piece := await asyncio.wait_for(loop.sock_recv(sock, 65536), HANG_S):
            out += piece
    except ConnectionError:
        pass
    finally:
        sending.cancel()
        sock.close()
    return out, sent


def answers(out: bytes) -> list[tuple[int, dict | bytes]]:
    """The status and body of each answer in `out`, in order."""
    found = []
    while out.startswith(b"HTTP/1."):
        head, _, rest = out.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        body, out = rest[:length], rest[length:]
        kind = next((line for line in head.split(b"\r\n") if line.lower().startswith(b"content-type:")), b"")
        found.append((int(head.split()[1]), json.loads(body) if b"json" in kind and body else body))
    return found


def get(path: str, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (method, path.encode(), extra)


PATHS = {"admin": "/healthz", "router": "/v1/models"}
BIG = 64 << 20  # a 64 MB header: what the chaos run threw


@pytest.mark.parametrize("side", ["admin", "router"])
@pytest.mark.parametrize("what, status, code", [
    ("url", 414, "uri_too_long"), ("header", 431, "header_too_large"),
    ("headers", 431, "header_too_large"), ("head", 431, "header_too_large")])
async def test_a_head_over_a_limit_is_refused_at_the_limit(listeners, side, what, status, code):
    ports = dict(zip(("admin", "router"), await listeners()))
    if what == "url":
        data = b"GET /" + b"a" * BIG + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    elif what == "header":
        data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * BIG + b"\r\n\r\n"
    elif what == "headers":
        data = b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n"
    else:  # 8 lines of 7 KiB: each under max_header_line, together over max_head (32 KiB)
        data = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 7000) for i in range(8)) + b"\r\n"
    out, sent = await exchange(ports[side], data)
    (got, body), = answers(out)  # one answer, then the connection is closed
    assert got == status and body["error"]["code" if side == "router" else "type"] == code
    message = body["error"]["message"]
    assert f"{side}.max_" in message and "raise" in message
    if len(data) > BIG:  # the server stopped reading near the limit: most of the 64 MB never went out
        assert sent < BIG // 2


@pytest.mark.parametrize("side", ["admin", "router"])
async def test_limits_are_configurable(listeners, side):
    limits = {"max_request_line": 300, "max_header_line": 300}
    ports = dict(zip(("admin", "router"), await listeners(admin=limits, router=limits)))
    url, header = get("/" + "a" * 400), b"GET / HTTP/1.1\r\nX-A: " + b"a" * 400 + b"\r\n\r\n"
    assert [a[0] for a in answers((await exchange(ports[side], url))[0])] == [414]
    assert [a[0] for a in answers((await exchange(ports[side], header))[0])] == [431]
    fits = get(PATHS[side] + "?" + "a" * 200, b"X-A: " + b"a" * 200 + b"\r\nConnection: close\r\n")
    assert [a[0] for a in answers((await exchange(ports[side], fits))[0])] == [200]


@pytest.mark.parametrize("side", ["admin", "router"])
async def test_a_valid_request_pipelined_before_garbage_is_answered_first(listeners, side):
    ports = dict(zip(("admin", "router"), await listeners()))
    out, _ = await exchange(ports[side], get(PATHS[side]) + b"\x01GARBAGE \xff\r\n\r\n")
    assert [status for status, _ in answers(out)] == [200, 400]


@pytest.mark.parametrize("side", ["admin", "router"])
async def test_a_request_pipelined_before_one_over_a_limit_is_answered_first(listeners, side):
    ports = dict(zip(("admin", "router"), await listeners()))
    out, _ = await exchange(ports[side], get(PATHS[side]) + get("/" + "a" * 20000))
    assert [status for status, _ in answers(out)] == [200, 414]


@pytest.mark.parametrize("side", ["admin", "router"])
async def test_pipelined_heads_are_limited_each_not_together(listeners, side):
    ports = dict(zip(("admin", "router"), await listeners()))
    one = get(PATHS[side], b"".join(b"X-%d: %s\r\n" % (i, b"a" * 6000) for i in range(4)))  # 24 KiB, under 32
    last = get(PATHS[side], b"Connection: close\r\n")
    for chunk in (len(one), 1 << 20):  # a request a write (the next head starts a feed), and all in one
        out, _ = await exchange(ports[side], one + one + last, chunk)
        assert [status for status, _ in answers(out)] == [200, 200, 200]


async def test_pipelined_requests_with_bodies_reach_the_admin_api_whole(listeners):
    admin_port, _ = await listeners()
    body = b'{"model": "a"}'
    chunked = (b"POST /admin/v1/plan HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n" + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")
    sized = b"POST /admin/v1/plan HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    out, _ = await exchange(admin_port, sized + chunked + get("/healthz", b"Connection: close\r\n"))
    statuses = [status for status, _ in answers(out)]
    assert len(statuses) == 3 and statuses[2] == 200 and statuses[0] == statuses[1] != 400


async def test_head_is_answered_without_a_body_on_the_router(listeners):
    _, router_port = await listeners()
    out, _ = await exchange(router_port, get("/v1/models", method=b"HEAD") + get("/v1/chat/completions", method=b"HEAD")
                            + get("/health", b"Connection: close\r\n"))
    first, second, third = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"\r\n\r\n") and b"Content-Length: " in first
    assert second.startswith(b"405 ") and second.endswith(b"\r\n\r\n")  # no body: the framing holds
    assert third.startswith(b"200 ") and third.endswith(b'{"status": "ok"}')


async def test_a_slow_head_gets_408_on_the_admin_api(listeners):
    admin_port, _ = await listeners(admin={"request_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # and nothing more
    out = await asyncio.wait_for(reader.read(), HANG_S)  # answered, then disconnected
    writer.close()
    (status, body), = answers(out)
    assert status == 408 and "admin.request_timeout" in body["error"]["message"]


async def test_a_body_shorter_than_its_length_gets_408_on_the_admin_api(listeners):
    admin_port, _ = await listeners(admin={"request_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
    writer.write(b"POST /admin/v1/plan HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"mod")
    out = await asyncio.wait_for(reader.read(), HANG_S)
    writer.close()
    (status, body), = answers(out)
    assert status == 408 and body["error"]["type"] == "request_timeout"


async def test_a_client_that_leaves_mid_body_is_one_info_line(listeners, caplog):
    admin_port, _ = await listeners()
    with caplog.at_level(logging.DEBUG):
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(b"POST /admin/v1/plan HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_S)  # the handler is reading the body
        writer.write(b'{"mod')
        await writer.drain()
        writer.close()
        await writer.wait_closed()

        def said() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "left before its body" in r.getMessage()]
        await until(said, "the INFO line")
    assert [r.levelno for r in said()] == [logging.INFO]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("side", ["admin", "router"])
async def test_malformed_http_is_one_info_line_and_a_json_400(listeners, side, caplog):
    ports = dict(zip(("admin", "router"), await listeners()))
    with caplog.at_level(logging.DEBUG):
        out, _ = await exchange(ports[side], b"\x16\x03\x01 not http\r\n\r\n")
    (status, body), = answers(out)
    assert status == 400 and body["error"]["message"].startswith("malformed HTTP request")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- the Framer alone: where requests end, where a limit is passed ---------------------------

LIMITS = HeadLimits(request_line=64, header_line=64, headers=4, head=200, section="admin")


def kinds(events) -> list[tuple[str, int]]:
    return [(kind, at) for kind, at, _ in events]


def test_the_framer_finds_each_request_s_end_in_one_pass():
    one = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    sized = b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    chunked = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    data = one + sized + chunked
    ends = [len(one), len(one) + len(sized), len(data)]
    assert [at for kind, at in kinds(Framer(LIMITS).feed(data)) if kind == "end"] == ends
    framer, found, offset = Framer(LIMITS), [], 0
    for byte in range(len(data)):  # the same, a byte at a time
        found += [(kind, at + offset) for kind, at in kinds(framer.feed(data[byte:byte + 1]))]
        offset += 1
    assert found == kinds(Framer(LIMITS).feed(data))


@pytest.mark.parametrize("data, error, at", [
    (b"GET /" + b"a" * 10_000_000, UrlTooLong, 65),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 10_000_000, HeadTooLarge, 16 + 65),
    (b"GET / HTTP/1.1\r\n" + b"A: 1\r\n" * 5, HeadTooLarge, 16 + 6 * 5),
    (b"GET / HTTP/1.1\r\n" + b"A: " + b"a" * 50 + b"\r\n" + b"B: " + b"b" * 50 + b"\r\n" + b"C: " + b"c" * 50 + b"\r\n"
     + b"D: " + b"d" * 50 + b"\r\n", HeadTooLarge, 200),
])
def test_the_framer_stops_at_the_byte_that_passes_a_limit(data, error, at):
    (kind, offset, refusal), = [e for e in Framer(LIMITS).feed(data) if e[0] == "refuse"]
    assert type(refusal) is error and offset == at
    framer = Framer(LIMITS)  # fed in pieces: the same byte, and what it keeps stays bounded
    pieces = [data[i:i + 7] for i in range(0, min(len(data), 4096), 7)]
    refused = []
    for n, piece in enumerate(pieces):
        refused += [(o + 7 * n, type(r)) for k, o, r in framer.feed(piece) if k == "refuse"]
        assert len(framer.line) <= 65
    assert refused == [(at, error)]


def test_what_the_framer_cannot_frame_is_passed_on_whole():
    framer = Framer(LIMITS)
    assert kinds(framer.feed(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\nGET / HTTP/1.1\r\n\r\n")) == [("begin", 0), ("head", 38)]
    assert framer.feed(b"anything") == []


async def test_a_body_all_in_is_read_even_when_its_turn_came_after_its_deadline():
    """A request pipelined behind a handler slower than admin.request_timeout: its deadline passed
    while it waited for its turn, but its body is all in, so no client is slow (a read that need not
    wait is never timed out, as asyncio.timeout_at would let it finish)."""
    protocol = AdminProtocol(web.Server(lambda request: None), AdminConfig())
    protocol.deadlines.append(protocol.clock.time() - 1.0)  # its deadline: already past
    body = b'{"model": "a"}'
    content = StreamReader(protocol, 1 << 16, loop=asyncio.get_running_loop())
    content.feed_data(body)
    content.feed_eof()
    request = make_mocked_request("POST", "/admin/v1/plan", headers={"Content-Length": str(len(body))},
                                  protocol=protocol, payload=content)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    response = await request_deadline(request, handler)
    assert response.status == 200 and response.body == body
