"""Device usage over the last hour, from lessord's own readings (the dashboard's chart).

Owns a bounded ring of samples: per device what the leases held, what processes lessor does not
manage used (foreign), what its engines used (the probe's figure for their processes), and what
was left to lease. A sample every `interval_s`, and one soon after each lease or foreign-usage
change, so a load shows as the step it was. Samples older than the window go; changes closer
together than `min_gap_s` share one sample (the newer figures), so the ring never holds more than
window / min_gap + 1 of them however busy the daemon is. Reads devices through a callable (the
controller's), owns nothing else.

The ring runs on the monotonic clock: a step of the wall clock (NTP, an operator's `date -s`) neither
makes new samples overwrite the last one (a step back) nor drops the hour (a step forward). Wall
time is for display only: each sample's `at_s` in `to_dict` is the wall clock now less its age.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..events import Event, ForeignUsageChanged, LeaseGranted, LeaseReleased, LeaseResized, MemoryLingering

log = logging.getLogger("lessor.history")

WINDOW_S = 3600.0
INTERVAL_S = 10.0
MIN_GAP_S = 1.0
# The facts that change a device's figures at once (engines' own usage drifts: the interval has it).
CHANGES = (LeaseGranted, LeaseReleased, LeaseResized, ForeignUsageChanged, MemoryLingering)


@dataclass(frozen=True)
class DeviceUsage:
    capacity_bytes: int
    headroom_bytes: int
    leased_bytes: int
    foreign_bytes: int
    engines_bytes: int  # what the probe measured of lessor's engines (0 where it cannot tell)
    free_bytes: int

    @classmethod
    def of(cls, device: Mapping[str, Any]) -> DeviceUsage:
        """From one of the controller's device dicts: engines are what is used and not foreign."""
        return cls(device["capacity_bytes"], device["headroom_bytes"], device["leased_bytes"], device["foreign_bytes"],
                   max(0, device["used_bytes"] - device["foreign_bytes"]), device["free_bytes"])


@dataclass(frozen=True)
class UsageSample:
    at_s: float  # the ordering clock's seconds (monotonic in lessord; to_dict shows wall time)
    devices: Mapping[str, DeviceUsage]

    def to_dict(self, shown_at_s: float | None = None) -> dict[str, Any]:
        return {"at_s": self.at_s if shown_at_s is None else shown_at_s,
                "devices": {d: asdict(u) for d, u in self.devices.items()}}


class UsageHistory:
    def __init__(self, read: Callable[[], Sequence[Mapping[str, Any]]], clock: Callable[[], float] = time.monotonic,
                 window_s: float = WINDOW_S, interval_s: float = INTERVAL_S, min_gap_s: float = MIN_GAP_S,
                 wall: Callable[[], float] | None = None) -> None:
        # `clock` orders and ages the samples; `wall` only shows them. A test's one injected clock is both.
        self._read, self._clock = read, clock
        self._wall = wall or (time.time if clock is time.monotonic else clock)
        self.window_s, self.interval_s, self.min_gap_s = window_s, interval_s, min_gap_s
        self._samples: deque[UsageSample] = deque(maxlen=int(window_s / min_gap_s) + 1)
        self._changed = asyncio.Event()

    def sample(self) -> UsageSample:
        """Read the devices now and keep the figures; returns the sample kept."""
        now = self._clock()
        taken = UsageSample(now, {d["id"]: DeviceUsage.of(d) for d in self._read()})
        if self._samples and now - self._samples[-1].at_s < self.min_gap_s:
            self._samples[-1] = taken  # later than the one it replaces: the gap to the one before only grows
        else:
            self._samples.append(taken)
        while self._samples and self._samples[0].at_s < now - self.window_s:
            self._samples.popleft()
        return taken

    def samples(self) -> list[UsageSample]:
        return list(self._samples)

    def on_event(self, event: Event) -> None:
        """A bus listener (called in publish: it only flags, the loop reads the devices)."""
        if isinstance(event, CHANGES):
            self._changed.set()

    def to_dict(self) -> dict[str, Any]:
        now, wall_now = self._clock(), self._wall()
        return {"window_s": self.window_s, "interval_s": self.interval_s, "now_s": wall_now,
                "samples": [s.to_dict(wall_now - (now - s.at_s)) for s in self._samples]}

    async def run(self) -> None:
        """lessord's background task: a sample now, then at each change or every `interval_s`."""
        while True:
            self._changed.clear()
            try:
                self.sample()
            except Exception:  # a failed reading must not end the history; the next round reads again
                log.exception("device usage not sampled")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.interval_s)
            except asyncio.TimeoutError:
                pass
