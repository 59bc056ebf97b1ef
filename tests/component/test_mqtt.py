"""MQTT against a real mosquitto broker that the tests start, with a separate subscribing client."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import aiomqtt
import pytest
import yaml

from lessor.daemon.runtime import publishing, runtime
from lessor.daemon.units import GiB
from lessor.engines.process import free_port

from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.mqtt import Broker, collect
from ..support.paths import BIN, ROOT
from ..support.waiting import HANG_S, until


def mqtt_config(tmp_path, broker, **extra):
    return sim_config(tmp_path, [torch_model("a", "4GiB")],
                      mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": "test/lessor", **extra})


async def test_events_and_retained_state_reach_a_separate_subscriber(tmp_path, broker):
    async with runtime(mqtt_config(tmp_path, broker), engines=FakeEngines()) as controller, publishing(controller):
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="watcher") as watcher:
            await watcher.subscribe("test/lessor/#", qos=1)
            await collect(watcher, lambda s: "test/lessor/status" in s and "test/lessor/state/devices/gpu0" in s)
            controller.set_foreign("gpu0", 10 * GiB)
            await controller.load("a")
            seen = await collect(watcher, lambda s: "test/lessor/events/model_state" in s and any(
                json.loads(m.payload)["state"] == "ready" for m in s.get("test/lessor/state/models/a", [])))
        assert json.loads(seen["test/lessor/events/foreign_usage"][0].payload)["foreign_bytes"] == 10 * GiB
        assert "test/lessor/events/lease_granted" in seen and "test/lessor/events/admission" in seen

        # A dashboard that connects late sees the present from retained messages.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="late") as late:
            await late.subscribe("test/lessor/state/#", qos=1)
            await late.subscribe("test/lessor/status", qos=1)
            seen = await collect(late, lambda s: {"test/lessor/status", "test/lessor/state/devices/gpu0",
                                                  "test/lessor/state/models/a"} <= set(s))
        assert seen["test/lessor/status"][0].payload == b"online"
        assert json.loads(seen["test/lessor/state/devices/gpu0"][-1].payload)["foreign_bytes"] == 10 * GiB
        assert json.loads(seen["test/lessor/state/models/a"][-1].payload)["state"] == "ready"
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="after") as after:  # a clean stop says offline
        await after.subscribe("test/lessor/status", qos=1)
        seen = await collect(after, lambda s: "test/lessor/status" in s)
        assert seen["test/lessor/status"][0].payload == b"offline"


async def test_a_broker_outage_never_blocks_and_buffers_up_to_a_bound(tmp_path, broker):
    config = mqtt_config(tmp_path, broker, buffer_size=3, reconnect_max_s=0.5)
    async with runtime(config, engines={}) as controller, publishing(controller) as publisher:
        await publisher.wait_online(HANG_S)
        broker.stop()
        for gib in range(1, 7):  # six events while the broker is gone: publishing is synchronous, it never waits
            controller.set_foreign("gpu0", gib * GiB)
        await until(lambda: publisher.dropped == 3)
        assert publisher.dropped == 3 and publisher.pending == 3
        broker.start()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="watcher") as watcher:
            await watcher.subscribe("test/lessor/state/devices/gpu0", qos=1)
            await collect(watcher, lambda s: any(json.loads(m.payload)["foreign_bytes"] == 6 * GiB
                                                        for m in s.get("test/lessor/state/devices/gpu0", [])))
        assert await publisher.flush(HANG_S)
        assert publisher.published >= 3 and not publisher.pending


def test_last_will_marks_a_killed_daemon_offline(tmp_path, broker):
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data.update(state_dir=str(tmp_path / "state"), mqtt={"url": f"mqtt://127.0.0.1:{broker.port}"})
    config = tmp_path / "lessor.yaml"
    config.write_text(yaml.safe_dump(data))

    async def watch() -> list[bytes]:
        statuses = []
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="watcher") as watcher:
            await watcher.subscribe("lessor/status", qos=1)
            proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config), "--admin-listen",
                                     f"127.0.0.1:{free_port()}", "--router-listen", f"127.0.0.1:{free_port()}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                async def read():
                    async for message in watcher.messages:
                        statuses.append(message.payload)
                        if message.payload == b"online":
                            proc.send_signal(signal.SIGKILL)
                        if message.payload == b"offline" and b"online" in statuses:
                            return
                await asyncio.wait_for(read(), HANG_S)
            finally:
                proc.kill()
                proc.wait()
        return statuses
    statuses = asyncio.run(watch())
    assert statuses[statuses.index(b"online") + 1:] == [b"offline"]


def test_mqtt_config_errors_name_the_field(tmp_path):
    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": {"url": "http://broker", "topic_prefix": "a/#"}})
    paths = {p.path for p in info.value.problems}
    assert paths == {"mqtt.url", "mqtt.topic_prefix"}


async def test_tls_with_a_ca_file_and_credentials(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    # mosquitto started as root reads its files as user mosquitto: pytest's tmp dirs are 0700.
    certs = Path(tempfile.mkdtemp(prefix="lessor-tls-"))
    certs.chmod(0o755)
    cert, key = certs / "cert.pem", certs / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    for made in (cert, key):  # mosquitto drops to its own user when started as root
        os.chmod(made, 0o644)
    broker = Broker(tmp_path)
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                           f"certfile {cert}\nkeyfile {key}\n")
    (tmp_path / "password").write_text("not-needed-by-this-broker\n")
    broker.start()
    try:
        config = mqtt_config(tmp_path, broker)
        mqtt = config.mqtt.model_copy(update={"url": f"mqtts://127.0.0.1:{broker.port}", "ca_file": str(cert),
                                              "username": "lessor", "password_file": str(tmp_path / "password")})
        async with runtime(config.model_copy(update={"mqtt": mqtt}), engines={}) as controller, publishing(controller):
            await controller.mqtt.wait_online(HANG_S)
            controller.set_foreign("gpu0", 9 * GiB)
            assert await controller.mqtt.flush(HANG_S)
            assert controller.mqtt.published >= 1
    finally:
        broker.stop()
        shutil.rmtree(certs, ignore_errors=True)
