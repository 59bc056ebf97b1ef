"""A model's memory profile: its engine's memory model (`footprint`), with every number the
config sets (`memory.*`) taken as given, resolved per device into what the planner leases.

The engine's module says what its process holds (lessor.memory.footprint); this module only
merges that with the config and keeps each number's source for `lessor plan`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ..engines.base import EngineArgsBase
from ..memory.architecture import Architecture
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from .units import SIZE_PATTERN, MiB, format_bytes, parse_size

if TYPE_CHECKING:
    from .fingerprints import DeviceMeasurement, Fingerprint

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0},
               {"type": "string", "pattern": SIZE_PATTERN, "examples": ["8GiB", "512MiB", "8GB"]}]})]

WeightFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8", "awq", "gptq", "marlin", "q4_k_m", "q8_0", "q4_0", "q6_k"]
KvDtype = Literal["fp32", "bf16", "fp16", "fp8"]


class MemoryProfile(BaseModel):
    """What a model needs, in bytes. Computed from `architecture` when given; any field set here wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: Size | None = Field(default=None, description="Weight bytes on the GPU(s), split evenly over the placement's devices.")
    host_weights: Size | None = Field(default=None, description="Weight bytes in host RAM (hybrid engines).")
    kv_bytes_per_token: int | None = Field(default=None, gt=0, le=1 << 24, description="KV-cache bytes per token (all layers), split evenly over the placement's devices.")
    activation: Size | None = Field(default=None, description="Steady workspace per device beyond weights and KV (activations, CUDA context and graphs, communication buffers).")
    load_peak: Size | None = Field(default=None, description="Transient bytes per device above what the load holds at its worst moment (e.g. a tensor dequantized on the GPU).")


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
            out.append({"device": devices[index], "name": "kv_per_token", "bytes": int(self.devices[index].cache_rate),
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


def measured_figures(predicted: DeviceMemory, m: "DeviceMeasurement", outcome: str) -> dict[str, float]:
    """What one device's samples say of each planned figure (absent: they cannot tell it).

    The weights and the KV cache are measured only where the engine tells them apart; the rest
    of what it held at ready (context, activations, graphs) is what is left after them. A load
    that died of out-of-memory needed more than it reached: at least that plus the tolerance."""
    out: dict[str, float] = {}
    if m.weights_bytes is not None:
        out["weights"] = m.weights_bytes
    if m.kv_bytes is not None and m.kv_tokens:
        out["kv_rate"] = m.kv_bytes / m.kv_tokens
    weights = m.weights_bytes if m.weights_bytes is not None else predicted.weights
    kv = m.kv_bytes if m.kv_bytes is not None else int(m.kv_tokens * predicted.kv_rate)
    if outcome == "oom":
        reached = max(m.peak_bytes, m.leased_bytes) + verify_tolerance(m.leased_bytes)
        if m.two_phase and not m.kv_tokens:  # it died loading its weights: the load peak was short
            out["load_peak"] = max(0, reached - weights)
        else:
            out["workspace"] = max(0, reached - weights - kv)
        return out
    if m.steady_bytes:
        out["workspace"] = max(0, m.steady_bytes - weights - kv)
    # Two-phase: the load holds weights + load_peak only; one-phase: the peak above the steady state.
    transient = m.loading_peak_bytes - weights if m.two_phase else m.peak_bytes - m.steady_bytes
    out["load_peak"] = max(0, transient)
    return out


def with_measured(memory: Memory, fingerprint: "Fingerprint", margin: float) -> Memory:
    """The profile with max(predicted, measured x (1 + margin)) per figure and device; a figure
    the measurement raised gets a `measured` component for the difference, saying from what."""
    devices, components, kv_sources = [], [], []
    for index, (predicted, comps, kv_source) in enumerate(zip(memory.devices, memory.components, memory.kv_sources)):
        if index >= len(fingerprint.devices):
            devices.append(predicted), components.append(comps), kv_sources.append(kv_source)
            continue
        m = fingerprint.devices[index]
        figures = measured_figures(predicted, m, fingerprint.outcome)
        basis = f"fingerprint {fingerprint.digest[:8]} ({fingerprint.outcome}, {fingerprint.when()}, {m.method})"
        changed, extra = {}, []
        for name, part in (("weights", Part.WEIGHTS), ("workspace", Part.WORKSPACE), ("load_peak", Part.LOAD_PEAK)):
            if name in figures and (grown := _grown(figures[name], margin)) > getattr(predicted, name):
                changed[name] = grown
                extra.append(Component(f"{name}_measured", grown - getattr(predicted, name), Source.MEASURED,
                                       f"{basis}: {format_bytes(int(figures[name]))} measured + {margin:.0%}; the "
                                       f"model said {format_bytes(getattr(predicted, name))}", part))
        if "kv_rate" in figures and (rate := figures["kv_rate"] * (1 + margin)) > predicted.kv_rate:
            changed["kv_rate"] = rate
            kv_source = ("measured", f"{basis}: {figures['kv_rate']:.0f} B/token measured + {margin:.0%}; the model "
                                     f"said {predicted.kv_rate:.0f}")
        devices.append(replace(predicted, **changed))
        components.append(tuple(comps) + tuple(extra))
        kv_sources.append(kv_source)
    return replace(memory, devices=tuple(devices), components=tuple(components), kv_sources=tuple(kv_sources))
