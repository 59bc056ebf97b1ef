"""lessord under systemd: notify messages on a real socket, SIGHUP reload, the unit file verified."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import json
from pathlib import Path

import pytest
import yaml

from lessor.daemon.notify import Notifier

from .conftest import ROOT, free_port

BIN = Path(sys.executable).parent


def test_notify_reaches_an_abstract_socket():
    name = f"lessor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert Notifier("@" + name).ready("up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    assert Notifier("").send("READY=1") is False


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)

    def wait_for(self, field: str) -> list[str]:
        """Messages until one carries `field`; the watchdog pings in between are kept too."""
        seen = []
        while True:
            message = self.sock.recv(4096).decode().split("\n")
            seen.append(message)
            if field in message:
                return seen


def models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/admin/v1/models", timeout=5) as r:
        return [m["name"] for m in json.loads(r.read())]


def test_ready_watchdog_reload_and_stopping_on_a_real_notify_socket(tmp_path):
    config = tmp_path / "lessor.yaml"
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    config.write_text(yaml.safe_dump(data))
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "300000"}
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config), "--admin-listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert notify.wait_for("READY=1")
        pings = notify.wait_for("WATCHDOG=1") + notify.wait_for("WATCHDOG=1")
        assert sum(["WATCHDOG=1"] == m for m in pings) >= 2

        # Add a model and SIGHUP: RELOADING=1, then READY=1; the new model is there, the old one too.
        extra = {**data["models"][0], "name": "r1-small", "aliases": [], "priority": 10}
        config.write_text(yaml.safe_dump({**data, "models": data["models"] + [extra]}))
        proc.send_signal(signal.SIGHUP)
        seen = notify.wait_for("READY=1")
        assert any(m[0] == "RELOADING=1" and m[1].startswith("MONOTONIC_USEC=") for m in seen)
        assert models(url) == ["deepseek-r1", "r1-small"]

        # A bad config is refused whole: the running one stays.
        config.write_text("policy: {name: fifo}\n")
        proc.send_signal(signal.SIGHUP)
        assert "STATUS=reload refused: running config kept" in notify.wait_for("READY=1")[-1]
        assert models(url) == ["deepseek-r1", "r1-small"]

        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.sock.close()
    assert "reload refused" in proc.stderr.read()


def test_a_listen_change_needs_a_restart(tmp_path):
    import asyncio

    from lessor.daemon.config import parse_config
    from lessor.daemon.errors import InvalidRequest
    from lessor.daemon.runtime import runtime

    base = {"state_dir": str(tmp_path), "devices": {"probe": "sim"}}

    async def run():
        async with runtime(parse_config(base), engines={}) as controller:
            with pytest.raises(InvalidRequest, match="admin.*need a restart"):
                await controller.reload(parse_config({**base, "admin": {"listen": "127.0.0.1:9999"}}))
            change = await controller.reload(parse_config({**base, "policy": {"name": "fit"}}))
            assert change.added == () and controller.config.policy.name == "fit"
    asyncio.run(run())


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "lessord.service").read_text()
    unit = unit.replace("/usr/local/bin/lessord", str(BIN / "lessord"))  # verify checks the binary exists
    path = tmp_path / "lessord.service"
    path.write_text(unit)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "lessord.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "StateDirectory=", "ConfigurationDirectory=", "LogsDirectory=", "SupplementaryGroups=video render",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert needed in unit
    assert "\nPrivateDevices=" not in unit and "\nDevicePolicy=" not in unit  # would hide /dev/nvidia* from NVML
