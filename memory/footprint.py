"""The vocabulary of an engine's memory model: what its process holds on each device, component
by component, each with where its number comes from.

An engine's args class answers `footprint(shape) -> Footprint`; the daemon turns it into leases
(weights, reserve, load_peak, kv) and `lessor plan` shows every component with its source."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum

from .architecture import Architecture

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10, the floor, has no StrEnum: the same behaviour (str() and f-strings give the value)
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class Source(StrEnum):
    """Where a number comes from, from the firmest to the softest."""

    GIVEN = "given"  # set in the config (memory.*): lessor takes it as it is
    MEASURED = "measured"  # measured on this box
    FORMULA = "formula"  # computed from the model's shape by the engine's own rule (basis cites it)
    CONSTANT = "constant"  # a constant measured elsewhere: basis gives its source and engine version
    ESTIMATE = "estimate"  # an approximation of what the engine does: may be off either way


class Part(StrEnum):
    """Which lease a component is held under."""

    WEIGHTS = "weights"  # from the start of the load on
    WORKSPACE = "workspace"  # steady, beside the KV cache (the `reserve` lease)
    LOAD_PEAK = "load_peak"  # transient: the worst moment while loading, above what the load holds then


@dataclass(frozen=True)
class Component:
    name: str  # "weights", "cuda_context", "activation", "cuda_graphs", ...
    bytes: int  # on this device
    source: Source
    basis: str  # the formula in words, or the constant's source and engine version
    part: Part = Part.WORKSPACE
    per_kv_token: float = 0.0  # bytes more per planned KV token (a buffer that grows with the context)

    def to_dict(self) -> dict:
        out = {"name": self.name, "bytes": self.bytes, "part": self.part.value, "source": self.source.value,
               "basis": self.basis}
        return {**out, "per_kv_token": self.per_kv_token} if self.per_kv_token else out


@dataclass(frozen=True)
class DeviceFootprint:
    """One device of the placement: its components and its KV bytes per token."""

    components: tuple[Component, ...]
    kv_bytes_per_token: int  # the layers and heads this device caches
    kv_source: Source = Source.FORMULA
    kv_basis: str = ""

    def total(self, part: Part) -> int:
        return sum(c.bytes for c in self.components if c.part == part)

    @property
    def kv_rate(self) -> float:
        """Bytes per planned KV token: the cache itself and what grows with it."""
        return self.kv_bytes_per_token + sum(c.per_kv_token for c in self.components)


@dataclass(frozen=True)
class Footprint:
    devices: tuple[DeviceFootprint, ...]  # one per device of the placement, in its order
    host: tuple[Component, ...] = ()  # host RAM (a hybrid engine's experts)
    notes: tuple[str, ...] = field(default=())  # what the model could not tell (warnings for the plan)


@dataclass(frozen=True)
class ModelShape:
    """What the model spec says beyond the engine's arguments, for the engine's memory model."""

    architecture: Architecture
    weight_format: str  # a key of weights.FORMATS
    kv_dtype: str  # a key of weights.DTYPE_BYTES
    experts_on_cpu: bool
    devices: int  # GPUs of the placement
    batch: int  # sequences at once, where the engine's arguments leave it open (the plan's)
