"""What an engine uses per device, for verify (step 5) and the reconciler.

The larger of the engine's own report and the probe's figure for its process group. On simulated
GPUs there is no NVML: the engine's report is what NVML would say, so the meter hands it to the
simulated probe (the one place that writes it), and budgets count it like a real reading.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .probes import DeviceReading, Probe, SimProbe


class UsageMeter:
    def __init__(self, probe: Probe | None, readings: Callable[[], Mapping[str, DeviceReading]]) -> None:
        self._sim = probe if isinstance(probe, SimProbe) else None
        self._readings = readings

    def observe(self, pid: int, reported: Mapping[str, int]) -> dict[str, int]:
        """Bytes the engine `pid` uses per device (zeros left out), given what it reported."""
        if self._sim is not None:
            gpus = {d for d, r in self._readings().items() if r.is_gpu}
            for device, used in reported.items():
                if device in gpus:
                    self._sim.set_process_usage(device, pid, used)
        usage = {device: max(reported.get(device, 0), reading.usage_of(pid))
                 for device, reading in self._readings().items()}
        return {device: used for device, used in usage.items() if used}

    def forget(self, pid: int | None) -> None:
        """The engine is gone: its simulated reading goes with it (NVML forgets on its own)."""
        if pid and self._sim is not None:
            for device, reading in self._readings().items():
                if reading.is_gpu:
                    self._sim.set_process_usage(device, pid, 0)
