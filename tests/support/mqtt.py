"""A real mosquitto on a free loopback port (`Broker`; skipped when it is not installed, failed
under LESSOR_REQUIRE_MOSQUITTO), and `collect`, which reads an MQTT client's messages by topic."""

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from lessor.engines.process import free_port

from .waiting import HANG_S


class Broker:
    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if binary is None:
            reason = "mosquitto is not installed (apt-get install mosquitto; .ci/run does)"
            if os.environ.get("LESSOR_REQUIRE_MOSQUITTO"):
                pytest.fail(reason)
            pytest.skip(reason)
        self.binary, self.port, self.conf = binary, free_port(), tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + HANG_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read()
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(HANG_S)


async def collect(client: aiomqtt.Client, until, timeout_s: float = HANG_S) -> dict[str, list]:
    """Messages by topic until `until(messages)` holds."""
    seen: dict[str, list] = {}

    async def read():
        async for message in client.messages:
            seen.setdefault(str(message.topic), []).append(message)
            if until(seen):
                return
    await asyncio.wait_for(read(), timeout_s)
    return seen
