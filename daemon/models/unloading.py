"""An unload is verified: after an engine stops, the processes of its group must be gone from
its devices' readings within `timeouts.unload_verify_s`. Memory still held then (a zombie, as in
Ollama #9625) is announced and kept in `Lingering` until a later reading no longer shows it.

Its leases are released all the same: what lingers belongs to no managed engine any more, so the
budget already counts it as foreign (used − managed) and no plan hands it out twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ..devices.probes import DeviceReading
from ..events import Event, MemoryLingering
from ..planning.profile import verify_tolerance
from ..units import format_bytes

log = logging.getLogger("lessor.supervisor")

POLL_S = 0.1


@dataclass(frozen=True)
class Held:
    model: str
    device: str
    pids: tuple[int, ...]
    bytes: int


def group_pids(readings: Mapping[str, DeviceReading], leader: int, devices: Collection[str]) -> dict[str, tuple[int, ...]]:
    """Per GPU of `devices`, the pids its reading lists for the engine's process group. Read before
    the engine stops: after, a dead process has no group to ask about."""
    found = {d: r.group_pids(leader) for d, r in readings.items() if r.is_gpu and d in devices}
    return {d: pids for d, pids in found.items() if pids}


def still_held(readings: Mapping[str, DeviceReading], device: str, pids: tuple[int, ...]) -> int:
    reading = readings.get(device)
    return sum(reading.processes.get(pid, 0) for pid in pids) if reading else 0


async def verify_unload(model: str, pids: Mapping[str, tuple[int, ...]],
                        read: Callable[[], Mapping[str, DeviceReading]], timeout_s: float,
                        lingering: Lingering) -> None:
    """Wait (polling the probe) until the engine's processes (`pids` per GPU, from group_pids)
    hold nothing on its GPUs, at most `timeout_s`; what they still hold then is announced and tracked."""
    if not pids:
        return
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        readings = read()
        held = {d: b for d, p in pids.items() if (b := still_held(readings, d, p)) > verify_tolerance(0)}
        if not held or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    for device, nbytes in held.items():
        lingering.add(Held(model, device, pids[device], nbytes))


class Lingering:
    """Memory of stopped engines that their processes still hold, per (model, device)."""

    def __init__(self, publish: Callable[[Event], None]) -> None:
        self._publish = publish
        self._held: dict[tuple[str, str], Held] = {}
        self.unverified = 0  # devices an unload left memory on past the wait, since start

    def add(self, held: Held) -> None:
        self.unverified += 1
        key = (held.model, held.device)
        if key in self._held:  # an earlier engine of the model still holds some too: watch both
            earlier = self._held[key]
            held = Held(held.model, held.device, tuple(dict.fromkeys(earlier.pids + held.pids)), earlier.bytes + held.bytes)
        self._held[key] = held
        log.warning("%s: its stopped engine still holds %s on %s (pids %s); counted as foreign until gone",
                    held.model, format_bytes(held.bytes), held.device, ", ".join(map(str, held.pids)),
                    extra={"model": held.model, "device": held.device, "step": "lingering", "bytes": held.bytes})
        self._publish(MemoryLingering(held.model, held.device, held.bytes, held.pids, False))

    def check(self, readings: Mapping[str, DeviceReading]) -> None:
        """The reconciler's look: what is gone now is said once and forgotten."""
        for key, held in list(self._held.items()):
            now = still_held(readings, held.device, held.pids)
            if now <= verify_tolerance(0):
                del self._held[key]
                log.info("%s: the memory its stopped engine held on %s is back", held.model, held.device,
                         extra={"model": held.model, "device": held.device, "step": "lingering_gone"})
                self._publish(MemoryLingering(held.model, held.device, held.bytes, held.pids, True))
            elif now != held.bytes:
                self._held[key] = Held(held.model, held.device, held.pids, now)

    def bytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for held in self._held.values():
            out[held.device] = out.get(held.device, 0) + held.bytes
        return out
