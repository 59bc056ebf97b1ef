"""Who may do what: the admin token on every mutating call and the event stream, compared in
constant time and never written to a log or an engine's environment; router API keys likewise;
engines started from argv lists, never through a shell."""

import json
import re
import urllib.error
import urllib.request

import pytest

from lessor.api.admin import ROUTES
from lessor.api.auth import check_bearer
from lessor.daemon.errors import Unauthorized

from ..support.clients import Admin
from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.paths import ROOT
from ..support.waiting import HANG_S

DRY_RUNS = {"POST /admin/v1/plan"}  # a POST that changes nothing: it answers "would this fit"


def test_every_mutating_route_and_the_event_stream_need_the_token():
    open_routes = [f"{r.method} {r.path}" for r in ROUTES
                   if (r.method != "GET" or r.path.endswith("/events") or r.path.endswith("/log")) and not r.auth]
    assert open_routes == sorted(DRY_RUNS)


def test_the_admin_token_is_compared_in_constant_time(monkeypatch):
    import lessor.api.auth as auth

    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))

    class Request:
        headers = {"Authorization": "Bearer guess"}
    with pytest.raises(Unauthorized):
        check_bearer(Request(), "the-real-token")
    assert compared == [(b"guess", b"the-real-token")]


def test_no_code_starts_a_process_through_a_shell():
    pattern = re.compile(r"shell\s*=\s*True|create_subprocess_shell|os\.system\(|os\.popen\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("daemon", "engines", "api", "policies")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_tokens_and_keys_never_reach_a_log_or_an_engine(tmp_path):
    """At DEBUG, with right and wrong admin tokens and router keys: none of them is in lessord's
    output, the engine's log, or the engine's environment. Shell syntax in the config reaches the
    engine as literal argv, and runs nothing."""
    key = "router-key-0123456789abcdef"
    spec = standin_spec("m", tmp_path)
    canary = tmp_path / "pwned"
    spec["engine"]["model_path"] = f"/models/$(touch {canary})"
    spec["engine"]["extra_args"] = ["--note", f"x; touch {canary}", f"`touch {canary}`"]
    config = config_file(tmp_path, [spec], router={"api_keys": [{"key_env": "LESSOR_TEST_KEY", "models": ["*"]}]})
    output = tmp_path / "lessord.out"
    wrong_token, wrong_key = "wrong-admin-token-5f3e9a", "wrong-router-key-77c1d0e4"
    token = "admin-token-from-the-environment-4d2c"  # LESSOR_ADMIN_TOKEN: lessord's env holds it, engines must not
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "admin.token").write_text("not-the-token-in-force\n")
    env = {"LESSOR_TEST_KEY": key, "LESSOR_ADMIN_TOKEN": token}
    with running_lessord(config, "--log-level", "DEBUG", output=output, env=env) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("m")[0] == 401  # the file's token is not the one in force
        admin.token = token
        assert admin.load("m")[0] == 200
        admin.token = wrong_token
        assert admin.load("m")[0] == 401
        for bearer, expected in ((key, 200), (wrong_key, 401)):
            request = urllib.request.Request(f"{router}/v1/chat/completions", data=b'{"model": "m", "messages": []}',
                                             headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=HANG_S) as r:
                    assert r.status == expected
            except urllib.error.HTTPError as e:
                assert e.code == expected
    seen = json.loads((tmp_path / "m.json").read_text())
    engine_log = (tmp_path / "state" / "logs" / "m.log").read_text()
    everything = output.read_text() + engine_log + json.dumps(seen)
    assert "DEBUG" in output.read_text()  # it did log at DEBUG
    for secret in (token, wrong_token, key, wrong_key):
        assert secret not in everything
    assert "LESSOR_ADMIN_TOKEN" not in seen["env"] and "LESSOR_TEST_KEY" not in seen["env"]
    assert f"/models/$(touch {canary})" in seen["argv"] and f"x; touch {canary}" in seen["argv"]
    assert f"`touch {canary}`" in seen["argv"] and not canary.exists()
