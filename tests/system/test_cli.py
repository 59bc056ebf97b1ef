"""The `lessor` command against a real lessord on simulated devices, with the stand-in engine
(tests/support/standin_engine.py) as the models' server; the renderers on plain dicts."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml

from lessor.api import cli_render
from lessor.api.cli import main
from lessor.daemon.units import GiB
from lessor.engines.process import free_port

from ..support.lessord import running_lessord
from ..support.paths import BIN, STANDIN
from ..support.waiting import HANG_S


def standin(name: str, **env: str) -> dict:
    return {"name": name, "engine": {"kind": "vllm", "model_path": f"/models/{name}",
                                     "command": [sys.executable, STANDIN], "env": env},
            "memory": {"weights": "2GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096}, "restart": {"policy": "never"}}


def write_config(path: Path, state: Path, models: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({
        "state_dir": str(state), "policy": {"name": "lru_idle"},
        "devices": {"probe": "sim", "headroom": "512MiB", "simulated": [{"name": "sim8", "total": "8GiB", "foreign": "1GiB"}]},
        "models": models}))
    return path


@pytest.fixture(autouse=True)
def no_config_found(tmp_path, monkeypatch):
    """The CLI as on a machine without lessord's service: no $LESSOR_CONFIG, no /etc/lessor/lessor.yaml."""
    from lessor.api import cli_client

    for name in ("LESSOR_CONFIG", "LESSOR_ADMIN_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_client, "DEFAULT_CONFIG", tmp_path / "etc" / "lessor.yaml", raising=False)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """(admin url, the config lessord runs, its process): models qa and qb, and broken, whose engine exits at start."""
    monkeypatch.delenv("LESSOR_ADMIN_TOKEN", raising=False)
    config = write_config(tmp_path / "lessor.yaml", tmp_path / "state",
                          [standin("qa"), standin("qb"), standin("broken", LESSOR_STANDIN_EXIT="3")])
    with running_lessord(config, output=tmp_path / "lessord.out") as (proc, url, _router):
        yield url, config, proc


def lessor(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def ignoring_sigint() -> None:
    """What a shell without job control does to a job it starts with `&` (`make test &` in a
    script): SIGINT ignored, inherited by every child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Running:
    """`lessor ...` as a process, its stdout and stderr read line by line as they come. Started with
    SIGINT ignored, as under `make test &`, so Ctrl-C is tested the same however the suite runs."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("LESSOR_ADMIN_TOKEN", "LESSOR_CONFIG", "LESSOR_ADMIN_URL")}
        self.proc = subprocess.Popen([str(BIN / "lessor"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=ignoring_sigint)
        self.lines: dict[str, queue.Queue] = {"out": queue.Queue(), "err": queue.Queue()}
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(stream, self.lines[name]), daemon=True).start()
        self.seen: dict[str, list[str]] = {"out": [], "err": []}

    @staticmethod
    def _read(stream, into: queue.Queue) -> None:
        for line in stream:
            into.put(line.rstrip("\n"))
        into.put(None)

    def wait_for(self, text: str, stream: str = "out") -> str:
        """The first line (from now) holding `text`; HANG_S only turns a hang into a failure."""
        deadline = time.monotonic() + HANG_S
        while True:
            line = self.lines[stream].get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, f"{stream} ended before {text!r}: {self.seen}"
            self.seen[stream].append(line)
            if text in line:
                return line

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit status and what is left of stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(HANG_S)
        rest = []
        while (line := self.lines["err"].get(timeout=HANG_S)) is not None:
            rest.append(line)
        return code, "\n".join(self.seen["err"] + rest)


def admin_args(url: str, config: Path) -> list[str]:
    return ["--admin", url, "--config", str(config)]


# -- 1. logs --------------------------------------------------------------------------------------

def test_logs_prints_the_engine_log_and_follows_the_next_run(daemon, capsys):
    url, config, _ = daemon
    assert lessor(capsys, "load", "qa", *admin_args(url, config))[0] == 0
    code, out, _ = lessor(capsys, "logs", "qa", "-n", "5", *admin_args(url, config))
    assert code == 0 and "stand-in serving qa" in out
    follow = Running("logs", "qa", "-f", "--interval", "0.05", *admin_args(url, config))
    follow.wait_for("stand-in serving qa")
    assert lessor(capsys, "unload", "qa", *admin_args(url, config))[0] == 0
    assert lessor(capsys, "load", "qa", *admin_args(url, config))[0] == 0
    follow.wait_for("a new engine log")
    follow.wait_for("stand-in serving qa")
    code, err = follow.interrupt()
    assert code == 130 and "Traceback" not in err


def sigint_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGINT (SigCgt in /proc), not the inherited SIG_IGN."""
    masks = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool(int(masks["SigCgt"], 16) & bit) and not int(masks["SigIgn"], 16) & bit


def test_ctrl_c_ends_a_follow_started_with_sigint_ignored(daemon, capsys):
    """`make test &` from a script: the follow below inherits SIGINT ignored; it still ends on it."""
    url, config, _ = daemon
    follow = Running("logs", "qb", "-f", "--interval", "0.05", *admin_args(url, config))
    follow.wait_for("waiting for it to start", "err")  # running its loop: its handlers are set
    if not sigint_caught(follow.proc.pid):
        follow.proc.kill()
        pytest.fail("SIGINT is still ignored: Ctrl-C would never end `lessor logs -f`")
    code, err = follow.interrupt()
    assert code == 130 and "Traceback" not in err


def test_logs_of_a_model_never_started_say_so_or_wait_for_its_start(daemon, capsys):
    url, config, _ = daemon
    code, _, err = lessor(capsys, "logs", "qb", *admin_args(url, config))
    assert code == 1 and "has no engine log yet" in err
    follow = Running("logs", "qb", "-f", "--interval", "0.05", *admin_args(url, config))
    follow.wait_for("waiting for it to start", "err")
    assert lessor(capsys, "load", "qb", *admin_args(url, config))[0] == 0
    follow.wait_for("stand-in serving qb")
    code, err = follow.interrupt()
    assert code == 130 and "Traceback" not in err


# -- 2 and 3. events and top ---------------------------------------------------------------------

def test_events_print_a_line_each_or_the_raw_json(daemon, capsys):
    url, config, _ = daemon
    human, raw = Running("events", *admin_args(url, config)), Running("events", "--json", *admin_args(url, config))
    for stream in (human, raw):
        stream.wait_for("following the events", "err")
    assert lessor(capsys, "load", "qa", *admin_args(url, config))[0] == 0
    line = human.wait_for("loading -> ready")
    assert " model_state " in line and "qa" in line
    assert any(" lease_granted " in seen and "qa gpu0 weights 2.0 GiB" in seen for seen in human.seen["out"])
    event = json.loads(raw.wait_for('"state":"ready"'))
    assert event["type"] == "model_state" and event["model"] == "qa" and event["previous"] == "loading"
    for stream in (human, raw):
        code, err = stream.interrupt()
        assert code == 130 and "Traceback" not in err


def test_top_draws_once_or_again_on_each_event(daemon, capsys):
    url, config, _ = daemon
    code, out, _ = lessor(capsys, "top", "--once", *admin_args(url, config))
    assert code == 0 and out.startswith("lessor top") and "(connected)" in out and "gpu0" in out
    top = Running("top", *admin_args(url, config))
    top.wait_for("(connected)")
    assert lessor(capsys, "load", "qb", *admin_args(url, config))[0] == 0
    top.wait_for("loading -> ready")  # the header of the frame drawn after that event
    assert "2.0 GiB" in top.wait_for("  a qb ")  # its lease on the device, lettered
    code, err = top.interrupt()
    assert code == 130 and "Traceback" not in err


# -- 4 and 5. version, completion ----------------------------------------------------------------

def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lessor {installed_version('lessor')}"


def complete(words: list[str], script: str) -> list[str]:
    """What bash offers for the last word, with the script `lessor completion bash` printed."""
    program = (f'{script}\nCOMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; '
               '_lessor; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.splitlines()))


def test_bash_completion_offers_commands_flags_and_the_daemons_model_names(daemon, capsys):
    url, _, _ = daemon
    code, script, _ = lessor(capsys, "completion", "bash")
    assert code == 0 and "complete -F _lessor lessor" in script
    assert complete(["lessor", "lo"], script) == ["load", "logs"]
    assert complete(["lessor", "logs", "--fo"], script) == ["--follow"]
    assert complete(["lessor", "completion", ""], script) == ["bash", "zsh"]
    assert complete(["lessor", "load", "--admin", url, ""], script) == ["broken", "qa", "qb"]
    zsh = lessor(capsys, "completion", "zsh")[1]
    assert "bashcompinit" in zsh and "complete -F _lessor lessor" in zsh


def test_completion_finds_the_command_after_options_given_before_it(capsys):
    script = lessor(capsys, "completion", "bash")[1]
    assert complete(["lessor", "--config", "x.yaml", "lo"], script) == ["load", "logs"]
    assert complete(["lessor", "--json", "--admin", "http://h:1", "logs", "--fo"], script) == ["--follow"]
    assert "--config" in complete(["lessor", "--"], script)


# -- 7, 8, 10: the model table, which config, set-foreign ----------------------------------------

def test_models_table_shows_idle_time_requests_pid_and_the_error(daemon, capsys, monkeypatch):
    url, config, _ = daemon
    assert lessor(capsys, "load", "qa", *admin_args(url, config))[0] == 0
    assert lessor(capsys, "load", "broken", *admin_args(url, config))[0] == 1
    models = {m["name"]: m for m in json.loads(lessor(capsys, "models", "--json", "--admin", url)[1])}
    assert models["qa"]["idle_s"] >= 0 and models["qa"]["in_flight"] == 0 and models["qa"]["pid"] > 0
    assert models["qb"]["idle_s"] is None and "exited" in models["broken"]["error"]
    monkeypatch.setenv("COLUMNS", "60")
    out = lessor(capsys, "models", "--admin", url)[1]
    header, *rows = out.splitlines()
    assert header.split() == ["MODEL", "STATE", "ENGINE", "PRIO", "PINNED", "IDLE", "INFL", "UNTIL", "PID"]
    qa = dict(zip(header.split(), next(r for r in rows if r.startswith("qa ")).split()))
    assert qa["PID"] == str(models["qa"]["pid"]) and qa["INFL"] == "0" and qa["IDLE"].endswith("s")
    assert qa["UNTIL"] == "never" and models["qa"]["keep_alive_ends_in_s"] is None  # keep_alive -1: never
    error = rows[rows.index(next(r for r in rows if r.startswith("broken "))) + 1]
    # Not a terminal (a pipe, a log, a test): every word of the reason, on its line.
    assert error == "  error: " + " ".join(models["broken"]["error"].split())
    # On a terminal 60 wide: wrapped to it, at most four lines, and where the rest is.
    table = cli_render.render_models(list(models.values()), width=60).splitlines()
    at = table.index(next(r for r in table if r.startswith("broken "))) + 1
    wrapped = [line for line in table[at:] if line.startswith("  ")]
    assert wrapped[0].startswith("  error: ") and all(len(line) <= 60 for line in wrapped)
    assert 1 <= len(wrapped) <= cli_render.ERROR_LINES
    if len(" ".join(models["broken"]["error"].split())) > 4 * 50:
        assert "`lessor models --json` has them whole" in table[-1]
    assert lessor(capsys, "models", "--names", "--admin", url)[1].split() == ["qa", "qb", "broken"]


def test_status_names_the_config_and_the_cli_warns_of_another(daemon, capsys, tmp_path):
    url, config, proc = daemon
    code, out, err = lessor(capsys, "status", "--json", *admin_args(url, config))
    running = json.loads(out)["config"]
    assert code == 0 and err == "" and running["path"] == str(config.resolve()) and len(running["digest"]) == 12
    other = write_config(tmp_path / "other.yaml", tmp_path / "state", [standin("qa")])
    err = lessor(capsys, "status", *admin_args(url, other))[2]
    assert err.strip() == (f"lessor: the daemon at {url} runs {config.resolve()}, not {other} "
                           "(is another lessord on that port?)")
    config.write_text(config.read_text() + "# edited, not reloaded\n")
    err = lessor(capsys, "models", *admin_args(url, config))[2]
    assert f"runs {config} as it was when read (digest {running['digest']})" in err and "SIGHUP" in err
    events = Running("events", *admin_args(url, config))
    events.wait_for("following the events", "err")
    proc.send_signal(signal.SIGHUP)  # a reload reads the file again: the status has its new digest
    events.wait_for("config_reloaded")
    events.interrupt()
    code, out, err = lessor(capsys, "status", "--json", *admin_args(url, config))
    assert err == "" and json.loads(out)["config"]["digest"] not in ("", running["digest"])


def test_set_foreign_prints_the_new_budget(daemon, capsys):
    url, config, _ = daemon
    code, out, _ = lessor(capsys, "set-foreign", "gpu0", "3GiB", *admin_args(url, config))
    assert code == 0 and out.strip() == "gpu0: foreign 3.0 GiB, leasable 4.5 GiB, free 4.5 GiB"
    assert json.loads(lessor(capsys, "set-foreign", "gpu0", "1GiB", "--json", *admin_args(url, config))[1])["free_bytes"] \
        == int(6.5 * GiB)


# -- which daemon: --config before or after the command, $LESSOR_CONFIG, the service's config -----

def test_config_before_the_command_and_lessor_config_find_the_daemon_and_its_token(daemon, capsys, monkeypatch):
    url, config, _ = daemon
    code, out, err = lessor(capsys, "--config", config, "--admin", url, "status", "--json")
    assert code == 0 and err == "" and json.loads(out)["config"]["path"] == str(config.resolve())
    assert lessor(capsys, "--json", "--admin", url, "models")[0] == 0  # every daemon option goes before it too
    # $LESSOR_CONFIG: the token read from its state_dir (without it: 401, no token sent).
    monkeypatch.setenv("LESSOR_CONFIG", str(config))
    code, _, err = lessor(capsys, "logs", "qb", "--admin", url)
    assert code == 1 and "has no engine log yet" in err and "401" not in err


def test_without_a_config_the_cli_says_which_address_it_asks_and_why(tmp_path, capsys, monkeypatch):
    from lessor.api import cli_client
    from lessor.api.cli import parser

    def address(*argv: str):
        return cli_client.daemon_address(parser().parse_args([*argv, "status"]))

    base, path, note = address()
    assert (base, path) == (cli_client.DEFAULT_ADMIN, None)
    assert note == (f"asking {cli_client.DEFAULT_ADMIN}, the default admin address: no --admin or $LESSOR_ADMIN_URL, "
                    f"no --config or $LESSOR_CONFIG, and {tmp_path / 'etc' / 'lessor.yaml'} does not exist")
    # The service's config, where it is readable: its admin.listen, said nothing about.
    (tmp_path / "etc").mkdir()
    write_config(tmp_path / "etc" / "lessor.yaml", tmp_path / "state", [standin("qa")])
    service = yaml.safe_load((tmp_path / "etc" / "lessor.yaml").read_text())
    (tmp_path / "etc" / "lessor.yaml").write_text(yaml.safe_dump({**service, "admin": {"listen": "127.0.0.1:18999"}}))
    assert address() == ("http://127.0.0.1:18999", str(tmp_path / "etc" / "lessor.yaml"), "")
    # A config named beats it, before or after the command or in $LESSOR_CONFIG; --admin beats both.
    named = write_config(tmp_path / "named.yaml", tmp_path / "state", [standin("qa")])
    assert address("--config", str(named))[:2] == ("http://127.0.0.1:8470", str(named))
    monkeypatch.setenv("LESSOR_CONFIG", str(named))
    assert address()[1] == str(named) and address("--admin", "http://h:1") == ("http://h:1", str(named), "")
    # The note reaches stderr when the default is used (the call itself then fails: nothing listens there).
    monkeypatch.delenv("LESSOR_CONFIG")
    (tmp_path / "etc" / "lessor.yaml").unlink()
    monkeypatch.setattr(cli_client, "DEFAULT_ADMIN", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit, match="cannot reach the admin API"):
        main(["status"])
    assert "the default admin address" in capsys.readouterr().err


# -- load: what it evicted; models: keep_alive's end ---------------------------------------------

@pytest.fixture
def small_card(tmp_path):
    """Two models of 4 GiB that do not fit the 6.5 GiB left together; `big` keeps alive 10 minutes."""
    big = {**standin("big"), "keep_alive": "10m"}
    big["memory"] = {**big["memory"], "weights": "4GiB"}
    other = {**standin("other"), "memory": {**big["memory"]}}
    config = write_config(tmp_path / "lessor.yaml", tmp_path / "state", [big, other])
    with running_lessord(config, output=tmp_path / "lessord.out") as (_proc, url, router):
        yield url, config, router


def test_load_names_what_it_evicted_and_models_say_when_keep_alive_ends(small_card, capsys):
    url, config, router = small_card
    code, out, _ = lessor(capsys, "load", "big", *admin_args(url, config))
    assert code == 0 and out.startswith("big: ready in ") and "evicted" not in out
    big = json.loads(lessor(capsys, "models", "--json", "--admin", url)[1])[0]
    assert big["name"] == "big" and 0 < big["keep_alive_ends_in_s"] <= 600
    out = lessor(capsys, "models", "--admin", url)[1]
    header, *rows = out.splitlines()
    row = dict(zip(header.split(), next(r for r in rows if r.startswith("big ")).split()))
    assert row["UNTIL"] != "never" and row["UNTIL"].endswith("s")
    # A request's own keep_alive (Ollama's field) is the model's from then on: UNTIL counts it down.
    body = json.dumps({"model": "big", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 30}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{router}/v1/chat/completions", data=body), timeout=HANG_S):
        pass
    big = json.loads(lessor(capsys, "models", "--json", "--admin", url)[1])[0]
    assert 0 <= big["keep_alive_ends_in_s"] <= 30
    code, out, _ = lessor(capsys, "load", "other", *admin_args(url, config))
    assert code == 0 and out.strip().endswith("; evicted big to make room"), out
    code, out, _ = lessor(capsys, "load", "big", "--json", *admin_args(url, config))
    assert code == 0 and json.loads(out)["evicted"] == ["other"]


# -- 9. the token ------------------------------------------------------------------------------

def test_a_refused_token_says_where_the_cli_looked_and_how_to_give_it(daemon, capsys, tmp_path, monkeypatch):
    url, config, _ = daemon
    code, _, err = lessor(capsys, "logs", "qa", "--admin", url, "--token", "wrong")
    assert code == 1 and "401 unauthorized" in err and "the token given with --token was refused" in err
    assert "--config FILE" in err and "--token TOKEN" in err and "$LESSOR_ADMIN_TOKEN" in err
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "nowhere"))
    err = lessor(capsys, "events", "--admin", url)[2]
    assert f"no token sent: {tmp_path / 'nowhere' / 'admin.token'} (no --config given, so only the default state dir) is missing" in err


# -- 11. a reader that leaves ----------------------------------------------------------------------

def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    config = write_config(tmp_path / "lessor.yaml", tmp_path / "state", [standin("qa")])
    proc = subprocess.Popen([str(BIN / "lessor"), "plan", "qa", "--config", str(config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -1` does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(HANG_S) == 141 and err == ""


# -- renderers on dicts ----------------------------------------------------------------------------

def device(models: dict, foreign: int = 2 * GiB, capacity: int = 10 * GiB) -> dict:
    leased = sum(b for kinds in models.values() for b in kinds.values())
    leasable = capacity - foreign - GiB
    return {"id": "gpu0", "name": "sim", "total_bytes": capacity, "capacity_bytes": capacity, "foreign_bytes": foreign,
            "headroom_bytes": GiB, "leased_bytes": leased, "leasable_bytes": leasable, "free_bytes": leasable - leased,
            "models": models}


def status_of(*devices: dict, models: list[str] = ()) -> dict:
    return {"version": "0.1.0", "probe": "sim", "policy": "lru_idle", "devices": list(devices),
            "models": [{"name": n, "state": "ready", "engine": "vllm", "priority": 0, "pinned": False} for n in models]}


def test_the_bar_says_whose_block_is_whose():
    d = device({"qwen": {"weights": 2 * GiB, "kv": GiB}, "llama": {"weights": 2 * GiB, "kv": GiB}})
    top, owners = cli_render.bar(d, {"qwen": "a", "llama": "b"}, width=10)
    assert top == "[##!WWKWWK.]"
    assert owners == "    aaabbb"
    text = cli_render.render_status(status_of(d, models=["qwen", "llama"]))
    assert "a = qwen  b = llama" in text and "  a qwen " in text and "OVERCOMMITTED" not in text
    assert "\x1b[" not in text


def test_colours_only_when_asked_and_an_overcommitted_device_says_by_how_much():
    d = device({"qwen": {"weights": 6 * GiB, "kv": 2 * GiB}}, foreign=3 * GiB)
    top, owners = cli_render.bar(d, {"qwen": "a"}, width=10)
    assert top.endswith(">") and top.count("]") == 0
    text = cli_render.render_status(status_of(d, models=["qwen"]))
    assert "OVERCOMMITTED by 2.0 GiB" in text and "free " not in text
    coloured = cli_render.render_status(status_of(d, models=["qwen"]), colour=True)
    assert "\x1b[32mW\x1b[0m" in coloured and "\x1b[32ma\x1b[0m" in coloured
    assert cli_render.render_budget(d) == "gpu0: foreign 3.0 GiB, leasable 6.0 GiB, OVERCOMMITTED by 2.0 GiB (leased 8.0 GiB)"


def test_colour_follows_the_terminal_and_no_color(monkeypatch):
    from lessor.api import cli

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli._colour() is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli._colour() is False


def plan(**extra) -> dict:
    return {"model": "qa", "fits": True, "evictions": [], "params": {"max_model_len": 4096},
            "leases": [{"kind": "weights", "device": "gpu0", "bytes": 2 * GiB}], "reasons": [], **extra}


def test_a_plan_of_a_loaded_model_says_it_is_loaded():
    assert cli_render.render_plan(plan()).splitlines()[0] == "model qa: fits"
    loaded = plan(loaded=True, current=[{"kind": "weights", "device": "gpu0", "bytes": 2 * GiB},
                                        {"kind": "kv", "device": "gpu0", "bytes": GiB}])
    assert cli_render.render_plan(loaded).splitlines()[0] == "model qa: loaded (holds 3.0 GiB on gpu0); a fresh load would: fits"
    by_device = plan(loaded=True, fits=False, current={"gpu0": {"weights": 2 * GiB}})
    assert cli_render.render_plan(by_device).startswith("model qa: loaded (holds 2.0 GiB on gpu0); a fresh load would: does NOT fit")


@pytest.mark.parametrize("event,line", [
    ({"type": "model_state", "model": "qa", "state": "ready", "previous": "loading", "reason": ""}, "qa loading -> ready"),
    ({"type": "lease_granted", "lease_id": "x", "model": "qa", "device": "gpu0", "kind": "kv", "bytes": GiB}, "qa gpu0 kv 1.0 GiB"),
    ({"type": "engine_exited", "model": "qa", "pid": 7, "returncode": 1, "reason": "oom", "restart_in_s": 2.0},
     "qa pid 7 exited 1: oom; restart in 2 s"),
    ({"type": "foreign_usage", "device": "gpu0", "foreign_bytes": 2 * GiB, "previous_bytes": GiB}, "gpu0 foreign 1.0 GiB -> 2.0 GiB"),
    ({"type": "budget_overcommitted", "device": "gpu0", "short_bytes": GiB, "victims": [], "reason": ""},
     "gpu0 short 1.0 GiB; no idle model to evict"),
    ({"type": "from_the_future", "colour": "blue"}, "colour=blue"),
])
def test_each_event_is_one_line(event, line):
    rendered = cli_render.render_event({"at_s": 0.0, **event})
    assert rendered.endswith(line) and event["type"] in rendered and "\n" not in rendered


def test_a_waiting_model_says_what_it_waits_for_and_until_says_when_keep_alive_ends():
    base = {"engine": "vllm", "priority": 0, "pinned": False, "in_flight": 0, "pid": None}
    models = [
        {**base, "name": "chat", "state": "ready", "idle_s": 35.0, "keep_alive_ends_in_s": 125.0, "pid": 41},
        {**base, "name": "coder", "state": "waiting", "idle_s": None, "keep_alive_ends_in_s": None,
         "waiting": {"reason": "evicting chat would lose more requests than coder would serve", "recheck_in_s": 12.4,
                     "blockers": ["chat"], "requests": 2}},
        {**base, "name": "pinned", "state": "ready", "pinned": True, "idle_s": 3.0, "keep_alive_ends_in_s": None},
        {**base, "name": "older", "state": "ready", "idle_s": 3.0},  # a daemon without the field
    ]
    header, *rows = cli_render.render_models(models, width=0).splitlines()
    cells = {row.split()[0]: dict(zip(header.split(), row.split())) for row in rows if not row.startswith(" ")}
    assert [cells[m]["UNTIL"] for m in ("chat", "coder", "pinned", "older")] == ["2m05s", "-", "never", "-"]
    assert cells["coder"]["STATE"] == "waiting"
    assert rows[rows.index(next(r for r in rows if r.startswith("coder "))) + 1] == (
        "  waiting: evicting chat would lose more requests than coder would serve; 2 request(s) waiting; "
        "held up by chat; weighed again in 12s")
    assert cli_render.waiting_line({"reason": "room is being made"}) == "waiting: room is being made"


def test_a_crash_is_one_short_event_line_and_its_log_lines_stay_in_the_event():
    argv = "/opt/vllm/bin/vllm serve /models/qa " + " ".join(f"--flag-{i} {i}" for i in range(60))
    reason = (f"engine exited with code 1 while serving; last log lines: # lessor: starting {argv} | "
              "INFO serving | RuntimeError: CUDA error: an illegal memory access was encountered")
    event = {"type": "engine_exited", "model": "qa", "pid": 7, "returncode": 1, "reason": reason, "restart_in_s": None}
    line = cli_render.render_event({"at_s": 0.0, **event})
    assert line.endswith("qa pid 7 exited 1: engine exited with code 1 while serving (its log: lessor logs qa); no restart")
    assert len(line) < 160
    failed = cli_render.render_event({"at_s": 0.0, "type": "model_state", "model": "qa", "previous": "ready",
                                      "state": "failed", "reason": reason})
    assert failed.endswith("qa ready -> failed: engine exited with code 1 while serving (its log: lessor logs qa)")


async def test_a_refused_reload_is_one_short_event_line_and_its_reason_stays_in_the_event(tmp_path):
    """It was 426 characters across 2 lines (the ConfigError's text, a line per problem)."""
    from lessor.daemon.config.schema import load_config
    from lessor.daemon.errors import ConfigError
    from lessor.daemon.runtime import runtime

    from ..support.configs import torch_model
    from ..support.fakes import FakeEngines
    card = {"probe": "sim", "headroom": "1GiB", "simulated": [{"name": "sim8", "total": "8GiB", "foreign": "0"}]}
    huge = {**torch_model("huge"), "memory": {"weights": "20GiB", "kv_bytes_per_token": 65536, "load_peak": 0}}
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "devices": card,
                                    "models": [torch_model("a", "2GiB")]}))
    async with runtime(load_config(path), engines=FakeEngines(), config_loader=lambda: load_config(path)) as controller:
        events = controller.bus.subscribe()
        path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "devices": card,
                                        "models": [torch_model("a", "2GiB"), huge, {**huge, "name": "huge2"}]}))
        with pytest.raises(ConfigError):
            await controller.reload_file()
        event = (await events.get()).to_dict()
    assert event["type"] == "config_reloaded" and event["reason"].count("can never fit on gpu0") == 2  # all kept
    line = cli_render.render_event(event)
    assert "\n" not in line and len(line) <= 200, line
    assert "config_reloaded      refused: models[1]: can never fit on gpu0: it needs 20.1 GiB" in line
    assert line.endswith("... (and 1 more); running config kept"), line


def test_durations():
    assert [cli_render.duration(s) for s in (None, 5, 65, 7380, 90000)] == ["-", "5s", "1m05s", "2h03m", "1d01h"]
