"""The router's HTTP side (api/router.py, connection.py, keys.py) in front of a stand-in upstream
on loopback: bodies pass through untouched, streams chunk by chunk, a client that leaves cancels
the upstream request, and a client's mistakes get OpenAI-shaped 4xx errors."""

import asyncio
import json

import aiohttp
import pytest

from lessor.api.metrics import Metrics

from ..support.configs import torch_model
from ..support.waiting import HANG_S, until


async def eventually(condition):
    await until(condition)


async def test_the_body_reaches_the_engine_byte_for_byte(front):
    controller, _, session, _ = await front()
    body = b'{"model":"a",  "messages":[{"role":"user","content":"h\\u00e9"}], "x": 1.50}'
    async with session.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer == {"path": "/v1/chat/completions", "echo": body.decode()}
    # An alias, to an engine that serves under one name (the torch engine): `model` becomes the
    # model's name, and nothing else in the body changes.
    alias = body.replace(b'"model":"a"', b'"model":"alpha"')
    async with session.post("/v1/chat/completions", data=alias, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
        echoed = json.loads((await r.json())["echo"])
    assert echoed == {**json.loads(body), "model": "a"}
    assert controller.model("a")["state"] == "ready" and controller.model("a")["in_flight"] == 0
    for path in ("/v1/completions", "/v1/embeddings"):
        async with session.post(path, json={"model": "b", "input": "x"}) as r:
            assert (r.status, (await r.json())["path"]) == (200, path)


async def test_a_stream_is_passed_through_as_it_comes(front):
    _, upstream, session, _ = await front()
    async with session.post("/v1/chat/completions", json={"model": "a", "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readline(), HANG_S)  # the engine has not finished: no buffering
        assert first == b'data: {"n": 0}\n'
        upstream.release.set()
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b"data: ") == 200
    assert upstream.streams_ended == ["done"]


async def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(front):
    controller, upstream, session, _ = await front()
    response = await session.post("/v1/chat/completions", json={"model": "a", "stream": True})
    assert await asyncio.wait_for(response.content.readline(), HANG_S) == b'data: {"n": 0}\n'
    assert upstream.open_streams == 1 and controller.model("a")["in_flight"] == 1
    response.close()  # the client disconnects
    await eventually(lambda: controller.model("a")["in_flight"] == 0)
    upstream.release.set()  # the engine tries to go on: it finds its client gone at once
    await eventually(lambda: upstream.open_streams == 0)
    assert upstream.streams_ended in (["client gone"], ["cancelled"])


async def test_a_full_queue_answers_429_with_retry_after(front):
    controller, upstream, session, _ = await front([torch_model("a", max_concurrency=1)], max_queue=1)
    await controller.load("a")  # else the first request waits for the load and fills the queue itself
    upstream.hold = True
    first = asyncio.ensure_future(session.post("/v1/completions", json={"model": "a"}))
    await eventually(lambda: controller.model("a")["in_flight"] == 1)
    second = asyncio.ensure_future(session.post("/v1/completions", json={"model": "a"}))
    await eventually(lambda: controller.model("a")["in_flight"] == 2)
    async with session.post("/v1/completions", json={"model": "a"}) as r:
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        error = (await r.json())["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    assert "router.max_queue" in error["message"]
    upstream.release.set()
    for task in (first, second):
        response = await task
        assert response.status == 200
        response.close()


@pytest.mark.parametrize("body, status, param, words", [
    (b'{"model": "gamma", "prompt": "x"}', 404, "model", "known models: a, alpha, b"),
    (b'{"prompt": "x"}', 400, "model", "required"),
    (b'{"model": 7}', 400, "model", "required"),
    (b'{"model": "a", ', 400, None, "not valid JSON"),
    (b'["a"]', 400, None, "must be a JSON object"),
])
async def test_client_mistakes_get_openai_errors_naming_the_field(front, body, status, param, words):
    controller, _, session, _ = await front()
    async with session.post("/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == status
        error = (await r.json())["error"]
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert all(m["state"] == "unloaded" for m in controller.models())  # a mistake loads nothing


async def test_an_oversized_body_gets_413(front):
    _, _, session, _ = await front(max_body=4096)
    async with session.post("/v1/completions", json={"model": "a", "prompt": "x" * 5000}) as r:
        assert r.status == 413
        assert "router.max_body (4096 bytes)" in (await r.json())["error"]["message"]


async def test_models_lists_names_and_aliases_with_their_state(front):
    controller, _, session, _ = await front()
    await controller.load("b")
    async with session.get("/v1/models") as r:
        data = (await r.json())["data"]
    assert [(m["id"], m["state"]) for m in data] == [("a", "unloaded"), ("alpha", "unloaded"), ("b", "ready")]
    assert data[1]["alias_of"] == "a"
    async with session.get("/v1/models/alpha") as r:
        assert (await r.json())["model"] == "a"
    async with session.get("/v1/models/gamma") as r:
        assert r.status == 404


async def test_an_engine_that_does_not_answer_gives_502(front):
    controller, upstream, session, _ = await front()
    upstream.adapter.base_url = "http://127.0.0.1:9"  # nothing listens on port 9
    async with session.post("/v1/completions", json={"model": "a"}) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert controller.model("a")["in_flight"] == 0


async def test_metrics_count_answers_by_model_and_status_and_show_the_queue(front):
    controller, _, session, _ = await front([torch_model("a")])
    metrics = Metrics(controller)
    for _ in range(2):
        async with session.post("/v1/completions", json={"model": "a"}) as r:
            assert r.status == 200
    async with session.post("/v1/completions", json={"model": "nobody"}) as r:
        assert r.status == 404
    text = metrics.render()[0].decode()
    assert 'lessor_router_requests_total{code="200",model="a"} 2.0' in text
    assert 'lessor_router_queued_requests{model="a"} 0.0' in text
    assert "nobody" not in text


async def raw_exchange(port: int, data: bytes, read_until: bytes = b"", timeout_s: float = HANG_S) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        while True:
            piece = await asyncio.wait_for(reader.read(65536), timeout_s)
            out += piece
            if not piece or (read_until and out.count(read_until) >= 1 and out.endswith(read_until)):
                break
    finally:
        writer.close()
    return out


@pytest.fixture
async def router_port(front):
    controller, upstream, session, _ = await front()
    return controller, int(str(session._base_url).rsplit(":", 1)[1].rstrip("/"))


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), len(body), extra) + body)


async def test_pipelined_requests_are_answered_in_order_on_one_connection(router_port):
    _, port = router_port
    bodies = [b'{"model": "a", "n": %d}' % i for i in range(3)]
    data = b"".join(post("/v1/completions", b) for b in bodies[:-1]) + post("/v1/completions", bodies[-1],
                                                                                b"Connection: close\r\n")
    out = await raw_exchange(port, data)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert [json.loads(b)["n"] for b in bodies] == [json.loads(json.loads(part.split(b"\r\n\r\n", 1)[1])["echo"])["n"]
                                                    for part in out.split(b"HTTP/1.1 ")[1:]]


async def test_a_chunked_upload_and_expect_100_continue_are_understood(router_port):
    _, port = router_port
    body = b'{"model": "b", "prompt": "chunked"}'
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
               b"Connection: close\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:]))
    out = await raw_exchange(port, chunked)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert json.loads(json.loads(out.split(b"\r\n\r\n")[2])["echo"]) == json.loads(body)


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n", 404, "not_found"),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "method_not_allowed"),
])
async def test_requests_the_router_cannot_serve_get_a_clear_error(router_port, request_bytes, status, code):
    controller, port = router_port
    if b"GARBAGE" not in request_bytes:  # a malformed request closes the connection; the others ask to
        request_bytes = request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    out = await raw_exchange(port, request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == code
    assert all(m["in_flight"] == 0 for m in controller.models())


async def test_a_wrong_method_is_told_the_method_that_works(router_port):
    _, port = router_port
    out = await raw_exchange(port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"\r\nAllow: POST\r\n" in head
    assert json.loads(body)["error"] == {"message": "/v1/chat/completions takes POST, not GET",
                                         "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}


async def raw_upstream(answer: bytes):
    """An engine that reads one request, writes `answer` as is, and closes the connection."""
    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
        await reader.readexactly(length)  # all of it: closing with unread bytes would reset, not close
        writer.write(answer)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def behind_raw_upstream(front, answer: bytes):
    """The router in front of an engine that answers `answer`, byte for byte."""
    controller, upstream, session, _ = await front()
    server, url = await raw_upstream(answer)
    upstream.adapter.base_url = url
    return controller, session, server


async def test_an_answer_delimited_by_the_engine_closing_is_passed_on_whole(front):
    controller, session, server = await behind_raw_upstream(
        front, b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"n\": 1}\n\ndata: [DONE]\n\n")
    async with session.post("/v1/chat/completions", json={"model": "a", "stream": True}) as r:
        assert r.status == 200 and await r.read() == b'data: {"n": 1}\n\ndata: [DONE]\n\n'
    server.close()


async def test_an_engine_that_breaks_a_stream_ends_the_client_stream_short(front):
    controller, session, server = await behind_raw_upstream(
        front, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"9\r\ndata: 1\n\n\r\n")
    async with session.post("/v1/chat/completions", json={"model": "a", "stream": True}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):  # no final chunk: the client knows it is cut
            await r.read()
    assert controller.model("a")["in_flight"] == 0
    assert controller.traffic.requests[("a", 502)] == 1
    server.close()


async def test_a_slow_client_gets_408_and_others_are_served_meanwhile(front):
    _, _, session, port = await front(request_timeout=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # Half a request (a slowloris): the head, then 10 of the 100 bytes it announced. The well-behaved
    # client sends its whole request at once: 2 s is far more than a busy machine needs for that.
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    await writer.drain()
    async with session.post("/v1/completions", json={"model": "a", "prompt": "hi"}) as r:
        assert r.status == 200  # the slow client holds nothing the others need
    out = await asyncio.wait_for(reader.read(), timeout=HANG_S)  # answered, then disconnected
    assert out.startswith(b"HTTP/1.1 408 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    writer.close()


async def test_an_idle_connection_is_closed_after_the_request_timeout(front):
    _, _, _, port = await front(request_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    await reader.readexactly(16)  # {"status": "ok"}
    assert await asyncio.wait_for(reader.read(), timeout=HANG_S) == b""  # closed quietly, no answer owed
    writer.close()


KEY_A, KEY_ALL = "key-for-model-a-only", "key-for-every-model!"


async def test_api_keys_limit_each_key_to_its_models(front):
    controller, _, session, _ = await front(api_keys=[{"key": KEY_A, "models": ["alpha"]},
                                                      {"key": KEY_ALL, "models": ["*"], "name": "ops"}])

    async def ask(model, key=None, path="/v1/completions"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with session.post(path, json={"model": model, "prompt": "x"}, headers=headers) as r:
            return r.status, await r.json(), r.headers

    status, body, headers = await ask("a")
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"].startswith("Bearer")
    assert (await ask("a", "not-a-key-of-this-router"))[0] == 401
    assert all(m["state"] == "unloaded" for m in controller.models())  # refused before anything loads
    assert (await ask("alpha", KEY_A))[0] == 200 and (await ask("a", KEY_A))[0] == 200
    status, body, _ = await ask("b", KEY_A)
    assert status == 403 and body["error"]["type"] == "permission_error" and "it may use: a" in body["error"]["message"]
    status, body, _ = await ask("gamma", KEY_A)
    assert status == 404 and "known models: a, alpha" in body["error"]["message"]  # b is not revealed
    assert (await ask("b", KEY_ALL))[0] == 200
    async with session.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["a", "alpha"]
    async with session.get("/health") as r:
        assert r.status == 200  # liveness stays open for load balancers


async def test_api_keys_are_all_compared_in_constant_time(front, monkeypatch):
    import lessor.api.keys as keys_module

    compared = []
    real = keys_module.hmac.compare_digest
    monkeypatch.setattr(keys_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    _, _, session, _ = await front(api_keys=[{"key": KEY_A, "models": ["a"]}, {"key": KEY_ALL, "models": ["*"]}])
    async with session.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}) as r:
        assert r.status == 200
    assert len(compared) == 2  # the first key matched, and the second was compared all the same


class CountingTransport:
    """The client's real transport, with each write recorded (one write is one send syscall)."""

    def __init__(self, inner, writes: list[bytes]) -> None:
        self.inner, self.writes = inner, writes

    def write(self, data) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def writelines(self, pieces) -> None:
        self.write(b"".join(pieces))

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def counted(monkeypatch):
    """Every client write the router makes, and every read it gets from an engine."""
    from lessor.api.connection import ClientConnection
    from lessor.api.proxy import UpstreamConnection
    writes, reads = [], []
    made, received = ClientConnection.connection_made, UpstreamConnection.data_received
    monkeypatch.setattr(ClientConnection, "connection_made", lambda self, t: made(self, CountingTransport(t, writes)))

    def data_received(self, data):
        reads.append(data)
        received(self, data)
    monkeypatch.setattr(UpstreamConnection, "data_received", data_received)
    return writes, reads


def dechunk(body: bytes) -> bytes:
    """A chunked body's data; it must end with the terminator and nothing after it."""
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        data, body = body[:int(size, 16)], body[int(size, 16):]
        assert body.startswith(b"\r\n")
        body = body[2:]
        if not data:
            assert body == b""
            return out
        out += data


async def test_a_plain_answer_goes_out_with_its_head_in_one_write_per_engine_read(front, counted):
    writes, reads = counted
    _, _, session, _ = await front()
    for n in range(2):  # twice on one keep-alive connection: the second is framed as well as the first
        writes.clear(), reads.clear()
        async with session.post("/v1/completions", json={"model": "a", "n": n}) as r:
            assert r.status == 200 and json.loads((await r.json())["echo"])["n"] == n
        assert 1 <= len(writes) <= len(reads)
        head, _, first_body = writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and first_body  # the head was held for the body
    assert len(session.connector._conns) == 1  # the client's one connection was kept alive


async def test_a_stream_s_terminator_rides_with_its_last_piece(front, counted):
    writes, reads = counted
    pieces = [b"data: %d\n\n" % n for n in range(3)]
    controller, session, server = await behind_raw_upstream(
        front, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
    async with session.post("/v1/chat/completions", json={"model": "a", "stream": True}) as r:
        assert r.status == 200 and await r.read() == b"".join(pieces)
    assert 1 <= len(writes) <= len(reads)
    head, _, first_body = writes[0].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and first_body  # never the head alone
    assert writes[-1].endswith(b"\r\n0\r\n\r\n") and writes[-1] != b"0\r\n\r\n"
    assert dechunk(b"".join(writes).split(b"\r\n\r\n", 1)[1]) == b"".join(pieces)
    server.close()


async def test_an_engine_that_closes_after_its_head_gets_the_client_a_whole_502(front, counted):
    writes, _ = counted
    controller, session, server = await behind_raw_upstream(
        front, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    async with session.post("/v1/completions", json={"model": "a"}) as r:  # the held head never went out
        assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_error"
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 502 ")
    assert controller.model("a")["in_flight"] == 0
    server.close()


async def test_a_requests_keep_alive_is_taken_by_lessor_and_a_bad_one_named(front):
    controller, _, session, _ = await front([torch_model("a", keep_alive="10m")])
    async with session.post("/v1/chat/completions", json={"model": "a", "keep_alive": "5m", "messages": []}) as r:
        assert r.status == 200
        echoed = json.loads((await r.json())["echo"])
    assert "keep_alive" not in echoed and echoed["model"] == "a"  # the engine does not know the field
    assert controller.traffic.keep_alive_s(controller.supervisor.resolve("a")) == 300
    for bad in ("soon", True, [5], "-5m", -5, -0.5, "-2"):  # negative: -1 (never) only, as in the config
        async with session.post("/v1/chat/completions", json={"model": "a", "keep_alive": bad}) as r:
            error = (await r.json())["error"]
            assert (r.status, error["param"]) == (400, "keep_alive"), bad
    async with session.post("/v1/chat/completions", json={"model": "a", "keep_alive": -5}) as r:
        message = (await r.json())["error"]["message"]
    assert "keep_alive" in message and "-1 (or 'never') for never, or a duration" in message
    assert controller.traffic.keep_alive_s(controller.supervisor.resolve("a")) == 300  # unchanged by the refusals


def test_a_request_on_a_connection_the_engine_just_closed_is_lost_not_an_error():
    """The engine closed the connection (killed, unloading) between the pool handing it out and the
    request's write: under uvloop, lessord's loop, the write raised and the client got a 500; the
    request is the engine's lost answer (502) instead."""
    import uvloop

    from lessor.api.proxy import UpstreamPool

    class Sink:
        def __init__(self) -> None:
            self.lost: list[str] = []

        def upstream_lost(self, reason: str) -> None:
            self.lost.append(reason)

    async def main() -> list[str]:
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        try:
            conn = await UpstreamPool().acquire("127.0.0.1", server.sockets[0].getsockname()[1])
            conn.transport.close()  # as the engine's end does, while the request was on its way to it
            while not conn.closed:  # connection_lost runs on a later turn of the loop
                await asyncio.sleep(0)
            sink = Sink()
            conn.send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n", sink)
            return sink.lost
        finally:
            server.close()

    assert uvloop.run(main()) == ["the engine closed the connection"]
