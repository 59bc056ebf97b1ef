"""Hostile input (issue 23, item 2): a client's mistake is a 4xx naming what is wrong, never a 5xx,
and costs the log at most one line (no traceback). Deep JSON, huge integers, query values and
headers that do not decode, thrown by hand and by hypothesis at the admin API, the router and the
built-in torch engine. Raw bytes go over a socket where aiohttp's client would refuse to send them."""

import asyncio
import http.client
import json
import logging
import uuid
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessor.api.admin import make_admin_app
from lessor.daemon.runtime import runtime

from ..support.clients import Admin
from ..support.configs import sim_config, torch_model, torch_spec, write_config
from ..support.fakes import FakeEngines
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S, until_sync

TOKEN = "s3cret-token"
AUTH = f"Bearer {TOKEN}".encode()
HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def nested(depth: int, kind: str = "list") -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


DIGITS_5000 = "1" + "0" * 4999


# -- talking raw HTTP ------------------------------------------------------------------------


async def exchange(port: int, method: str, target: str, body: bytes = b"", headers: bytes = b"") -> tuple[int, bytes]:
    """One request as the bytes given (Connection: close); the status and the body of its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
    writer.write(head + headers + b"\r\n" + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), HANG_S)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


class LogCount:
    """The records at INFO and above since `mark()`, as the daemon's log would have them."""

    def __init__(self, caplog) -> None:
        self.caplog = caplog
        caplog.set_level(logging.INFO)
        self.seen = 0

    def mark(self) -> None:
        self.seen = len(self.caplog.records)

    def since(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records[self.seen:]
                if r.levelno >= logging.INFO and r.name != "aiohttp.access"]

    def assert_quiet(self, what: str) -> None:
        records = self.since()
        assert len(records) <= 1, f"{what}: {len(records)} log lines: {[r.getMessage()[:200] for r in records]}"
        assert not any(r.exc_info for r in records), f"{what}: a traceback was logged"


def assert_named_4xx(status: int, payload: bytes, what: str) -> dict:
    assert 400 <= status < 500, f"{what}: {status} {payload[:300]!r}"
    error = json.loads(payload)["error"]
    assert error["message"], what
    return error


# -- the admin API -----------------------------------------------------------------------------


@pytest.fixture
async def admin(tmp_path, aiohttp_server, caplog):
    """The real admin app on a loopback port over a runtime with simulated devices."""
    config = sim_config(tmp_path, [torch_model("a", "6GiB"), torch_model("b", "6GiB")])
    async with runtime(config, engines=FakeEngines()) as controller:
        ready = asyncio.Event()
        ready.set()
        server = await aiohttp_server(make_admin_app(controller, TOKEN, ready))
        server.logs = LogCount(caplog)
        yield server


PLAN, MODEL, FOREIGN = "/admin/v1/plan", "/admin/v1/models/a", "/admin/v1/devices/gpu0/foreign"
ADMIN_BODIES = [
    *[(route, body.replace("NEST", nested(depth, kind)))
      for depth in (2000, 100_000) for kind in ("list", "dict")
      for route, body in ((PLAN, '{"model": "a", "overrides": NEST}'), (PLAN, "NEST"),
                          (MODEL, '{"action": "load", "overrides": NEST}'), (MODEL, "NEST"),
                          (FOREIGN, '{"foreign_bytes": NEST}'), (FOREIGN, "NEST"))],
    (FOREIGN, '{"foreign_bytes": DIGITS}'), (FOREIGN, '{"foreign_bytes": -DIGITS}'),
    (PLAN, '{"model": "a", "overrides": {"max_batch_size": DIGITS}}'),
    (MODEL, '{"action": "load", "overrides": {"max_batch_size": DIGITS}}'),
    (PLAN, '{"model": "a", "overrides": {"max_batch_size": DIGITS.5}}'),
    (FOREIGN, '{"foreign_bytes": 100000000000000000000000000000}'),
    (FOREIGN, '{"foreign_bytes": 1e400}'), (FOREIGN, '{"foreign_bytes": NaN}'),
    (FOREIGN, '{"foreign_bytes": Infinity}'), (FOREIGN, '{"foreign_bytes": "1e999GiB"}'),
    (PLAN, '{"model": "a", "overrides": {"max_batch_size": 1e400}}'),
    (PLAN, '{"model": "\\ud800"}'), (PLAN, b'{"model": "\xff"}'), (PLAN, b"\xef\xbb\xbf{}"),
]


@pytest.mark.parametrize("route,body", ADMIN_BODIES, ids=lambda v: v if len(v) < 60 else f"{v[:40]}..{len(v)}")
async def test_the_admin_api_answers_bad_bodies_with_a_4xx(admin, route, body):
    data = body if isinstance(body, bytes) else body.replace("DIGITS", DIGITS_5000).encode()
    admin.logs.mark()
    status, payload = await exchange(admin.port, "PUT" if route == FOREIGN else "POST", route, data,
                                     b"Authorization: " + AUTH + b"\r\n")
    assert_named_4xx(status, payload, route)
    admin.logs.assert_quiet(route)


async def test_deep_json_and_long_integers_name_the_limit_and_the_field(admin):
    status, payload = await exchange(admin.port, "POST", PLAN, f'{{"model": "a", "overrides": {nested(200)}}}'.encode())
    error = assert_named_4xx(status, payload, "deep")
    assert (status, error["field"]) == (400, "overrides") and "deep" in error["message"], error
    body = f'{{"model": "a", "overrides": {{"max_batch_size": {DIGITS_5000}}}}}'.encode()
    status, payload = await exchange(admin.port, "POST", PLAN, body)
    error = assert_named_4xx(status, payload, "digits")
    assert (status, error["field"]) == (400, "overrides.max_batch_size") and "digits" in error["message"], error
    status, payload = await exchange(admin.port, "POST", PLAN, b'{"model": "a", "overrides": {"x": NaN}}')
    error = assert_named_4xx(status, payload, "NaN")
    assert status == 400 and "NaN" in error["message"], error


@pytest.mark.parametrize("lines", ["%C2%B2", "9" * 5000, "%D9%A3", "", "-1", "0", "1e3", "10001", "%FF", "+5", "%205",
                                   "5%00"])
async def test_the_log_tail_takes_only_ascii_digits_in_range(admin, lines):
    admin.logs.mark()
    status, payload = await exchange(admin.port, "GET", f"/admin/v1/models/a/log?lines={lines}", b"",
                                     b"Authorization: " + AUTH + b"\r\n")
    error = assert_named_4xx(status, payload, lines)
    assert (status, error["field"]) == (400, "lines"), error
    assert "1 to 10000" in error["message"]
    admin.logs.assert_quiet(lines)


@pytest.mark.parametrize("value", [b"Bearer \xff", b"Bearer \xc3\xa9t\xc3\xa9", b"\xff\xfe", b"Bearer s3cret-token\xff",
                                   b"Bearer \x80" + TOKEN.encode(), "Bearer ṡ3cret".encode()])
async def test_an_authorization_header_that_is_not_ascii_is_a_401(admin, value):
    admin.logs.mark()
    status, payload = await exchange(admin.port, "PUT", FOREIGN, b'{"foreign_bytes": 1}',
                                     b"Authorization: " + value + b"\r\n")
    error = assert_named_4xx(status, payload, repr(value))
    assert status == 401 and error["type"] == "unauthorized", error
    admin.logs.assert_quiet(repr(value))


async def test_an_ascii_token_still_works_after_all_that(admin):
    status, payload = await exchange(admin.port, "PUT", FOREIGN, b'{"foreign_bytes": 1}',
                                     b"Authorization: " + AUTH + b"\r\n")
    assert status == 200, payload


@pytest.mark.parametrize("target", ["/admin/v1/leases?model=%FF", "/admin/v1/fingerprints?model=%C0%80",
                                    "/admin/v1/models/%FF", "/admin/v1/models/%ED%A0%80/log",
                                    "/admin/v1/leases?model=" + "x" * 5000,
                                    "/admin/v1/models/a/log?lines=5&lines=%FF"])
async def test_query_and_path_values_that_do_not_decode_are_no_5xx(admin, target):
    admin.logs.mark()
    status, payload = await exchange(admin.port, "GET", target, b"", b"Authorization: " + AUTH + b"\r\n")
    assert status < 500, (target, status, payload[:300])
    admin.logs.assert_quiet(target)


# -- generated bodies --------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 80), 1 << 80), st.floats(allow_nan=False),
                      st.text(max_size=8), st.sampled_from(["load", "unload", "a", "8GiB", "", "stop", "user"]))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["a", "model", "action", "overrides", "foreign_bytes",
                                                              "messages", "role", "content", "stop", "seed"]),
                                             inner, max_size=3), max_leaves=12)


def _deep(depth: int, kind: str, field: str, model: str) -> bytes:
    return f'{{"model": "{model}", "action": "load", "{field}": {nested(depth, kind)}}}'.encode()


def _digits(n: int, field: str, sign: str) -> bytes:
    return f'{{"model": "a", "action": "load", "{field}": {sign}{"9" * n}}}'.encode()


FIELDS = st.sampled_from(["overrides", "foreign_bytes", "messages", "seed", "model"])
# JSON gone wrong, one branch per way (hypothesis picks among branches evenly): nested deep,
# numbers too long, bad escapes, constants JSON has not, cut short, trailing garbage, not UTF-8.
malformed_json = st.one_of(
    st.builds(_deep, st.integers(129, 1024) | st.integers(1025, 100_000), st.sampled_from(["list", "dict"]), FIELDS,
              st.sampled_from(["a", "alpha"])),
    st.builds(_digits, st.integers(20, 6000), FIELDS, st.sampled_from(["", "-"])),
    st.sampled_from([b'{"model": "\\ud800"}', b'{"model": "\\u12"}', b'{"a": "\\x41"}', b'"\\', b'{"\\uDFFF": 1}',
                     b'{"model": "a", "foreign_bytes": NaN}', b'{"foreign_bytes": -Infinity}', b'{"seed": 1e999}',
                     b'{"model": "\xff"}', b"\xef\xbb\xbf{}", b"\x00", b""]),
    st.builds(lambda value, cut: json.dumps(value).encode()[:cut], json_values, st.integers(0, 40)),
    st.builds(lambda value, tail: json.dumps(value).encode() + tail, json_values,
              st.sampled_from([b"}", b",", b" x", b"\x00", b"]]]"])),
    st.binary(max_size=40),
)


OPENAI_FIELDS = ["model", "messages", "max_tokens", "stop", "seed", "stream", "temperature", "top_p", "n", "prompt",
                 "input", "logprobs", "response_format", "tools", "stream_options", "extra"]
# Wrong types and extra nesting OpenAI clients and their users do send, field by field.
WRONG_FIELDS = [
    ("stop", 5), ("stop", True), ("stop", [5, None]), ("stop", {"a": 1}), ("seed", 2 ** 70), ("seed", -(2 ** 70)),
    ("seed", 1.5), ("seed", "1"), ("max_tokens", 2 ** 70), ("max_tokens", "2"), ("max_tokens", -1), ("n", 2 ** 70),
    ("temperature", "hot"), ("temperature", 1e308), ("top_p", [1]), ("stream", "yes"), ("prompt", 5),
    ("prompt", [[1, 2]]), ("input", {"a": 1}), ("messages", "hi"), ("messages", [{"role": "user"}]),
    ("messages", [{"role": 5, "content": None}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, 7]}]),
    ("messages", [{"role": "user", "content": "hi", "extra": json.loads(nested(40, "dict"))}]),
    ("messages", [{"role": "user", "content": "hi", "extra": json.loads(nested(500, "dict"))}]),
    ("stream_options", {"include_usage": "x"}), ("response_format", {"type": 5}), ("tools", [[[]]]),
]


@st.composite
def openai_bodies(draw, models=("a", "alpha")) -> bytes:
    """OpenAI-shaped chat and completion bodies with a field of the wrong type or nested too deep."""
    body = {"model": models[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(draw(st.integers(1, 3))):
        field, value = draw(st.sampled_from(WRONG_FIELDS) | st.tuples(st.sampled_from(OPENAI_FIELDS), json_values))
        body[field] = value
    if draw(st.booleans()):  # most bodies get past the model lookup, to reach the engine (an alias is rewritten)
        body["model"] = draw(st.sampled_from(models))
    return json.dumps(body).encode()


@given(body=st.one_of(malformed_json, openai_bodies()),
       route=st.sampled_from([("POST", PLAN), ("POST", MODEL), ("PUT", FOREIGN)]))
@HYPOTHESIS
async def test_generated_bodies_never_get_a_5xx_from_the_admin_api(admin, body, route):
    admin.logs.mark()
    status, payload = await exchange(admin.port, *route, body, b"Authorization: " + AUTH + b"\r\n")
    assert status < 500, (route, body[:200], status, payload[:300])
    admin.logs.assert_quiet(repr(body[:80]))


# -- the router --------------------------------------------------------------------------------


ROUTER_BODIES = [
    nested(2000), nested(100_000), '{"model": "a", "messages": NEST}'.replace("NEST", nested(2000, "dict")),
    '{"model": "a", "messages": NEST}'.replace("NEST", nested(100_000)),
    # An alias is written over before the body goes upstream: the encoder must not meet the nesting.
    '{"model": "alpha", "messages": NEST}'.replace("NEST", nested(300)),
    '{"model": "alpha", "messages": NEST}'.replace("NEST", nested(1000, "dict")),
    '{"model": "a", "messages": NEST}'.replace("NEST", nested(500)),
    f'{{"model": "a", "seed": {DIGITS_5000}}}', f'{{"model": "alpha", "seed": -{DIGITS_5000}}}',
    '{"model": "a", "seed": 1e400}', '{"model": "a", "seed": NaN}', '{"model": "\\ud800"}', b'{"model": "\xff"}',
    '{"model": 5}', '{"model": ["a"]}', "[]", "", "null",
]


@pytest.mark.parametrize("body", ROUTER_BODIES, ids=lambda v: v if len(v) < 60 else f"{v[:40]}..{len(v)}")
async def test_the_router_answers_bad_bodies_with_a_4xx_before_the_engine(front, caplog, body):
    controller, upstream, session, port = await front()
    logs = LogCount(caplog)
    data = body if isinstance(body, bytes) else body.encode()
    logs.mark()
    status, payload = await exchange(port, "POST", "/v1/chat/completions", data)
    error = assert_named_4xx(status, payload, data[:60])
    assert {"message", "type", "param", "code"} <= set(error), error  # OpenAI's envelope
    logs.assert_quiet(repr(data[:60]))


async def test_the_router_names_the_depth_limit(front):
    _, _, _, port = await front()
    status, payload = await exchange(port, "POST", "/v1/chat/completions",
                                     f'{{"model": "alpha", "messages": {nested(300)}}}'.encode())
    error = assert_named_4xx(status, payload, "deep")
    assert (status, error["param"]) == (400, "messages") and "deep" in error["message"], error


async def test_the_router_still_passes_ordinary_nesting_byte_for_byte(front):
    _, _, _, port = await front()
    body = f'{{"model": "alpha", "tools": {nested(100, "dict")}, "n": 12345678901234567890}}'.encode()
    status, payload = await exchange(port, "POST", "/v1/chat/completions", body)
    assert status == 200, payload[:300]
    assert json.loads(json.loads(payload)["echo"])["tools"] == json.loads(nested(100, "dict"))


@pytest.mark.parametrize("value", [b"Bearer \xff", b"\xff\xfe", b"Bearer sk-\xc3\xa9", b"Bearer " + b"\x80" * 50])
async def test_a_router_key_that_is_not_ascii_is_a_401(front, caplog, value):
    _, _, _, port = await front(api_keys=[{"key": "sk-good-0123456789abcdef", "models": ["*"]}])
    logs = LogCount(caplog)
    logs.mark()
    status, payload = await exchange(port, "POST", "/v1/chat/completions", b'{"model": "a"}',
                                     b"Authorization: " + value + b"\r\n")
    error = assert_named_4xx(status, payload, repr(value))
    assert status == 401 and error["code"] == "invalid_api_key", error
    logs.assert_quiet(repr(value))


@given(body=st.one_of(malformed_json, openai_bodies()),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
@HYPOTHESIS
async def test_generated_bodies_never_get_a_5xx_from_the_router(front, caplog, body, path):
    if not hasattr(front, "made"):  # one router for every example: hypothesis calls the test body many times
        front.made = await front()
        controller, upstream, _, _ = front.made
        upstream.release.set()  # the stand-in engine streams to the end at once
        for name in ("a", "b"):  # loaded before: a load's own log lines are no answer to a bad request
            await controller.load(name)
        front.logs = LogCount(caplog)
    _, _, _, port = front.made
    front.logs.mark()
    status, payload = await exchange(port, "POST", path, body)
    assert status < 500, (path, body[:200], status, payload[:300])
    front.logs.assert_quiet(repr(body[:80]))


# -- the built-in torch engine, alone and behind the router -------------------------------------
# The engine validates its own bodies (engines/torch_requests.py).

CHAT = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ENGINE_CASES = {
    "stop 5": {**CHAT, "stop": 5},
    "stop true": {**CHAT, "stop": True},
    "stop [5]": {**CHAT, "stop": [5, None]},
    "seed 2**70": {**CHAT, "seed": 2 ** 70},
    "seed 2**70 stream": {**CHAT, "seed": 2 ** 70, "stream": True},
    "seed -2**70 stream": {**CHAT, "seed": -(2 ** 70), "stream": True},
    "message nested 500 deep": {**CHAT, "messages": [{"role": "user", "content": "hi",
                                                      "extra": json.loads(nested(500, "dict"))}]},
    "content parts": {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    "content parts not text": {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}, 7, None]}]},
    "content part without text": {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    "content parts nested": {**CHAT, "messages": [{"role": "user", "content": [[{"type": "text", "text": "hi"}]]}]},
    "role 5": {**CHAT, "messages": [{"role": 5, "content": "hi"}]},
    "messages a string": {**CHAT, "messages": "hi"},
    "max_tokens a string": {**CHAT, "max_tokens": "2"},
    "max_tokens 2**70": {**CHAT, "max_tokens": 2 ** 70},
    "temperature a list": {**CHAT, "temperature": [1]},
    "n 2**70": {**CHAT, "n": 2 ** 70},
}


@pytest.fixture(scope="module")
def torch_lessord(tmp_path_factory, tiny_qwen):
    """lessord with one model on the real built-in engine (the tiny Qwen2), loaded; its router too."""
    tmp = tmp_path_factory.mktemp("hostile-torch")
    config = write_config(tmp, [torch_spec("qa", tiny_qwen, "2GiB", keep_alive=-1)])  # never unloaded mid-test
    with running_lessord(config, output=tmp / "lessord.out") as (_, url, router_url):
        admin = Admin(url, tmp / "state")
        status, model = admin.load("qa")
        assert status == 200 and model["state"] == "ready", model
        yield {"engine": model["endpoint"], "router": router_url,
               "logs": (tmp / "state" / "logs" / "qa.log", tmp / "lessord.out")}


def post_raw(base_url: str, path: str, body: bytes) -> tuple[int, bytes, bool]:
    """The status, the body and whether that body came whole (a stream cut short does not)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=HANG_S)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        try:
            return response.status, response.read(), True
        except http.client.IncompleteRead as exc:
            return response.status, exc.partial, False
    finally:
        conn.close()


def line_counts(paths) -> list[int]:
    return [path.read_bytes().count(b"\n") if path.exists() else 0 for path in paths]


def settled_line_counts(torch_lessord) -> list[int]:
    """The logs' line counts once every line of the requests before has landed, a marker's line
    included. The engine's output reaches its log through lessor's log pump, a process of its own,
    so a line may land after its answer did (and count for the next request). A marker request,
    refused with one line that quotes it, goes through the same pipe: once its line is whole in
    the log, all before it is too."""
    marker = f"marker-{uuid.uuid4().hex}".encode()
    status, _, _ = post_raw(torch_lessord["engine"], "/v1/chat/completions",
                            json.dumps({**CHAT, "n": marker.decode()}).encode())
    assert status == 400

    def landed() -> bool:
        text = torch_lessord["logs"][0].read_bytes()
        return marker in text and b"\n" in text[text.index(marker):]

    until_sync(landed, "the marker's line in the engine's log")
    return line_counts(torch_lessord["logs"])


def assert_no_5xx_and_one_line(torch_lessord, target: str, path: str, body: bytes, what: str) -> None:
    before = settled_line_counts(torch_lessord)
    status, payload, whole = post_raw(torch_lessord[target], path, body)
    how = "whole" if whole else "cut short"
    assert status < 500 and whole, f"{what} to the {target}: {status} {how} {payload[:300]!r}"
    if status == 200 and json.loads(body).get("stream") is True:
        assert payload.rstrip().endswith(b"data: [DONE]"), f"{what}: the stream did not end: {payload[-200:]!r}"
    if status >= 400:
        assert {"message", "type", "param", "code"} <= set(json.loads(payload)["error"]), payload[:300]
    grown = [after - was for after, was in zip(settled_line_counts(torch_lessord), before)]
    grown[0] -= 1  # the second marker's line
    assert all(n <= 1 for n in grown), f"{what} to the {target}: the logs grew by {grown} lines"


@pytest.mark.parametrize("case,target", [(name, target) for name in ENGINE_CASES for target in ("engine", "router")])
def test_the_torch_engine_answers_client_mistakes_with_a_4xx(torch_lessord, case, target):
    body = json.dumps(ENGINE_CASES[case]).encode()
    assert_no_5xx_and_one_line(torch_lessord, target, "/v1/chat/completions", body, case)


@given(body=openai_bodies(models=("qa",)), target=st.sampled_from(["engine", "router"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_generated_openai_bodies_never_get_a_5xx_from_the_torch_engine(torch_lessord, body, target, path):
    assert_no_5xx_and_one_line(torch_lessord, target, path, body, body[:120])
