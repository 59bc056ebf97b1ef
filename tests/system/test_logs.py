"""Logs: one INFO line per step of a model's lifecycle (its `step` and `model` in the record),
WARNING and above only for what an operator should act on, and `--log-format json` (one object a
line) for log shippers; under journald, plain lines without a timestamp."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone

import pytest

from lessor.api.logfilter import JsonFormatter, configure_logging, formatter_for, under_journald
from lessor.api.service import parse_args
from lessor.daemon.config.schema import load_config
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB
from lessor.engines.process import free_port, last_lines, process_identity

from ..support.clients import Admin
from ..support.configs import config_file, standin_spec
from ..support.lessord import kill_9, running_lessord
from ..support.waiting import HANG_S, until


def big_standin(name, tmp_path, **extra):
    """4 GiB of weights: two do not fit the 6.5 GiB test_restart's config leaves on its 8 GiB GPU."""
    spec = standin_spec(name, tmp_path)
    spec["memory"]["weights"] = "4GiB"
    return {**spec, **extra}


def steps(caplog):
    """(model, step, level) of the lifecycle lines logged so far, in order."""
    return [(r.model, r.step, r.levelname) for r in caplog.records if hasattr(r, "step") and hasattr(r, "model")]


def line(caplog, model, step):
    found = [r for r in caplog.records if getattr(r, "model", None) == model and getattr(r, "step", None) == step]
    assert len(found) == 1, f"one '{step}' line of {model}: {[r.getMessage() for r in found]}"
    return found[0]


def serious(caplog):
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


async def test_load_evict_and_unload_are_one_info_line_per_step_in_order(tmp_path, caplog):
    config = load_config(config_file(tmp_path, [big_standin("a", tmp_path), big_standin("b", tmp_path)]))
    with caplog.at_level(logging.INFO, logger="lessor"):
        async with runtime(config) as controller:
            await controller.load("a")
            await controller.load("b")  # no room for both: a is idle, lru_idle evicts it
            await controller.unload("b")
    info = "INFO"
    # b is planned once a's memory is back: its flags and leases are those of the room it got.
    assert steps(caplog) == [
        ("a", "admission", info), ("a", "planned", info), ("a", "loading", info), ("a", "ready", info),
        ("b", "admission", info), ("a", "evicted", info), ("a", "unloaded", info),
        ("b", "planned", info), ("b", "loading", info), ("b", "ready", info),
        ("b", "unloaded", info)]
    assert serious(caplog) == [], "a routine load, eviction and unload warn of nothing"

    planned = line(caplog, "a", "planned").getMessage()
    assert re.fullmatch(r"a: planned kv_tokens=\d+ .*; leases gpu0 weights 4\.0 GiB, .*kv [\d.]+ [MG]iB.*", planned)
    admitted_a, admitted_b = line(caplog, "a", "admission").getMessage(), line(caplog, "b", "admission").getMessage()
    assert re.fullmatch(r"a: admitted by lru_idle \(peak gpu0 4\.\d GiB\)", admitted_a)
    assert admitted_b.startswith("b: admitted by lru_idle after evicting a (peak gpu0 ")
    assert line(caplog, "b", "planned").kv_tokens == line(caplog, "b", "ready").kv_tokens
    loading = line(caplog, "a", "loading")
    assert loading.engine == "vllm" and isinstance(loading.pid, int)
    assert loading.getMessage().startswith(f"a: loading: vllm engine, pid {loading.pid}, port ")
    ready = line(caplog, "a", "ready")
    assert re.fullmatch(r"a: ready in \d+\.\d s \(lessor \d+ ms, engine \d+\.\d s, measuring \d+ ms, noticing readiness "
                        r"\d+ ms\): kv \d+ tokens; holds gpu0 [\d.]+ GiB", ready.getMessage())
    assert ready.seconds >= 0 and ready.pid == loading.pid
    evicted = line(caplog, "a", "evicted")
    assert "b" in evicted.reason and evicted.getMessage().startswith("a: evicted (")
    unloaded = line(caplog, "a", "unloaded")
    assert unloaded.freed_bytes["gpu0"] >= 4 * GiB and " freed gpu0 " in unloaded.getMessage()
    assert line(caplog, "b", "unloaded").getMessage().startswith("b: unloaded (unload requested): freed gpu0 ")


async def test_adopting_the_previous_lessords_engine_is_info_not_a_warning(tmp_path, caplog):
    path = config_file(tmp_path, [big_standin("a", tmp_path)])
    with running_lessord(path) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("a")[0] == 200
        pid = admin.model("a")["pid"]
        kill_9(proc)  # lessord crashes; its engine keeps running
    with caplog.at_level(logging.INFO, logger="lessor"):
        async with runtime(load_config(path)) as controller:
            assert controller.model("a")["state"] == "ready"
            await controller.unload("a")
    assert steps(caplog) == [("a", "adopted", "INFO"), ("a", "unloaded", "INFO")]
    assert line(caplog, "a", "adopted").getMessage() == f"a: adopted (pid {pid}, from the previous lessord)"
    assert serious(caplog) == []
    assert process_identity(pid) is None


async def test_a_crash_warns_with_the_restart_to_come_and_giving_up_is_an_error(tmp_path, caplog):
    spec = big_standin("a", tmp_path, restart={"policy": "on-failure", "backoff": 0.01, "max_restarts": 1})
    config = load_config(config_file(tmp_path, [spec]))
    with caplog.at_level(logging.INFO, logger="lessor"):
        async with runtime(config) as controller:
            await controller.load("a")
            first = controller.model("a")["pid"]
            os.kill(first, signal.SIGKILL)
            # Not the first engine, nor none: while its exit is handled the model still reads ready.
            await until(lambda: controller.model("a")["state"] == "ready"
                        and controller.model("a")["pid"] not in (first, None), "lessor's restart")
            os.kill(controller.model("a")["pid"], signal.SIGKILL)
            await until(lambda: controller.supervisor.restarts("a") == 2 and controller.model("a")["state"] == "failed",
                        "the second crash")
            await controller.supervisor.settled()
    crashes = [(s, level) for model, s, level in steps(caplog) if s in ("crashed", "gave_up")]
    assert crashes == [("crashed", "WARNING"), ("gave_up", "ERROR")]
    crashed = line(caplog, "a", "crashed").getMessage()
    assert "exited with signal SIGKILL while serving" in crashed
    assert re.search(r"; restarting in 0\.01 s \(restart 1 of 1 within 600 s\)$", crashed), crashed
    gave_up = line(caplog, "a", "gave_up").getMessage()
    assert "more than restart.max_restarts 1" in gave_up and "`lessor load a` or a config reload tries again" in gave_up
    # Between the two crashes, the restart's own load is routine: INFO lines of its steps.
    assert [s for model, s, level in steps(caplog) if level == "INFO"].count("ready") == 2


# -- formats ----------------------------------------------------------------------------------

def test_json_lines_parse_and_carry_the_fields_the_extras_and_a_traceback_in_one_field():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lessor.test_json")
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.DEBUG
    try:
        logger.info("%s: ready in %.1f s", "qwen", 3.25, extra={"model": "qwen", "step": "ready", "seconds": 3.25})
        logger.warning("two\nlines stay one", extra={"device": "gpu0", "freed_bytes": {"gpu0": GiB}})
        try:
            raise ValueError("broken on purpose")
        except ValueError:
            logger.exception("model %s: a check failed", "qwen")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, "one line per record, the traceback and the newline included"
    ready, two, failed = (json.loads(text) for text in lines)
    for record in (ready, two, failed):
        assert set(record) >= {"ts", "level", "logger", "msg"} and record["logger"] == "lessor.test_json"
        ts = datetime.fromisoformat(record["ts"])
        assert ts.utcoffset() == timezone.utc.utcoffset(None)
    assert ready == {**ready, "level": "INFO", "msg": "qwen: ready in 3.2 s", "model": "qwen", "step": "ready",
                     "seconds": 3.25}
    assert two["msg"] == "two\nlines stay one" and two["device"] == "gpu0" and two["freed_bytes"] == {"gpu0": GiB}
    assert failed["level"] == "ERROR" and failed["msg"] == "model qwen: a check failed"
    assert failed["exc"].startswith("Traceback") and "ValueError: broken on purpose" in failed["exc"]
    assert "exc" not in ready and "exc_info" not in failed and "args" not in ready


def test_under_journald_plain_lines_have_no_timestamp_and_a_syslog_priority(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as stream:
        stat = os.fstat(stream.fileno())
        record = logging.LogRecord("lessor.supervisor", logging.WARNING, __file__, 1, "a: crashed", None, None)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not under_journald(stream)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING lessor.supervisor a: crashed$",
                        formatter_for("plain", stream).format(record))
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")  # another stream's: inherited
        assert not under_journald(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert under_journald(stream)
        assert formatter_for("plain", stream).format(record) == "<4>WARNING lessor.supervisor a: crashed"
        assert isinstance(formatter_for("json", stream), JsonFormatter), "json stays json under journald"


def test_the_log_format_comes_from_the_flag_or_the_environment_and_a_bad_one_is_named(monkeypatch, capsys):
    monkeypatch.delenv("LESSOR_LOG_FORMAT", raising=False)
    monkeypatch.delenv("LESSOR_LOG_LEVEL", raising=False)
    args = parse_args(["--config", "x.yaml"])
    assert (args.log_format, args.log_level) == ("plain", "WARNING"), "quiet by default"
    assert parse_args(["--config", "x.yaml", "--log-format", "json"]).log_format == "json"
    monkeypatch.setenv("LESSOR_LOG_FORMAT", "json")
    assert parse_args(["--config", "x.yaml"]).log_format == "json"
    monkeypatch.setenv("LESSOR_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", "x.yaml"])
    assert info.value.code == 2 and "$LESSOR_LOG_FORMAT is 'xml': use one of plain, json" in capsys.readouterr().err


def test_configure_logging_replaces_the_handlers_it_finds(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging("INFO", "json", out)
        configure_logging("INFO", "json", out)
        assert [h.stream for h in root.handlers] == [out]
        logging.getLogger("lessor.test").info("once")
        assert [json.loads(text)["msg"] for text in out.getvalue().splitlines()] == ["once"]
    finally:
        root.handlers[:], root.level = saved


def test_lessord_log_format_json_end_to_end(tmp_path):
    config = config_file(tmp_path, [standin_spec("a", tmp_path)])
    argv = [sys.executable, "-m", "lessor.api.service", "--config", str(config), "--sim", "--log-format", "json",
            "--log-level", "INFO", "--admin-listen", f"127.0.0.1:{free_port()}",
            "--router-listen", f"127.0.0.1:{free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "LESSOR_LOG_FORMAT")}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    guard = threading.Timer(HANG_S, proc.kill)  # only turns a hang into a failure
    guard.start()
    try:
        seen = []
        for text in proc.stderr:  # wait on its output: the line that says it serves
            seen.append(json.loads(text))
            if seen[-1]["msg"].startswith("serving: "):
                break
        assert seen and seen[-1]["msg"].startswith("serving: "), seen
        proc.send_signal(signal.SIGTERM)
        seen += [json.loads(text) for text in proc.stderr]
        assert proc.wait() == 0
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all({"ts", "level", "logger", "msg"} <= set(record) for record in seen)
    assert any(record["msg"].startswith("lessord stopping") for record in seen)


# -- in words, and short ----------------------------------------------------------------------

def test_a_log_lines_lists_are_words_not_python_reprs():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging("INFO", "plain", out)
        logging.getLogger("lessor.test").info("adopted %s, stopped %s, added %s, kv %s, %d stray(s), %s", ["qwen-coder"],
                                              [], (), {"gpu0": 3}, 2, "text")
        logging.getLogger("lessor.test").info("%(model)s alone", {"model": "qa"})  # mapping style: left as it is
    finally:
        root.handlers[:], root.level = saved
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("lessor.test adopted qwen-coder, stopped none, added none, kv gpu0=3, 2 stray(s), text")
    assert lines[1].endswith("lessor.test qa alone")


def test_an_exits_last_log_lines_leave_out_lessors_argv_line():
    tail = ["# lessor: starting /opt/vllm/bin/vllm serve /models/qa --port 1 --max-model-len 1024", "INFO up",
            "RuntimeError: boom"]
    assert last_lines(tail) == "; last log lines: INFO up | RuntimeError: boom"
    assert last_lines(tail[:1]) == ""


def test_lessords_restart_summary_and_a_crash_are_short_lines_in_words(tmp_path):
    crashing = {**standin_spec("c", tmp_path), "restart": {"policy": "never"}}
    crashing["engine"]["env"]["LESSOR_STANDIN_CRASH_ON_REQUEST"] = "1"
    path = config_file(tmp_path, [standin_spec("a", tmp_path), crashing])
    with running_lessord(path) as (proc, url, _):
        assert Admin(url, tmp_path / "state").load("a")[0] == 200
        kill_9(proc)  # its engine keeps running: the next lessord adopts it
    output = tmp_path / "lessord.out"
    with running_lessord(path, "--log-level", "INFO", output=output) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        events = admin.events()
        assert admin.load("c")[0] == 200
        request = urllib.request.Request(f"{router}/v1/chat/completions", method="POST",
                                         data=json.dumps({"model": "c", "messages": []}).encode())
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=HANG_S)
        while not ((event := events.get(timeout=HANG_S))["type"] == "engine_exited" and event["model"] == "c"):
            pass
    text = output.read_text()
    assert "after restart: adopted a, stopped none, released 0 lease(s), stopped 0 stray(s)" in text, text
    crashed = next(line for line in text.splitlines() if "c: crashed: " in line)
    assert "--served-model-name" not in crashed and "lessor: starting" not in crashed and len(crashed) < 400, crashed
    assert "crashing at the first request" in crashed  # the engine's own last words stay
    assert "--served-model-name" not in event["reason"]


async def test_nvml_unavailable_is_said_once_at_start(tmp_path, caplog, monkeypatch):
    """lessord's start probes the devices twice (check-config's checks, then its runtime) and logged
    `NVML unavailable (...); using simulated devices` at each."""
    from lessor.api.service import check_at_start
    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.devices import probes as devices

    class NoDriver:  # the GPU boundary: NVML without a driver, wherever the test runs
        def __init__(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(devices, "NvmlProbe", NoDriver)
    monkeypatch.setattr(devices, "_said", set(), raising=False)  # this process may have said it for an earlier test
    config = parse_config({"state_dir": str(tmp_path), "devices": {"probe": "auto"}})
    caplog.set_level(logging.INFO, logger="lessor")
    assert check_at_start(config, False, "lessor.yaml")
    async with runtime(config, engines={}):
        pass
    said = [r for r in caplog.records if "NVML unavailable" in r.getMessage() and r.levelno >= logging.INFO]
    assert [r.getMessage() for r in said] == ["NVML unavailable (NVML Shared Library Not Found); using simulated devices"]
