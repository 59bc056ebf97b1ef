"""The simulated world: hardware, models and what a run measures. Plain data, and the one rule
the baselines size themselves by (their steady estimate)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.config.schema import SimulatedGpu
from lessor.daemon.devices.probes import gpu_id
from lessor.daemon.leases import LeaseKind, LeaseWant

GiB = 1 << 30


@dataclass(frozen=True)
class SimModel:
    spec: ModelSpec
    prefill_tps: float  # prompt tokens per second
    decode_tps: float  # output tokens per second, per sequence
    context_tokens: int  # KV tokens one sequence may hold: concurrency = KV tokens / this
    max_batch: int  # sequences at once, at most
    baseline_kv_tokens: int  # the fixed KV cache the peak-unaware baselines reserve


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[SimulatedGpu, ...]
    headroom: int = 1 * GiB
    host_total: int = 512 * GiB
    host_headroom: int = 8 * GiB
    page_cache_gbps: float = 25.0  # PCIe Gen4 x16 from the page cache
    disk_gbps: float = 3.0  # a model's first load in the run comes from disk (NVMe)
    engine_start_s: float = 2.0  # process start, CUDA context, warm-up: paid by every load


@dataclass
class Result:
    strategy: str
    requests: int
    slo_ttft_s: np.ndarray  # each request's goal (its model's)
    ttft: np.ndarray  # seconds; NaN for a request never served
    loads: int = 0
    evictions: int = 0
    keep_alive_unloads: int = 0
    ooms: int = 0
    ooms_avoided: int = 0
    refused: int = 0  # requests answered with an error at once (no room, not in the static set)
    failed_loads: int = 0  # requests whose load crashed under them
    timed_out: int = 0
    vram_util: float = 0.0  # time-mean of leased bytes / total bytes, over the GPUs
    mean_loaded: float = 0.0  # time-mean of models loaded
    sim_seconds: float = 0.0
    wall_s: float = 0.0
    by_model: dict[str, float] = field(default_factory=dict)  # SLO attainment per model
    longest_wait_s: float = 0.0  # the longest a request waited for its start or its answer (an error)

    @property
    def worst_model(self) -> tuple[str, float]:
        """The model whose requests met their goal least often, and that share."""
        asked = {m: v for m, v in self.by_model.items() if not math.isnan(v)}
        return min(asked.items(), key=lambda kv: kv[1]) if asked else ("-", math.nan)

    @property
    def served(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.ttft)))

    @property
    def slo_attainment(self) -> float:
        return float(np.count_nonzero(self.ttft <= self.slo_ttft_s)) / self.requests

    def ttft_percentile(self, q: float) -> float:
        served = self.ttft[~np.isnan(self.ttft)]
        return float(np.percentile(served, q)) if len(served) else math.nan


def baseline_leases(model: SimModel) -> tuple[LeaseWant, ...]:
    """What a peak-unaware scheduler reserves: weights + its fixed KV cache + workspace, at once."""
    memory = model.spec.profile()
    devices = [gpu_id(i) for i in model.spec.placement.devices]
    n = len(devices)
    wants = [LeaseWant(d, LeaseKind.WEIGHTS, -(-memory.weights // n)) for d in devices]
    wants += [LeaseWant(d, LeaseKind.KV, -(-model.baseline_kv_tokens * memory.kv_bytes_per_token // n)) for d in devices]
    wants += [LeaseWant(d, LeaseKind.RESERVE, memory.activation) for d in devices if memory.activation]
    if memory.host_weights:
        wants.append(LeaseWant("host", LeaseKind.WEIGHTS, memory.host_weights))
    return tuple(wants)


def lease_sums(wants) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in wants:
        out[w.device] = out.get(w.device, 0) + w.bytes
    return out
