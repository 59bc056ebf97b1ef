"""A web page the user opens must not drive lessord: the admin API and the router refuse a request
whose Host is not a name they answer to (DNS rebinding) or whose Origin is another site (a form
post, a text/plain fetch) before it does anything; no CORS preflight is granted. Same-origin
requests (the dashboard) and requests without an Origin (curl, the CLI, SDKs) are served."""

import http.client
import json
import socket
import subprocess

import pytest

from lessor.api.origins import SiteRules
from lessor.api.refusals import CrossSiteRequest
from lessor.daemon.config.listeners import AdminConfig, RouterConfig

from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S

EVIL = "evil.example"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def send(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         unix: str | None = None) -> tuple[int, dict, dict | str]:
    """One request with exactly these headers (Host included, when given)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = UnixConnection(unix) if unix else http.client.HTTPConnection(host, int(port), timeout=HANG_S)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        raw = response.read().decode()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=HANG_S)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def state_of(url: str) -> str:
    return send(url, "GET", "/admin/v1/models/m")[2]["state"]


# -- the rules, pure ---------------------------------------------------------------------------------

def test_host_and_origin_rules():
    rules = SiteRules.of(AdminConfig(listen="127.0.0.1:8470", allowed_hosts=["lessor.lan"],
                                     allowed_origins=["https://proxy.lan"]), "admin")
    for host in ("127.0.0.1:8470", "localhost:8470", "[::1]:8470", "LOCALHOST", "lessor.lan:8470", "localhost."):
        rules.check(host, None)
    for origin in ("http://127.0.0.1:8470", "https://proxy.lan", "https://proxy.lan:443"):
        rules.check("127.0.0.1:8470", origin)
    refusals = [("evil.example:8470", None, "Host"), ("10.1.2.3:8470", None, "Host"),
                ("127.0.0.1:8470", "http://evil.example", "Origin"), ("127.0.0.1:8470", "null", "Origin"),
                ("127.0.0.1:8470", "http://127.0.0.1:9999", "Origin"), ("127.0.0.1:8470", "http://localhost:8470", "Origin")]
    for host, origin, field in refusals:
        with pytest.raises(CrossSiteRequest) as caught:
            rules.check(host, origin)
        assert caught.value.field == field and f"admin.allowed_{field.lower()}s" in str(caught.value)
    rules.check("evil.example", None, tcp=False)  # the unix socket: no Host check
    everywhere = SiteRules.of(RouterConfig(listen="0.0.0.0:8471"), "router")
    everywhere.check("10.1.2.3:8471", None)  # an address cannot be rebound, only a name
    name = socket.gethostname()
    for own in (name, name.split(".")[0].upper() + ":8471"):  # what an operator types on the LAN
        everywhere.check(own, None)
    if name.lower() != "localhost":
        with pytest.raises(CrossSiteRequest):
            rules.check(name, None)  # listening on loopback: the machine's name is not among its hosts
    with pytest.raises(CrossSiteRequest):
        everywhere.check("evil.example:8471", None)
    SiteRules.of(RouterConfig(allowed_hosts=["*"], allowed_origins=["*"]), "router").check(EVIL, "http://evil.example")


# -- lessord --------------------------------------------------------------------------------------

@pytest.fixture
def lessord(tmp_path):
    config = config_file(tmp_path, [standin_spec("m", tmp_path)],
                         admin={"unix_socket": str(tmp_path / "admin.sock")})
    with running_lessord(config) as (_, url, router):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        yield url, router, token, tmp_path


def test_a_cross_origin_simple_post_to_the_router_loads_nothing(lessord):
    url, router, _, tmp_path = lessord
    port = router.rsplit(":", 1)[1]
    attempts = [{"Host": f"{EVIL}:{port}", "Origin": f"http://{EVIL}:{port}"},  # DNS rebinding: same origin, foreign Host
                {"Origin": f"http://{EVIL}"},  # a page of another site, its form or text/plain fetch
                {"Host": f"{EVIL}:{port}", "Sec-Fetch-Site": "same-origin"}]  # a browser's, without an Origin
    for headers in attempts:
        status, _, body = send(router, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "text/plain", **headers})
        assert status == 403, (headers, status, body)
        field = "Host" if "Host" in headers else "Origin"
        assert body["error"]["param"] == field, body
    assert state_of(url) == "unloaded" and not (tmp_path / "m.json").exists()  # the engine never started
    status, headers, _ = send(router, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": f"http://{EVIL}", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status >= 400 and "access-control-allow-origin" not in headers
    status, _, body = send(router, "POST", "/v1/chat/completions", CHAT,
                           {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200, body  # its own site (and below, no Origin at all) is served
    assert send(router, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})[0] == 200
    # A client that is no browser may reach the box by any name (a container's host.docker.internal).
    assert send(router, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json",
                                                               "Host": f"host.docker.internal:{port}"})[0] == 200


def test_the_admin_api_checks_host_and_origin_and_grants_no_preflight(lessord):
    url, _, token, tmp_path = lessord
    port = url.rsplit(":", 1)[1]
    status, _, body = send(url, "GET", "/admin/v1/status", headers={"Host": f"{EVIL}:{port}"})
    assert status == 403 and body["error"]["field"] == "Host" and "admin.allowed_hosts" in body["error"]["message"]
    load = json.dumps({"action": "load"}).encode()
    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, _, body = send(url, "POST", "/admin/v1/models/m", load, {**bearer, "Origin": f"http://{EVIL}"})
    assert status == 403 and body["error"]["field"] == "Origin", body
    status, _, body = send(url, "POST", "/admin/v1/reload", b"", {"Content-Type": "text/plain",
                                                                 "Origin": f"http://{EVIL}"})
    assert status == 403 and body["error"]["field"] == "Origin", body
    status, headers, _ = send(url, "OPTIONS", "/admin/v1/models/m", headers={
        "Origin": f"http://{EVIL}", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert status >= 400 and "access-control-allow-origin" not in headers
    assert state_of(url) == "unloaded" and not (tmp_path / "m.json").exists()
    # The dashboard (its own origin), localhost, the unix socket with any Host, and no Origin at all are served.
    assert send(url, "GET", "/", headers={"Host": f"localhost:{port}"})[0] == 200
    assert send(url, "GET", "/admin/v1/status", headers={"Host": EVIL}, unix=str(tmp_path / "admin.sock"))[0] == 200
    status, _, body = send(url, "POST", "/admin/v1/models/m", load, {**bearer, "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and body["state"] == "ready", body
    cli = subprocess.run([str(BIN / "lessor"), "status", "--admin", url, "--token", token], capture_output=True,
                         text=True, timeout=HANG_S)
    assert cli.returncode == 0 and "m" in cli.stdout, cli.stderr


def test_a_router_with_api_keys_still_refuses_another_sites_page(tmp_path, monkeypatch):
    key = "router-key-0123456789abcdef"
    config = config_file(tmp_path, [standin_spec("m", tmp_path)],
                         router={"api_keys": [{"key_env": "LESSOR_TEST_KEY", "models": ["*"]}]})
    with running_lessord(config, env={"LESSOR_TEST_KEY": key}) as (_, url, router):
        status, _, body = send(router, "POST", "/v1/chat/completions", CHAT,
                               {"Content-Type": "text/plain", "Authorization": f"Bearer {key}",
                                "Origin": f"http://{EVIL}"})
        assert status == 403, body
        assert state_of(url) == "unloaded"
