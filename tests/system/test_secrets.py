"""Nothing secret leaves through a route that needs no token: a failed load's error quotes its
engine's last log lines, and an engine may print its arguments and environment (vLLM prints its
non-default args). Without the admin token those are shown redacted (engines/redaction.py); the
token holder reads them whole. lessord's DEBUG line never carries the argv's secrets, and the state
folder is not open to other users."""

import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from lessor.engines.redaction import REDACTED, Redactor, argv_secrets, redact, redact_argv, secret_name, secrets_of

from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S

API_KEY = "sk-engine-api-key-5b1e0c"
FLAG_TOKEN = "hf_from_a_flag_93d7a1"
HF_TOKEN = "hf_from_engine_env_4c8f2e"
PLAIN_VALUE = "plain-looking-env-value-7a2b"  # engine.env: every value is hidden, whatever its name
DAEMON_SECRET = "lessord-own-db-password-61f0"
SECRETS = (API_KEY, FLAG_TOKEN, HF_TOKEN, PLAIN_VALUE, DAEMON_SECRET)


# -- the rule, pure ------------------------------------------------------------------------------

def test_secret_names_are_told_by_their_words():
    for name in ("--api-key", "--hf-token", "--api_key", "--apikey", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD",
                 "DB_PASS", "--auth", "apiKey", "OPENAI_API_KEY", "--client-secret"):
        assert secret_name(name), name
    for name in ("--max-num-batched-tokens", "--tokenizer", "TOKENIZERS_PARALLELISM", "--port", "PATH",
                 "--kv-cache-dtype", "MAX_TOKENS", "--served-model-name"):
        assert not secret_name(name), name


def test_argv_values_after_secret_flags_are_redacted_in_both_forms():
    argv = ["vllm", "serve", "/m", "--api-key", "sk-1", "--hf-token=hf-2", "--max-num-batched-tokens", "8192",
            "--tokenizer", "/t", "--port", "8000"]
    assert redact_argv(argv) == ["vllm", "serve", "/m", "--api-key", REDACTED, f"--hf-token={REDACTED}",
                                 "--max-num-batched-tokens", "8192", "--tokenizer", "/t", "--port", "8000"]
    assert argv_secrets(argv) == {"sk-1", "hf-2"}
    assert redact_argv(["--api-key", "-starts-with-a-dash"]) == ["--api-key", REDACTED]


def test_text_is_redacted_by_name_and_by_value():
    said = {
        "# lessor: starting vllm --api-key sk-a --port 8000": f"# lessor: starting vllm --api-key {REDACTED} --port 8000",
        "x --api-key=sk-b y": f"x --api-key={REDACTED} y",
        "non-default args: {'api_key': 'sk-c', 'model': '/m'}": f"non-default args: {{'api_key': '{REDACTED}', 'model': '/m'}}",
        'env: {"HF_TOKEN": "hf-d", "PATH": "/bin"}': f'env: {{"HF_TOKEN": "{REDACTED}", "PATH": "/bin"}}',
        "HF_TOKEN=hf-e PATH=/bin": f"HF_TOKEN={REDACTED} PATH=/bin",
        "Namespace(api_key='sk-f', port=80)": f"Namespace(api_key='{REDACTED}', port=80)",
        "postgresql://lessor:pw-g@db/ledger": f"postgresql://lessor:{REDACTED}@db/ledger",
        "it printed known-secret-value here": f"it printed {REDACTED} here",
        "--max-num-batched-tokens 8192 --kv-cache-dtype auto": "--max-num-batched-tokens 8192 --kv-cache-dtype auto",
        "non-default args: {'api_key': ['sk-h', 'sk-i'], 'port': 8000}":
            f"non-default args: {{'api_key': [{REDACTED}], 'port': 8000}}",
        "HF_TOKEN: hf_j\nmodel: /m": f"HF_TOKEN: {REDACTED}\nmodel: /m",
        "Authorization: Bearer sk-k": f"Authorization: Bearer {REDACTED}",
        "http://h:80/v1 max_num_batched_tokens: 8192": "http://h:80/v1 max_num_batched_tokens: 8192",
    }
    for text, shown in said.items():
        assert redact(text, {"known-secret-value"}) == shown, text
    assert redact("a 1 in 10", {"1"}) == "a 1 in 10"  # too short to search for: it would blank every digit


def test_the_secrets_of_a_config_and_an_environment():
    class Engine:
        env = {"HF_TOKEN": "hf-abcdef", "SOME_PATH": "/opt/weights", "N": "1"}
        extra_args = ["--api-key", "sk-abcdef", "--port", "8000"]

    class Spec:
        engine = Engine()
    environ = {"DB_PASSWORD": "pw-abcdef", "HOME": "/home/lessor", "LESSOR_ADMIN_TOKEN": "admin-abcdef"}
    assert secrets_of([Spec()], environ) == {"hf-abcdef", "/opt/weights", "sk-abcdef", "pw-abcdef", "admin-abcdef"}
    redactor = Redactor(secrets_of([Spec()], environ))
    assert redactor.data({"error": "x sk-abcdef y", "n": 3, "models": [{"error": "pw-abcdef"}]}) == \
        {"error": f"x {REDACTED} y", "n": 3, "models": [{"error": REDACTED}]}


# -- lessord, with an engine that prints its arguments and environment and fails its load ------------

def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _failing_spec(tmp_path) -> dict:
    spec = standin_spec("m", tmp_path)
    spec["pinned"] = True  # its failure at start is /readyz's reason too
    spec["engine"]["extra_args"] = ["--api-key", API_KEY, f"--hf-token={FLAG_TOKEN}"]
    spec["engine"]["env"].update({"HF_TOKEN": HF_TOKEN, "PLAIN_SETTING": PLAIN_VALUE,
                                  "LESSOR_STANDIN_PRINT_ARGS": "1", "LESSOR_STANDIN_EXIT": "3"})
    return spec


@pytest.fixture(scope="module")
def failed_load(tmp_path_factory):
    """lessord at DEBUG whose pinned model failed its load: (admin url, token, lessord's output)."""
    tmp_path = tmp_path_factory.mktemp("failed")
    config = config_file(tmp_path, [_failing_spec(tmp_path)])
    output = tmp_path / "lessord.out"
    with running_lessord(config, "--log-level", "DEBUG", output=output, env={"DB_PASSWORD": DAEMON_SECRET},
                         not_ready=True) as (_, url, _router):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        status, whole = _get(f"{url}/admin/v1/models/m", token)
        assert status == 200 and all(secret in whole for secret in SECRETS), whole  # the engine did print them all
        yield url, token, output


@pytest.mark.parametrize("path", ["/admin/v1/models", "/admin/v1/models/m", "/admin/v1/status", "/readyz", "/"])
def test_a_failed_loads_secrets_are_redacted_without_the_token_and_whole_with_it(failed_load, path):
    url, token, _ = failed_load
    for bearer in (None, "not-the-token"):
        status, text = _get(url + path, bearer)
        assert status in (200, 503), (status, text)
        assert [secret for secret in SECRETS if secret in text] == [], bearer
        marker = "\\u003credacted\\u003e" if path == "/" else REDACTED  # the page's JSON escapes < and >
        assert marker in text, text[:2000]  # the error is there, redacted
    status, text = _get(url + path, token)
    assert all(secret in text for secret in SECRETS)  # the token holder reads it whole


def test_lessords_debug_line_shows_the_argv_redacted(failed_load):
    started = [line for line in failed_load[2].read_text().splitlines() if "engine started" in line]
    assert started and not any(secret in line for line in started for secret in SECRETS), started
    assert f"--api-key {REDACTED}" in started[0] and f"--hf-token={REDACTED}" in started[0]


def test_the_state_folder_and_its_files_are_not_open_to_others(tmp_path):
    spec = standin_spec("m", tmp_path)
    config = config_file(tmp_path, [spec])
    old = os.umask(0o022)  # as an operator's shell has it: lessord must not rely on it
    try:
        with running_lessord(config) as (_, url, _router):
            token = (tmp_path / "state" / "admin.token").read_text().strip()
            request = urllib.request.Request(f"{url}/admin/v1/models/m", data=json.dumps({"action": "load"}).encode(),
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=HANG_S) as r:
                assert json.loads(r.read())["state"] == "ready"
    finally:
        os.umask(old)
    _assert_closed(tmp_path / "state")


def test_a_state_folder_left_open_by_an_older_lessord_is_closed_at_start(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    os.chmod(state, 0o755)
    (state / "logs" / "old.log").write_text(f"--api-key {API_KEY}\n")
    os.chmod(state / "logs" / "old.log", 0o644)
    output = tmp_path / "lessord.out"
    with running_lessord(config_file(tmp_path, [standin_spec("m", tmp_path)]), output=output):
        pass
    _assert_closed(state)
    assert "was mode 0755" in output.read_text()


def _assert_closed(state) -> None:
    assert stat.S_IMODE(state.stat().st_mode) in (0o750, 0o700)
    open_to_others = [f"{path.relative_to(state)} {stat.S_IMODE(path.lstat().st_mode):04o}" for path in state.rglob("*")
                      if not path.is_symlink() and path.lstat().st_mode & stat.S_IRWXO]
    assert open_to_others == []
    assert list((state / "logs").glob("*.log"))  # the engine logs were looked at


async def test_mqtt_carries_a_failed_loads_error_redacted(tmp_path, broker, monkeypatch):
    """The broker's subscribers hold no admin token: events and retained state say the error redacted."""
    import aiomqtt

    from lessor.daemon.errors import LessorError
    from lessor.daemon.runtime import publishing, runtime

    from ..support.configs import sim_config
    from ..support.mqtt import collect

    monkeypatch.setenv("DB_PASSWORD", DAEMON_SECRET)  # lessord's own environment, which the engine inherits
    spec = _failing_spec(tmp_path)
    spec.pop("pinned")
    config = sim_config(tmp_path, [spec], mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": "t"})
    async with runtime(config) as controller, publishing(controller):
        await controller.mqtt.wait_online(HANG_S)  # as test_mqtt's tests: what follows is published, not raced
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="watcher") as watcher:
            await watcher.subscribe("t/#", qos=1)
            await collect(watcher, lambda seen: "t/state/models/m" in seen)
            try:
                await controller.load("m")
            except LessorError as exc:
                assert API_KEY in str(exc)  # the error itself quotes the engine's printed arguments
            seen = await collect(watcher, lambda seen: any(json.loads(m.payload).get("error")
                                                          for m in seen.get("t/state/models/m", [])))
    payloads = [m.payload.decode() for messages in seen.values() for m in messages]
    assert [secret for secret in SECRETS if any(secret in p for p in payloads)] == []
    assert REDACTED in json.loads(seen["t/state/models/m"][-1].payload)["error"]
