"""What an engine uses while it loads, per device, from spawn to ready: a sample every
SAMPLE_INTERVAL_S (20 Hz) and one at each step of the load protocol, so the steps' figures never
depend on the timer. The samples become the load's `DeviceMeasurement`s (daemon/ledger/fingerprints.py).

Per device: NVML's figure for the engine's process group on a GPU (with the engine's own report
when larger); on a simulated GPU the engine's own report (what NVML would say), or else the PSS
of its process group; on the host pool the PSS of its process group.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..devices.probes import HOST, group_pss
from ..devices.usage import UsageMeter
from ..ledger.fingerprints import DeviceMeasurement

log = logging.getLogger("lessor.sampling")

SAMPLE_INTERVAL_S = 0.05


@dataclass
class _Series:
    method: str = "pss"
    peak: int = 0
    loading_peak: int = 0
    at: dict[str, int] = field(default_factory=dict)  # step -> bytes sampled when it was reached


class LoadSampler:
    def __init__(self, meter: UsageMeter, handle, devices: list[str], nvml: bool) -> None:
        self._meter, self._handle, self._nvml = meter, handle, nvml
        self._series = {device: _Series() for device in devices}
        self._weights_in = False
        self.kv_asked = False  # the KV cache was granted and the engine asked to allocate it
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.observed: dict[str, int] = {}  # the last sample as verify and the reconciler measure (no PSS stand-in)

    async def sample(self) -> dict[str, int]:
        """One sample of every device. Where the engine reports a device (even 0: the torch engine
        before its weights), its report is the figure; where it answered without that device, the
        PSS of its processes; while it cannot answer yet (not listening), a simulated device gets
        no sample: the interpreter starting is not the engine's memory."""
        try:
            reported = await asyncio.wait_for(self._handle.measure(), timeout=5)
            answered = True
        except Exception:  # still starting, or busy: the probe still tells on a GPU
            reported, answered = {}, False
        usage = self._meter.observe(self._handle.pid, reported)
        self.observed = usage
        now = {}
        for device, series in self._series.items():
            if device != HOST and (device in reported or self._nvml or usage.get(device)):
                used = usage.get(device, 0)
                series.method = "engine" if reported.get(device, -1) >= used else ("nvml" if self._nvml else "engine")
            elif device == HOST or answered:  # no figure for it: what its processes hold in RAM
                # In a thread: a process that maps hundreds of GB takes a while to walk.
                used, series.method = await asyncio.to_thread(group_pss, self._handle.pid), "pss"
            else:
                continue
            series.peak = max(series.peak, used)
            if not self._weights_in:
                series.loading_peak = max(series.loading_peak, used)
            now[device] = used
        return now

    async def mark(self, step: str) -> dict[str, int]:
        """A step of the load was reached ("weights", "kv", "ready"): sample it now. Returns what
        the engine uses as verify counts it (its report or the probe)."""
        now = await self.sample()
        for device, used in now.items():
            self._series[device].at[step] = used
        if step == "weights":
            self._weights_in = True
        return self.observed

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """End the periodic samples; returns once their task is done. Python before 3.12 can lose
        a cancellation inside wait_for when the awaited report arrives at the same moment
        (gh-86296): the loop would sample forever and this would wait forever, so the cancel is
        repeated and a flag ends the loop at its next turn."""
        self._stopped = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            try:
                await self.sample()
            except Exception:  # one failed sample is not the load's failure
                log.debug("sample failed", exc_info=True)

    def measurements(self, kv_tokens: int, leased: dict[str, int], two_phase: bool) -> tuple[DeviceMeasurement, ...]:
        """What the samples say per device. Two-phase engines tell the weights (at "weights") and
        the KV cache (what "kv" added) apart; one-phase engines only the whole."""
        out = []
        for device, s in self._series.items():
            weights = s.at.get("weights") if two_phase else None
            kv = s.at["kv"] - s.at["weights"] if two_phase and "kv" in s.at and "weights" in s.at else None
            allocated = kv_tokens if (not two_phase or self.kv_asked) else 0
            out.append(DeviceMeasurement(device, s.method, s.peak, s.loading_peak, s.at.get("ready", 0), weights,
                                         max(kv, 0) if kv is not None else None, allocated, leased.get(device, 0),
                                         two_phase))
        return tuple(out)
