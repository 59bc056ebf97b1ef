"""What gpu_validate measures beside lessord: a sampler of each engine's memory (NVML per process
group on a GPU, PSS per process group on the host) every 50 ms, and the foreign process (a torch
process holding memory lessor does not manage, which also times a host-to-device copy).

    python -m bench.gpu_sampling --hold BYTES --device cuda:0   # the foreign process

The foreign process prints one JSON line once it holds its bytes and has timed its copy, then
holds them until its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HANG_S = 600.0  # a guard against hangs only: nothing in a run comes near it
COPY_BYTES = 1 << 30


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic()
    engines: dict[str, int]  # model name -> bytes of its engine's process group
    foreign: int
    device_used: int  # GPU: NVML's used; host: the engines' and the foreign process's PSS


class Sampler(threading.Thread):
    """Samples every `period_s` until stopped; `wait_samples` lets the caller wait on the next ones."""

    def __init__(self, lessord_pid: int, foreign_pid: int, gpu_index: int | None, period_s: float = 0.05) -> None:
        super().__init__(daemon=True, name="sampler")
        self.samples: list[Sample] = []
        self._lessord, self._foreign, self._period = psutil.Process(lessord_pid), foreign_pid, period_s
        self._names: dict[int, str | None] = {}
        self._halt, self._cond = threading.Event(), threading.Condition()
        self._nvml = _Nvml(gpu_index) if gpu_index is not None else None

    def run(self) -> None:
        while not self._halt.wait(self._period):
            sample = self._take()
            with self._cond:
                self.samples.append(sample)
                self._cond.notify_all()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def wait_samples(self, count: int) -> list[Sample]:
        """The next `count` samples, once taken (the steady value after a load)."""
        with self._cond:
            start = len(self.samples)
            if not self._cond.wait_for(lambda: len(self.samples) >= start + count, HANG_S):
                raise TimeoutError(f"the sampler took no {count} samples in {HANG_S:g} s")
            return self.samples[start:start + count]

    def between(self, t0: float, t1: float) -> list[Sample]:
        with self._cond:
            return [s for s in self.samples if t0 <= s.t <= t1]

    def _groups(self) -> dict[int, str]:
        """Engine process groups (each engine leads its own) -> the model it serves."""
        groups = {}
        for child in self._lessord.children(recursive=True):
            try:
                pgid = os.getpgid(child.pid)
                if pgid not in self._names:
                    self._names[pgid] = _served_name(psutil.Process(pgid).cmdline())
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if name := self._names[pgid]:
                groups[pgid] = name
        return groups

    def _take(self) -> Sample:
        groups = self._groups()
        if self._nvml is not None:
            per_pid, used = self._nvml.read()
        else:
            pids = [p.pid for p in self._lessord.children(recursive=True)] + [self._foreign]
            per_pid = {pid: pss_bytes(pid) for pid in pids}
            used = sum(per_pid.values())
        engines: dict[str, int] = {}
        for pid, nbytes in per_pid.items():
            pgid = _pgid(pid)
            name = groups.get(pgid) if pgid is not None else None
            if name:
                engines[name] = engines.get(name, 0) + nbytes
        return Sample(time.monotonic(), engines, per_pid.get(self._foreign, 0), used)


class _Nvml:
    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> tuple[dict[int, int], int]:
        per_pid: dict[int, int] = {}
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            per_pid[proc.pid] = per_pid.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        return per_pid, int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def _served_name(cmdline: list[str]) -> str | None:
    if "--served-model-name" in cmdline:
        return cmdline[cmdline.index("--served-model-name") + 1]
    return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def pss_bytes(pid: int) -> int:
    """The anonymous part of the proportional set size (Pss_Anon + SwapPss): what the process holds
    itself, as a GPU engine holds its device memory. Shared libraries (torch's are hundreds of MB)
    and the mapped safetensors file are page cache, which the card's counterpart does not have."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Pss_Anon:", "SwapPss:")):
                total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return total


def steady(samples: list[Sample], name: str) -> int:
    return int(statistics.median(s.engines.get(name, 0) for s in samples)) if samples else 0


# -- the foreign process ------------------------------------------------------------------------

def hold(nbytes: int, device: str):
    """`nbytes` really resident on `device` (written, so neither the driver nor the kernel defers them)."""
    import torch

    held = torch.empty(nbytes, dtype=torch.uint8, device=device)
    held.fill_(1)
    return held


def copy_bandwidth(device: str, nbytes: int = COPY_BYTES, repeats: int = 3) -> float:
    """Bytes per second of the best of `repeats` copies: pinned host memory to the card, or one
    host buffer to another on the CPU (what a CPU engine's load moves)."""
    import torch

    cuda = device.startswith("cuda")
    source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del source, target
    if cuda:
        torch.cuda.empty_cache()  # the copy's buffers are not part of what it holds
    return nbytes / best


def foreign_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=int, required=True, help="bytes to hold")
    parser.add_argument("--device", default="cpu", help="cuda:N or cpu")
    parser.add_argument("--copy-bytes", type=int, default=COPY_BYTES, help="size of the timed copy")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth(args.device, args.copy_bytes)
    held = hold(args.hold, args.device)
    print(json.dumps({"held_bytes": held.numel(), "bandwidth_bytes_per_s": bandwidth, "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # until the validator closes it (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(foreign_main())
