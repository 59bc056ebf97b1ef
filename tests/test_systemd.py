"""lessord under systemd: notify messages on a real socket, SIGHUP reload, the unit file verified."""

import functools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lessor.daemon.notify import Notifier

from .conftest import HANG_S, ROOT, free_port

BIN = Path(sys.executable).parent


def test_notify_reaches_an_abstract_socket():
    name = f"lessor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert Notifier("@" + name).ready("up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    assert Notifier("").send("READY=1") is False


# Only guards against a hang: every wait below ends on an event (a message, an answer, an exit),
# whatever the machine's load.


class NotifySocket:
    """The notify socket as systemd serves it: read all the time, so a sender never finds its
    queue full (net.unix.max_dgram_qlen is 10 by default: 1.5 s of watchdog pings)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: queue.Queue[list[str]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:  # shut down: the test is over (lessord never sends an empty message)
                return
            self.messages.put(data.decode().split("\n"))

    def wait_for(self, field: str, proc: subprocess.Popen, log: Path) -> list[list[str]]:
        """Messages until one carries `field`; the watchdog pings in between are kept too. Fails at
        once, with the daemon's output, if lessord exits before sending it."""
        seen, deadline = [], time.monotonic() + HANG_S
        while True:
            try:
                message = self.messages.get(timeout=0.1)
            except queue.Empty:
                assert proc.poll() is None, f"lessord exited ({proc.returncode}) before {field}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no {field} from lessord; seen: {seen}\n{log.read_text()}"
                continue
            seen.append(message)
            if field in message:
                return seen

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join()


def models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/admin/v1/models", timeout=HANG_S) as r:
        return [m["name"] for m in json.loads(r.read())]


def test_a_watchdog_ping_never_blocks_when_nobody_reads(tmp_path):
    """A full queue drops the ping instead of stalling lessord's event loop until systemd reads."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify.sock"))
        notifier, sent = Notifier(str(tmp_path / "notify.sock")), []
        pinging = threading.Thread(target=lambda: sent.extend(notifier.ping() for _ in range(10_000)), daemon=True)
        pinging.start()
        pinging.join(HANG_S)
        assert not pinging.is_alive(), "a ping blocked on the full queue"
        assert sent[0] and not sent[-1]
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_ready_watchdog_reload_and_stopping_on_a_real_notify_socket(tmp_path):
    config = tmp_path / "lessor.yaml"
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    config.write_text(yaml.safe_dump(data))
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "300000"}
    output = tmp_path / "lessord.log"
    with open(output, "w") as sink:  # a file, not a pipe nobody reads while the test waits
        proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config), "--admin-listen", f"127.0.0.1:{port}",
                                 "--router-listen", f"127.0.0.1:{free_port()}"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    wait_for = functools.partial(notify.wait_for, proc=proc, log=output)
    try:
        assert wait_for("READY=1")
        pings = wait_for("WATCHDOG=1") + wait_for("WATCHDOG=1")
        assert sum(["WATCHDOG=1"] == m for m in pings) >= 2

        # Add a model and SIGHUP: RELOADING=1, then READY=1; the new model is there, the old one too.
        extra = {**data["models"][0], "name": "r1-small", "aliases": [], "priority": 10}
        config.write_text(yaml.safe_dump({**data, "models": data["models"] + [extra]}))
        proc.send_signal(signal.SIGHUP)
        seen = wait_for("READY=1")
        assert any(m[0] == "RELOADING=1" and m[1].startswith("MONOTONIC_USEC=") for m in seen)
        assert models(url) == ["deepseek-r1", "r1-small"]

        # A bad config is refused whole: the running one stays.
        config.write_text("policy: {name: fifo}\n")
        proc.send_signal(signal.SIGHUP)
        assert "STATUS=reload refused: running config kept" in wait_for("READY=1")[-1]
        assert models(url) == ["deepseek-r1", "r1-small"]

        proc.send_signal(signal.SIGTERM)
        assert wait_for("STOPPING=1")
        assert proc.wait(HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert "reload refused" in output.read_text()


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
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=HANG_S)
    problems = [line for line in result.stderr.splitlines() if "lessord.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "StateDirectory=", "ConfigurationDirectory=", "LogsDirectory=", "SupplementaryGroups=video render",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert needed in unit
    assert "\nPrivateDevices=" not in unit and "\nDevicePolicy=" not in unit  # would hide /dev/nvidia* from NVML
