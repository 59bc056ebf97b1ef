"""The one engine interface: a launch goes in, a running server comes out.

An adapter turns a `Launch` into a command line and environment (`command`), and `start` runs it
under `EngineProcess`, the supervision every engine shares. The handle it returns is what the
supervisor drives through the load protocol. Two-phase engines (the built-in torch engine) load
their weights, wait, then allocate exactly the KV cache lessor grants; one-phase engines size
their KV cache from flags at start and hold the load-peak lease until they are ready.
"""

from __future__ import annotations

import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..memory.architecture import Architecture
from ..memory.context import ContextLimit, trained_context
from ..memory.footprint import Footprint, ModelShape
from .memory_model import CUDA_CONTEXT_ESTIMATE, generic_footprint
from .process import EngineProcess, engine_env, owned_env

log = logging.getLogger("lessor.engines")


@dataclass(frozen=True)
class Sizing:
    """What the planner sized for one model, in plain numbers, for its engine to turn into flags."""

    kv_tokens: int  # all sequences together
    batch: int  # sequences served together
    kv_bytes: int  # per device: the planned KV cache on the device holding the most of it
    devices: int
    activation_bytes: int  # per device: workspace beyond weights and KV
    gpu_bytes: int  # per device: weights + activation + KV
    total_bytes: int  # the smallest card's total
    context: int | None = None  # the longest sequence the engine runs the model at (context_limit), None: unknown


class Flags(NamedTuple):
    params: dict[str, Any]  # the engine's flags, by name
    broken: list[str]  # rules the flags break, each "engine.FIELD: why"
    warnings: list[str]


class EngineArgsBase(BaseModel):
    """An engine's arguments, and the facts about the engine that the config, the planner and the
    memory model ask instead of testing its kind. Every engine declares each ClassVar below (a
    test checks it) and `planned_flags`; the methods' defaults fit most engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: ClassVar[str]  # the engine in messages ("the built-in torch engine")
    kv_param: ClassVar[str]  # the argument (and flag) that takes the planned KV size
    batch_param: ClassVar[str]  # the argument that takes the planned concurrency
    kv_per_sequence: ClassVar[bool]  # kv_param counts tokens per sequence: the cache holds it x batch
    two_phase: ClassVar[bool]  # loads its weights, then allocates the KV cache lessor grants
    hybrid: ClassVar[bool]  # may keep MoE experts in host RAM (placement.experts: cpu)
    max_devices: ClassVar[int | None]  # GPUs one model may span; None: any number
    default_chunk_tokens: ClassVar[int]  # the prefill chunk the memory model assumes
    packages: ClassVar[tuple[str, ...]]  # whose versions make the engine's version (none: the binary's --version)
    oom_markers: ClassVar[tuple[str, ...]]  # what the engine logs when it runs out of memory
    # What it logs once its health URL answers: the line wakes the readiness probe (engines/logwatch.py).
    ready_markers: ClassVar[tuple[str, ...]]
    # The engine serves under every name its command line gives (the aliases after the name);
    # otherwise the router rewrites an alias in a request's `model` to the model's name.
    takes_aliases: ClassVar[bool]
    # Environment variables the engine reads that would override the memory lessor planned (a
    # name ending in "*" is a prefix): never inherited, and dropped from the operator's `env` with
    # a warning (ProcessAdapter.start).
    memory_env: ClassVar[tuple[str, ...]]
    FACTS: ClassVar[tuple[str, ...]] = ("title", "kv_param", "batch_param", "kv_per_sequence", "two_phase", "hybrid",
                                        "max_devices", "default_chunk_tokens", "packages", "oom_markers",
                                        "ready_markers", "takes_aliases", "memory_env")

    model_path: str = Field(description="Local path of the model (HF folder or GGUF file); never a hub id.", min_length=1)
    extra_args: list[str] = Field(default_factory=list, description="Extra argv tokens appended to the engine's command, passed without a shell.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the engine process.")
    port: int | None = Field(default=None, ge=1024, le=65535, description="Port the engine listens on; chosen free by lessor when unset.")

    @field_validator("model_path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return absolute_path(path)

    @classmethod
    def engine_kind(cls) -> str:
        """The `kind` tag of this class's arguments in the config."""
        return typing.get_args(cls.model_fields["kind"].annotation)[0]

    def kv_granule(self, batch: int = 1) -> int:
        """Tokens the engine allocates its KV cache in, for `batch` sequences: a planned size is a multiple of it."""
        return 16

    def context_limit(self, architecture: Architecture) -> tuple[ContextLimit | None, bool]:
        """The longest sequence the engine runs this model at (None: the architecture does not
        say), and whether it refuses to start with a larger one (True) or runs past it with no use
        (False). The planner caps the KV cache at it times the sequences planned. This default:
        the positions the model was trained for."""
        return trained_context(architecture), False

    def rounded_kv(self, value: int, batch: int) -> tuple[int, str | None]:
        """A configured KV size as the engine rounds it for `batch` sequences, and a line saying so
        where it does."""
        return value, None

    def chunk_tokens(self) -> int:
        """The prefill chunk the engine runs with these arguments."""
        return self.default_chunk_tokens

    def decode_batch(self) -> int | None:
        """Sequences these arguments fix for the memory model's logits estimate (None: the plan's)."""
        return None

    def placement_problem(self, devices: int) -> str | None:
        """Why these arguments cannot run on `devices` GPUs ("engine.FIELD: why"), or None."""
        return None

    def version_query(self) -> tuple[list[str], tuple[str, ...]]:
        """What runs the engine and whose package versions name it (engines/versions.py asks)."""
        return list(getattr(self, "command", None) or [sys.executable]), self.packages

    def memory_flags(self) -> dict[str, Any]:
        """Every argument that decides the engine's memory, for a fingerprint's key: all but the
        port, the model's path (the key names the model) and the KV size (measured per token)."""
        return self.model_dump(mode="json", exclude={"port", "model_path", self.kv_param})

    def kv_element_bytes(self) -> tuple[float, float] | None:
        """Bytes per K and per V element where the engine's arguments set them (None: the spec's kv_dtype)."""
        return None

    def fitted(self, shape: ModelShape, room_bytes: int, kv_tokens: int) -> EngineArgsBase:
        """These arguments with what the engine sizes from the room on a GPU (`room_bytes`, beside a
        KV cache of `kv_tokens`) filled in; most engines size nothing but the KV cache (self)."""
        return self

    def env_warnings(self) -> list[str]:
        """What the plan says of the `env` variables lessor will not pass as given."""
        return [f"engine.env.{name}: not passed as given: {self.title} would read it instead of the memory lessor "
                "planned (lessor sets it from the plan or leaves it unset)" for name in owned_env(self.memory_env, self.env)]

    def planned_flags(self, sizing: Sizing) -> Flags:
        """The engine's flags for a planned KV cache, the rules they break and warnings."""
        raise NotImplementedError

    def footprint(self, shape: ModelShape) -> Footprint:
        """The engine's memory model: what its process holds on each device with these arguments.
        This default is the generic estimate, for an engine whose source lessor has not modelled."""
        return generic_footprint(shape, self.chunk_tokens(), self.decode_batch() or shape.batch, CUDA_CONTEXT_ESTIMATE,
                                 "a typical CUDA context (estimate for an engine not modelled)", self.kv_element_bytes())


def absolute_path(path: str) -> str:
    """Relative to lessord's working directory when the config is read: engines run in folders
    of their own, where a relative path would point elsewhere."""
    return str(Path(path).expanduser().absolute())


@dataclass(frozen=True)
class GpuTarget:
    device: str  # "gpu0"
    index: int
    uuid: str
    total_bytes: int
    free_bytes: int  # physically free when the engine is started (other processes' usage taken out)


@dataclass(frozen=True)
class Launch:
    """What the supervisor hands an adapter: the spec, the planned flags and where to run."""

    spec: Any  # ModelSpec (not imported: engines never import the daemon)
    params: Mapping[str, Any]
    kv_tokens: int
    gpus: tuple[GpuTarget, ...]
    leased_bytes: Mapping[str, int]  # per device, what the engine may use while it loads
    simulated: bool  # the devices are simulated: the engine runs on the CPU
    port: int
    log_path: Path
    run_dir: Path  # a folder of the engine's own (HOME, generated config files)
    host: str = "127.0.0.1"
    on_exit: Callable[[int], None] | None = field(default=None, compare=False)
    # In the engine's environment: a restarted lessord finds an engine it never got to record by it.
    marker: Mapping[str, str] = field(default_factory=dict)
    withhold_env: tuple[str, ...] = ()  # lessord's variables that hold secrets (router keys)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def visible_devices(self) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES by UUID (indices can differ between NVML and CUDA); none when simulated."""
        return {"CUDA_VISIBLE_DEVICES": "" if self.simulated else ",".join(g.uuid for g in self.gpus)}


@dataclass(frozen=True)
class KvGrant:
    """Step 4 of the load protocol: the KV cache lessor granted once the weights were in."""

    tokens: int
    bytes: int  # per device
    params: Mapping[str, Any]  # the engine's flags for it (e.g. context_tokens, max_batch_size)
    leased_bytes: Mapping[str, int]  # per device, everything the model now holds


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    health_path: str = "/health"


class EngineHandle(Protocol):
    """A started engine, as the supervisor drives it through the load protocol."""

    pid: int
    identity: str  # the process's boot id and start time: a recycled pid never matches
    started_at: float
    base_url: str
    engine_times: Mapping[str, float]  # the engine's own phase stamps (CLOCK_MONOTONIC), where it gives them
    process: EngineProcess

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        """Return once the weights are in; raise ProcessEnded or TimeoutError."""

    async def allocate_kv(self, kv: KvGrant) -> None:
        """Allocate the KV cache lessor granted (one-phase engines did at start)."""

    async def wait_ready(self, timeout_s: float) -> None: ...

    async def measure(self) -> dict[str, int]:
        """Bytes per device the engine reports using ({} when only the probe can tell)."""

    # Elastic KV: whether the running engine can change its KV cache in place (two-phase engines
    # that say so); the others change it only at their next load.
    resizes_kv: bool

    async def resize_kv(self, kv_tokens: int, leased_bytes: Mapping[str, int]) -> int:
        """The KV cache again at `kv_tokens` (all sequences), within `leased_bytes` (per device,
        everything the model holds once resized): the tokens it now holds. Raises KvResizeRefused
        (the engine's reason) and leaves the cache as it was."""

    async def stop(self, grace_s: float) -> None: ...


class EngineAdapter(Protocol):
    kind: str

    async def start(self, launch: Launch) -> EngineHandle: ...

    def reattach(self, process: EngineProcess, launch: Launch) -> EngineHandle:
        """A handle for an engine a previous lessord started with this launch (adoption)."""


class KvResizeRefused(RuntimeError):
    """The engine did not resize its KV cache (it cannot, it was busy, or the size is out of its
    bounds); the message is the engine's reason. Its cache is as it was."""


class ProcessHandle:
    """A one-phase engine: ready (weights and KV cache in) when its health URL answers 200."""

    resizes_kv: ClassVar[bool] = False

    def __init__(self, process: EngineProcess, launch: Launch, command: Command) -> None:
        self.process, self.launch, self.base_url = process, launch, launch.base_url
        self.health_url = launch.base_url + command.health_path
        self.pid, self.identity, self.started_at = process.pid, process.identity, process.started_at
        self.engine_times: dict[str, float] = {}
        self._ready = False  # the engine said it serves: no probe would tell more

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        await self.process.wait_http(self.health_url, timeout_s, "loading", self.launch.spec.engine.ready_markers)
        if self.process.ready_line_at is not None:  # the engine said it in its log: the load's timeline splits there
            self.engine_times["ready_line"] = self.process.ready_line_at
        self._ready = True  # one phase: its health answering is its readiness

    async def allocate_kv(self, kv: KvGrant) -> None:
        return None

    async def wait_ready(self, timeout_s: float) -> None:
        if self._ready:
            return
        await self.process.wait_http(self.health_url, timeout_s, "becoming ready", self.launch.spec.engine.ready_markers)

    async def measure(self) -> dict[str, int]:
        return {}

    async def resize_kv(self, kv_tokens: int, leased_bytes: Mapping[str, int]) -> int:
        raise KvResizeRefused(f"{self.launch.spec.engine.title} sizes its KV cache at start: it changes at its next load")

    async def stop(self, grace_s: float) -> None:
        await self.process.stop(grace_s)


class ProcessAdapter:
    """Base of the adapters that run one server process from a command line."""

    args_class: ClassVar[type[EngineArgsBase]]  # the engine's arguments and facts
    handle_class: type = ProcessHandle

    @property
    def kind(self) -> str:
        return self.args_class.engine_kind()

    def command(self, launch: Launch) -> Command:
        raise NotImplementedError

    async def start(self, launch: Launch) -> EngineHandle:
        command = self.command(launch)
        inherited = owned_env(self.args_class.memory_env, os.environ)
        env = engine_env({**launch.visible_devices(), **command.env, **self.operator_env(launch, command, inherited),
                          **launch.marker}, (*launch.withhold_env, *inherited))
        argv = [*command.argv, *launch.spec.engine.extra_args]
        launch.run_dir.mkdir(parents=True, exist_ok=True)
        process = await EngineProcess.spawn(argv, env, launch.log_path, cwd=launch.run_dir, on_exit=launch.on_exit)
        return self.handle_class(process, launch, command)

    def reattach(self, process: EngineProcess, launch: Launch) -> EngineHandle:
        return self.handle_class(process, launch, self.command(launch))

    def operator_env(self, launch: Launch, command: Command, inherited: list[str]) -> dict[str, str]:
        """The spec's `env`, less the variables that would override the memory lessor planned: the
        plan's own values (`command.env`) stand, and lessord's environment (`inherited`: those it
        holds) is never passed them."""
        env = launch.spec.engine.env
        given = owned_env(self.args_class.memory_env, env)
        dropped = sorted({*given, *(set(inherited) - set(command.env))})
        if dropped:
            log.warning("model %s: %s not passed to %s as set: they would override the memory lessor planned",
                        launch.spec.name, ", ".join(dropped), self.args_class.title)
        return {k: v for k, v in env.items() if k not in given}
