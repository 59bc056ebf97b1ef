"""A model's memory profile: its engine's memory model (`footprint`), with every number the
config sets (`memory.*`) taken as given, resolved per device into what the planner leases.

The engine's module says what its process holds (lessor.memory.footprint); this module only
merges that with the config and keeps each number's source for `lessor plan`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ...engines.base import EngineArgsBase
from ...memory.architecture import Architecture
from ...memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from ..config.fields import MemorySize, NonzeroMemorySize
from ..units import SIZE_PATTERN, MiB, format_bytes, parse_size

if TYPE_CHECKING:
    from ..ledger.fingerprints import DeviceMeasurement, Fingerprint

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0},
               {"type": "string", "pattern": SIZE_PATTERN, "examples": ["8GiB", "512MiB", "8GB"]}]})]

WeightFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8", "awq", "gptq", "marlin", "q4_k_m", "q8_0", "q4_0", "q6_k"]
KvDtype = Literal["fp32", "bf16", "fp16", "fp8"]


class MemoryProfile(BaseModel):
    """What a model needs, in bytes. Computed from `architecture` when given; any field set here wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: NonzeroMemorySize | None = Field(default=None, description="Weight bytes on the GPU(s), split evenly over the placement's devices.")
    host_weights: MemorySize | None = Field(default=None, description="Weight bytes in host RAM (hybrid engines).")
    kv_bytes_per_token: int | None = Field(default=None, gt=0, le=1 << 24, description="KV-cache bytes per token (all layers), split evenly over the placement's devices.")
    activation: MemorySize | None = Field(default=None, description="Steady workspace per device beyond weights and KV (activations, CUDA context and graphs, communication buffers).")
    load_peak: MemorySize | None = Field(default=None, description="Transient bytes per device above what the load holds at its worst moment (e.g. a tensor dequantized on the GPU).")


@dataclass(frozen=True)
class DeviceMemory:
    """One device of the placement, as the planner leases it."""

    weights: int
    workspace: int  # steady bytes beside the KV cache (the reserve lease), fixed part
    kv_rate: float  # bytes per planned KV token: the cache and what grows with it (one kv lease)
    load_peak: int
    cache_rate: float = 0.0  # bytes per token of the KV cache itself (the engine's KV flag)


@dataclass(frozen=True)
class Memory:
    """The resolved profile the planner works with: per device, and each component's source."""

    devices: tuple[DeviceMemory, ...]
    host_weights: int
    components: tuple[tuple[Component, ...], ...] = ()  # per device, for `lessor plan`
    host: tuple[Component, ...] = ()
    kv_sources: tuple[tuple[str, str], ...] = ()  # per device: (source, basis) of the KV bytes per token
    notes: tuple[str, ...] = ()

    @property
    def weights(self) -> int:
        return sum(d.weights for d in self.devices)

    @property
    def kv_bytes_per_token(self) -> int:
        """All devices together (each device's share is its `kv_rate`)."""
        return int(sum(d.kv_rate for d in self.devices))

    @property
    def activation(self) -> int:
        return max(d.workspace for d in self.devices)

    @property
    def load_peak(self) -> int:
        return max(d.load_peak for d in self.devices)

    @functools.cached_property
    def estimated(self) -> tuple[str, ...]:
        """Names of the components that are estimates, not formulas or sourced constants."""
        names = [c.name for device in self.components for c in device if c.source == Source.ESTIMATE]
        return tuple(dict.fromkeys(names))

    def sources(self, devices: list[str], host: str = "host") -> list[dict]:
        """Every component of every device (named by `devices`, the placement's) with its source:
        the plan's `memory` section."""
        out = []
        for index, (components, (kv_source, kv_basis)) in enumerate(zip(self.components, self.kv_sources)):
            out += [{"device": devices[index], **c.to_dict()} for c in components]
            out.append({"device": devices[index], "name": "kv_per_token",
                        "bytes": int(self.devices[index].kv_rate if kv_source == "measured" else self.devices[index].cache_rate),
                        "part": "kv", "source": kv_source, "basis": kv_basis})
        return out + [{"device": host, **c.to_dict()} for c in self.host]


def _given(name: str, value: int, part: Part) -> Component:
    return Component(name, value, Source.GIVEN, f"memory.{name} in the config", part)


def _device(footprint: DeviceFootprint | None, given: MemoryProfile, devices: int) -> tuple[DeviceMemory, tuple, tuple]:
    components = list(footprint.components if footprint else ())
    kv_source = (footprint.kv_source.value, footprint.kv_basis) if footprint else ("given", "")
    kv_rate = footprint.kv_rate if footprint else 0.0
    cache_rate = float(footprint.kv_bytes_per_token) if footprint else 0.0
    for name, part in (("weights", Part.WEIGHTS), ("activation", Part.WORKSPACE), ("load_peak", Part.LOAD_PEAK)):
        value = getattr(given, name)
        if value is not None:  # the config's number replaces every component of that part
            share = -(-value // devices) if name == "weights" else value
            components = [c for c in components if c.part != part] + [_given(name, share, part)]
    if given.kv_bytes_per_token is not None:
        kv_rate = cache_rate = given.kv_bytes_per_token / devices
        kv_source = ("given", "memory.kv_bytes_per_token in the config")
        components = [replace(c, per_kv_token=0.0) for c in components]
    fixed = {part: sum(c.bytes for c in components if c.part == part) for part in Part}
    return (DeviceMemory(fixed[Part.WEIGHTS], fixed[Part.WORKSPACE], kv_rate, fixed[Part.LOAD_PEAK], cache_rate),
            tuple(components), kv_source)


def resolve(given: MemoryProfile, architecture: Architecture | None, weight_format: str, kv_dtype: str,
            experts_on_cpu: bool, engine: EngineArgsBase, devices: int, plan_batch: int) -> Memory:
    """The engine's memory model for these arguments, with every field `given` sets taken as
    given; `plan_batch` counts where the engine's arguments leave the batch open."""
    footprint: Footprint | None = None
    if architecture is not None:
        footprint = engine.footprint(ModelShape(architecture, weight_format, kv_dtype, experts_on_cpu, devices,
                                                plan_batch))
    per_device = [_device(footprint.devices[i] if footprint else None, given, devices) for i in range(devices)]
    host = footprint.host if footprint else ()
    if given.host_weights is not None:
        host = (_given("host_weights", given.host_weights, Part.WEIGHTS),)
    return Memory(tuple(d for d, _, _ in per_device), sum(c.bytes for c in host), tuple(c for _, c, _ in per_device),
                  host, tuple(k for _, _, k in per_device), footprint.notes if footprint else ())


def verify_tolerance(leased_bytes: int) -> int:
    """How far above its leases an engine may measure (step 5, and the reconciler after): allocator
    rounding and the CUDA context's growth, not a second KV cache."""
    return max(128 * MiB, leased_bytes // 20)


def over_leases(used_bytes: int, leased_bytes: int) -> bool:
    return used_bytes > leased_bytes + verify_tolerance(leased_bytes)


def _grown(value: float, margin: float) -> int:
    return int(-(-value * (1 + margin) // 1))


def measured_figures(predicted: DeviceMemory, m: DeviceMeasurement, outcome: str) -> dict[str, float]:
    """What one device's samples say of the figures each lease is planned from (absent: they
    cannot tell it). Totals per phase, never parts: a GPU's reading of the weights phase holds the
    CUDA context too, which the model counts in the workspace, so raising the weights from it would
    count the context twice. What a phase held beyond the model goes to the lease held then:

    - while loading (two-phase: weights + load_peak leased): the load peak;
    - at ready (weights + kv + reserve): the workspace, after the KV cache, whose rate is measured
      where the engine allocated it apart (what the "kv" step added);
    - a load that died of out-of-memory needed more than it reached: at least that plus the
      tolerance, on the lease of the phase it died in (one-phase: every lease at once)."""
    out: dict[str, float] = {}
    if m.kv_bytes is not None and m.kv_tokens:
        out["kv_rate"] = m.kv_bytes / m.kv_tokens
    kv = max(m.kv_bytes or 0, int(m.kv_tokens * predicted.kv_rate))  # what the next plan holds for those tokens
    if outcome == "oom":
        reached = max(m.peak_bytes, m.leased_bytes) + verify_tolerance(m.leased_bytes)
        if m.two_phase and not m.kv_tokens:  # it died loading its weights: the load peak was short
            out["load_peak"] = max(0, reached - predicted.weights)
        else:  # a one-phase engine held its load peak beside the rest
            held_peak = 0 if m.two_phase else predicted.load_peak
            out["workspace"] = max(0, reached - predicted.weights - kv - held_peak)
        return out
    if m.steady_bytes:
        out["workspace"] = max(0, m.steady_bytes - predicted.weights - kv)
    if m.two_phase:
        out["load_peak"] = max(0, m.loading_peak_bytes - predicted.weights)
    else:  # the peak above what it holds once ready
        out["load_peak"] = max(0, m.peak_bytes - m.steady_bytes)
    return out


def with_measured(memory: Memory, fingerprint: Fingerprint, margin: float) -> Memory:
    """The profile with the measured figures where they are above the predicted ones, plus the
    margin (measurement noise: a figure measured at or below the model leaves the model's); a
    figure the measurement raised gets a `measured` component for the difference, saying from what."""
    if len(fingerprint.devices) != len(memory.devices):  # another placement (its key differs): nothing of it fits
        return memory
    devices, components, kv_sources = [], [], []
    for predicted, comps, kv_source, m in zip(memory.devices, memory.components, memory.kv_sources, fingerprint.devices):
        figures = measured_figures(predicted, m, fingerprint.outcome)
        basis = f"fingerprint {fingerprint.digest[:8]} ({fingerprint.outcome}, {fingerprint.when()}, {m.method})"
        changed: dict[str, int] = {}  # workspace, load_peak: whole bytes
        kv_rate, extra = predicted.kv_rate, []
        for name, part in (("workspace", Part.WORKSPACE), ("load_peak", Part.LOAD_PEAK)):
            if name in figures and figures[name] > getattr(predicted, name):
                grown = _grown(figures[name], margin)
                changed[name] = grown
                extra.append(Component(f"{name}_measured", grown - getattr(predicted, name), Source.MEASURED,
                                       f"{basis}: {format_bytes(int(figures[name]))} measured + {margin:.0%}; the "
                                       f"model said {format_bytes(getattr(predicted, name))}", part))
        if "kv_rate" in figures and figures["kv_rate"] > predicted.kv_rate:
            kv_rate = figures["kv_rate"] * (1 + margin)
            kv_source = ("measured", f"{basis}: {figures['kv_rate']:.0f} B/token measured + {margin:.0%}; the model "
                                     f"said {predicted.kv_rate:.0f}")
        devices.append(replace(predicted, kv_rate=kv_rate, **changed))
        components.append(tuple(comps) + tuple(extra))
        kv_sources.append(kv_source)
    return replace(memory, devices=tuple(devices), components=tuple(components), kv_sources=tuple(kv_sources))
