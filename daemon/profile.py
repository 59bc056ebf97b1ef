"""A model's memory profile: its engine's memory model (`footprint`), with every number the
config sets (`memory.*`) taken as given, resolved per device into what the planner leases.

The engine's module says what its process holds (lessor.memory.footprint); this module only
merges that with the config and keeps each number's source for `lessor plan`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ..engines.base import EngineArgsBase
from ..memory.architecture import Architecture
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from .units import SIZE_PATTERN, parse_size

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
