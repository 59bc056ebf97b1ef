"""The budget of every pool: capacity − headroom − usage of processes lessor does not manage −
granted leases. Pure arithmetic over one probe reading and the leases; owns no state."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from ...policies import DeviceBudget
from ..config.schema import DevicesConfig
from .probes import DeviceReading


def device_budget(reading: DeviceReading, config: DevicesConfig, leased_bytes: int,
                  managed_pids: Collection[int]) -> DeviceBudget:
    if reading.is_gpu:
        settings = config.settings_for(reading.index)
        cap, headroom = settings.capacity, config.headroom if settings.headroom is None else settings.headroom
    else:
        cap, headroom = config.host.capacity, config.host.headroom
    managed = sum(b for pid, b in reading.processes.items() if pid in managed_pids)
    return DeviceBudget(
        device=reading.device,
        total_bytes=reading.total_bytes,
        capacity_bytes=reading.total_bytes if cap is None else min(cap, reading.total_bytes),
        headroom_bytes=headroom,
        foreign_bytes=max(0, reading.used_bytes - managed),
        leased_bytes=leased_bytes,
    )


def budgets(readings: Iterable[DeviceReading], config: DevicesConfig, leased: dict[str, int],
            managed_pids: Collection[int]) -> dict[str, DeviceBudget]:
    out = {}
    for reading in readings:
        if reading.device == "host" and not config.host.enabled:
            continue
        out[reading.device] = device_budget(reading, config, leased.get(reading.device, 0), managed_pids)
    return out
