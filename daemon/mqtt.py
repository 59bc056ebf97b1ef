"""The MQTT publisher: a subscriber of the event bus, like SSE and the metrics.

Every event goes to PREFIX/events/TYPE as JSON; after each batch the present state is published
retained to PREFIX/state/devices/ID and PREFIX/state/models/NAME, so a dashboard that connects
late sees it. PREFIX/status is `online`, retained, with `offline` as the last will. A broker
outage never blocks admission or routing: events wait in a bounded buffer (oldest dropped and
counted) while the publisher reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from .config.schema import MqttConfig
from .events import Event, EventBus

log = logging.getLogger("lessor.mqtt")
State = Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]  # (devices, models)


class MqttPublisher:
    def __init__(self, config: MqttConfig, bus: EventBus, state: State,
                 redact: Callable[[Any], Any] = lambda data: data) -> None:
        self._config, self._bus, self._state = config, bus, state
        self._redact = redact  # a broker's subscribers hold no admin token: secrets in errors are redacted
        self._prefix = config.topic_prefix.rstrip("/")
        self._pending: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._queue = bus.subscribe()
        self.connected = False
        self._online = asyncio.Event()
        self.published = 0
        self.dropped = 0

    def _client(self) -> aiomqtt.Client:
        url = urlsplit(self._config.url)  # the schema's pattern requires its host
        tls = ssl.create_default_context(cafile=self._config.ca_file) if url.scheme == "mqtts" or self._config.ca_file else None
        password = Path(self._config.password_file).read_text().strip() if self._config.password_file else None
        return aiomqtt.Client(
            url.hostname or "", url.port or (8883 if tls else 1883), username=self._config.username, password=password,
            identifier=self._config.client_id or f"lessord-{socket.gethostname()}", tls_context=tls,
            will=aiomqtt.Will(f"{self._prefix}/status", b"offline", qos=1, retain=True), timeout=10)


    @property
    def pending(self) -> int:
        """Events buffered for the broker (at most mqtt.buffer_size)."""
        return len(self._pending)

    async def run(self) -> None:
        pump = asyncio.ensure_future(self._pump())
        backoff = 1.0
        try:
            while True:
                try:
                    async with self._client() as client:
                        self.connected, backoff = True, 1.0
                        log.info("connected to %s", self._config.url)
                        await client.publish(f"{self._prefix}/status", b"online", qos=1, retain=True)
                        await self._drain_forever(client)
                except aiomqtt.MqttError as exc:
                    self.connected = False
                    self._online.clear()
                    log.warning("broker %s unavailable (%s); retrying in %.0f s, %d event(s) waiting",
                                self._config.url, exc, backoff, len(self._pending))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._config.reconnect_max_s)
        finally:
            pump.cancel()
            self._bus.unsubscribe(self._queue)

    async def _pump(self) -> None:
        """Move events from the bus into the bounded buffer, so the bus never waits on the broker."""
        while True:
            event = await self._queue.get()
            if len(self._pending) >= self._config.buffer_size:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(event)
            self._drained.clear()
            self._wake.set()

    async def _drain_forever(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()  # before draining: an event that lands meanwhile wakes the next round
            while self._pending:
                event = self._pending[0]  # removed only once the broker has it: at least once
                await client.publish(f"{self._prefix}/events/{event.type}", json.dumps(self._redact(event.to_dict())).encode(),
                                     qos=1)
                self._pending.popleft()
                self.published += 1
            await self._publish_state(client)
            self._online.set()
            if not self._pending:
                self._drained.set()
            await self._wake.wait()

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        devices, models = self._redact(self._state())
        for device in devices:
            await client.publish(f"{self._prefix}/state/devices/{device['id']}", json.dumps(device).encode(), qos=1, retain=True)
        for model in models:
            await client.publish(f"{self._prefix}/state/models/{model['name']}", json.dumps(model).encode(), qos=1, retain=True)

    async def wait_online(self, timeout_s: float) -> None:
        """Until connected and the present state is published."""
        await asyncio.wait_for(self._online.wait(), timeout_s)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the buffer is published (the last events of a clean stop), at most timeout_s."""
        if not self.connected:
            return not self._pending
        await asyncio.sleep(0)  # let the pump take what the bus has
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def announce_offline(self) -> None:
        """A clean stop says so itself (the last will covers the unclean ones)."""
        if not self.connected:
            return
        try:
            async with self._client() as client:
                await client.publish(f"{self._prefix}/status", b"offline", qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            log.warning("could not announce offline: %s", exc)
