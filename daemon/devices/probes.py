"""Devices and probes: what memory each pool has and who uses it.

Owns reading the hardware (NVML through nvidia-ml-py, host RAM through psutil) and the
simulated devices used where there is no NVIDIA driver. Does not own budgets or leases.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import psutil

from ..config.schema import DevicesConfig, SimulatedGpu
from ..errors import UnknownDevice
from ..units import GiB

log = logging.getLogger("lessor.devices")
HOST = "host"


def gpu_id(index: int) -> str:
    return f"gpu{index}"


@dataclass(frozen=True)
class DeviceReading:
    device: str  # "gpu0", "gpu1", ..., "host"
    index: int  # -1 for the host pool
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int
    processes: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))  # pid -> bytes

    @property
    def is_gpu(self) -> bool:
        return self.index >= 0

    def usage_of(self, leader: int) -> int:
        """Bytes used by an engine: its leader and the rest of its process group (vLLM's and
        SGLang's workers hold the GPU memory in child processes)."""
        return sum(self.processes[pid] for pid in self.group_pids(leader))

    def group_pids(self, leader: int) -> tuple[int, ...]:
        """The processes this reading lists that are the engine `leader` or its process group."""
        return tuple(pid for pid in self.processes if pid == leader or _pgid(pid) == leader)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def group_pss(leader: int) -> int:
    """Proportional set size of a process and its descendants (an engine's workers): what its
    process group holds in RAM, shared pages split between their users."""
    try:
        root = psutil.Process(leader)
        members = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return total


def group_members(readings: Collection[DeviceReading], leaders: Collection[int]) -> set[int]:
    """Processes on a device that belong to a managed engine's process group (each engine leads
    its own): counted as managed, never as foreign. One getpgid per process NVML lists."""
    return {pid for reading in readings for pid in reading.processes
            if pid not in leaders and _pgid(pid) in leaders}


class Probe(Protocol):
    name: str

    def read(self, managed_pids: Collection[int] = ()) -> list[DeviceReading]:
        """Every pool now. Host readings attribute RSS only to `managed_pids` (walking all processes is slow)."""

    def close(self) -> None: ...


def _host_reading(managed_pids: Collection[int], total_override: int | None = None,
                  used_override: int | None = None) -> DeviceReading:
    # A simulated host pool (both figures given) never reads the real RAM: the simulator asks
    # for a budget at every admission, and one /proc/meminfo read costs more than the rest.
    if total_override is not None and used_override is not None:
        total, used = total_override, used_override
    else:
        vm = psutil.virtual_memory()
        total = total_override if total_override is not None else vm.total
        used = used_override if used_override is not None else vm.total - vm.available
    processes = {}
    for pid in managed_pids:
        try:
            processes[pid] = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return DeviceReading(HOST, -1, "host", "host RAM", total, used, MappingProxyType(processes))


class SimProbe:
    """Devices declared in the config. Foreign usage and per-process usage can change at run time
    (tests, the simulator, an operator trying a what-if through the admin API)."""

    name = "sim"

    def __init__(self, gpus: list[SimulatedGpu], host_total_bytes: int | None = None) -> None:
        self._gpus = gpus or [SimulatedGpu(name="Simulated GPU", total=24 * GiB)]
        self._lock = threading.Lock()
        self._foreign = {gpu_id(i): g.foreign for i, g in enumerate(self._gpus)}
        self._processes: dict[str, dict[int, int]] = {gpu_id(i): {} for i in range(len(self._gpus))}
        self._host_total = host_total_bytes

    def read(self, managed_pids: Collection[int] = ()) -> list[DeviceReading]:
        with self._lock:
            readings = [self._gpu_reading(i, g) for i, g in enumerate(self._gpus)]
        host_used = 0 if self._host_total is not None else None
        return readings + [_host_reading(managed_pids, self._host_total, host_used)]

    def _gpu_reading(self, index: int, gpu: SimulatedGpu) -> DeviceReading:
        device = gpu_id(index)
        procs = dict(self._processes[device])
        used = min(gpu.total, self._foreign[device] + sum(procs.values()))
        return DeviceReading(device, index, f"SIM-{index:04d}", gpu.name, gpu.total, used, MappingProxyType(procs))

    def set_foreign(self, device: str, foreign_bytes: int) -> int:
        """Set the bytes used by processes lessor does not manage; returns the previous value."""
        with self._lock:
            if device not in self._foreign:
                raise UnknownDevice(device, sorted(self._foreign))
            previous, self._foreign[device] = self._foreign[device], foreign_bytes
            return previous

    def set_process_usage(self, device: str, pid: int, used_bytes: int) -> None:
        """What a managed engine uses on a simulated device (its own report stands in for NVML)."""
        with self._lock:
            if used_bytes:
                self._processes[device][pid] = used_bytes
            else:
                self._processes[device].pop(pid, None)

    def close(self) -> None:
        pass


class NvmlProbe:
    """Real GPUs through NVML (the `pynvml` module of nvidia-ml-py)."""

    name = "nvml"

    def __init__(self) -> None:
        import pynvml  # imported here so machines without the driver still import lessor

        self._nvml = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        if not self._handles:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPU")

    def read(self, managed_pids: Collection[int] = ()) -> list[DeviceReading]:
        return [self._gpu_reading(i, h) for i, h in enumerate(self._handles)] + [_host_reading(managed_pids)]

    def _gpu_reading(self, index: int, handle) -> DeviceReading:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        processes: dict[int, int] = {}
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            # usedGpuMemory is None where the driver cannot attribute (e.g. some containers).
            processes[proc.pid] = processes.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        uuid, name = nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)
        return DeviceReading(gpu_id(index), index, _text(uuid), _text(name), int(memory.total),
                             int(memory.used), MappingProxyType(processes))

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_probe(config: DevicesConfig, force_sim: bool = False) -> Probe:
    """NVML when asked or when a driver answers (auto); the simulated devices otherwise."""
    if force_sim or config.probe == "sim":
        return SimProbe(config.simulated, config.host.simulated_total)
    try:
        return NvmlProbe()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, no GPU
        if config.probe == "nvml":
            raise RuntimeError(f"devices.probe is 'nvml' but NVML cannot start: {exc}") from exc
        _say_once(f"NVML unavailable ({exc}); using simulated devices")
        return SimProbe(config.simulated, config.host.simulated_total)


_said: set[str] = set()


def _say_once(message: str) -> None:
    """At INFO the first time in this process: lessord's start probes twice (its checks, then its
    runtime) and said it twice; again at DEBUG."""
    log.log(logging.DEBUG if message in _said else logging.INFO, "%s", message)
    _said.add(message)
