"""A model spec (DESIGN.md's vocabulary): a configured model with its engine and arguments,
placement, memory profile and plan bounds, priority, keep-alive and crash restarts; its shape read
from the model's own folder (or GGUF header) where the config gives none. One part of the config's
pydantic tree (daemon/config/schema.py holds the rest)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ...engines import ENGINE_ARGS
from ...memory.architecture import Architecture, read_hf_config
from ...memory.footprint import ModelShape
from ...memory.model_folder import read_shape
from ..planning.profile import KvDtype, Memory, MemoryProfile, WeightFormat, resolve
from .fields import NAME_PATTERN, Duration, DurationOrNever, Strict

if TYPE_CHECKING:  # the engines' discriminated union, as a type checker can read it: their base
    from ...engines.base import EngineArgsBase as EngineArgs
else:
    from ...engines import EngineArgs


class Placement(Strict):
    devices: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=64, description="GPU indices the model spans.")
    experts: Literal["gpu", "cpu"] = Field(default="gpu", description="Where MoE routed experts live; cpu = hybrid engine.")


class PlanSettings(Strict):
    goal: Literal["context", "concurrency"] = Field(default="context", description="What the planner maximises with the KV budget.")
    min_kv_tokens: int = Field(default=2048, ge=16, description="Smallest KV cache worth loading the model for.")
    max_kv_tokens: int | None = Field(default=None, ge=16, description="Largest KV cache to take, even when more is free. Unset: the model's context (as its engine derives it from max_position_embeddings) for the planned batch, the rest of the card left to other models; without a known context, what fits.")
    max_batch_size: int = Field(default=4, ge=1, le=256, description="Concurrency the planner aims for when the engine leaves it open.")
    context_tokens: int | None = Field(default=None, ge=16, description="goal 'concurrency': tokens each sequence needs; batch = KV tokens / this.")

    @model_validator(mode="after")
    def _min_within_max(self) -> PlanSettings:
        if self.max_kv_tokens is not None and self.min_kv_tokens > self.max_kv_tokens:
            raise ValueError(f"min_kv_tokens ({self.min_kv_tokens}) is above max_kv_tokens ({self.max_kv_tokens}): no "
                             "KV cache can be both; lower min_kv_tokens or raise max_kv_tokens")
        return self


class RestartPolicy(Strict):
    policy: Literal["never", "on-failure"] = Field(default="on-failure", description="Restart an engine that exits on its own (a crash), or leave the model failed until a request or an operator loads it.")
    max_restarts: int = Field(default=3, ge=0, le=100, description="Crashes within window_s after which lessor gives up, whoever started the load (lessor's restart or a request): the model stays failed, and requests get a 503 naming the reason instead of loading it again, until an operator loads it or the config is reloaded.")
    backoff: Duration = Field(default=2.0, description="Wait before the first restart, doubled after each failure (at most max_backoff_s).")
    max_backoff_s: Duration = Field(default=300.0, gt=0, le=86400, description="Longest wait between two restarts.")
    window_s: Duration = Field(default=600.0, gt=0, le=86400, description="Crashes further apart than this do not count toward max_restarts.")


# config.json's quantization_config.quant_method -> the weight format, where the method says it.
QUANT_METHODS = {"fp8": "fp8", "gptq": "gptq", "awq": "awq"}


def _quantization_from_config(data: Any) -> Any:
    """A quantized checkpoint read as bf16 would plan twice its weights or more: the format comes
    from config.json unless the spec says it; a method that leaves it open must be said."""
    arch = data.get("architecture") if isinstance(data, dict) else None
    method = arch.get("quantization_method") if isinstance(arch, dict) else None
    if not method or "quantization" in data:
        return data
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization: config.json's quantization_config is '{method}', which lessor cannot take a "
                         f"weight format from; set quantization (int8 for w8a8 or 8-bit GPTQ, fp8, gptq for w4a16)")
    return {**data, "quantization": QUANT_METHODS[method]}


def _architecture_from_model_path(data: dict) -> dict:
    """The model's shape from its own folder (config.json) or GGUF header, where the spec gives no
    architecture and its memory.* does not say every figure the planner needs."""
    memory, engine = data.get("memory") or {}, data.get("engine")
    path = engine.get("model_path") if isinstance(engine, dict) else None
    if not isinstance(path, str) or not path or (isinstance(memory, dict) and memory.get("weights") is not None
                                                  and memory.get("kv_bytes_per_token") is not None):
        return data
    try:
        read = read_shape(str(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"architecture: none given, and engine.model_path's shape cannot be read: {exc}; give "
                         "architecture.hf_config, or memory.weights and memory.kv_bytes_per_token") from None
    if read is None:
        return data
    fields, source = read
    return {**data, "architecture": {**fields, "source": source}}


class ModelSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="The name clients use in the `model` field.")
    aliases: list[str] = Field(default_factory=list, description="Other names routed to this model.")
    engine: EngineArgs = Field(description="Engine kind and its arguments.")
    placement: Placement = Field(default_factory=Placement, description="Where the model lives.")
    architecture: Architecture | None = Field(default=None, description="Shape of the model (HF config.json names); `hf_config: PATH` reads them from a file. Unset, it is read from engine.model_path (its config.json, or a GGUF's header) where memory.* does not give every figure.")
    quantization: WeightFormat = Field(default="bf16", description="Weight format, for the memory model.")
    kv_dtype: KvDtype = Field(default="bf16", description="KV-cache element type, for the memory model.")
    memory: MemoryProfile = Field(default_factory=MemoryProfile, description="Bytes the model needs; each field overrides the memory model's.")
    plan: PlanSettings = Field(default_factory=PlanSettings, description="How the planner sizes the KV cache.")
    priority: int = Field(default=50, ge=0, le=1000, description="Higher survives eviction longer (policy `priority`).")
    keep_alive: DurationOrNever = Field(default=-1, description="Idle seconds before unloading; -1 (the default) = never: the policy makes room when a load needs it. Set a duration to give the GPU back to other work when the model is idle.")
    pinned: bool = Field(default=False, description="Loaded at start and never evicted.")
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000, description="Requests the router sends to this model at once; more wait in its queue. Unset: no limit (the engine queues).")
    restart: RestartPolicy = Field(default_factory=RestartPolicy, description="What to do when the engine exits on its own.")

    @model_validator(mode="before")
    @classmethod
    def _read_hf_config(cls, data: Any) -> Any:
        arch = data.get("architecture") if isinstance(data, dict) else None
        if isinstance(arch, dict) and "hf_config" in arch:
            path = arch["hf_config"]
            try:
                from_file = read_hf_config(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"architecture.hf_config: cannot read '{path}': {exc}") from None
            data = {**data, "architecture": {**from_file, "source": f"{path} (architecture.hf_config)",
                                             **{k: v for k, v in arch.items() if k != "hf_config"}}}
        elif arch is None and isinstance(data, dict):
            data = _architecture_from_model_path(data)
        return _quantization_from_config(data)

    def profile(self) -> Memory:
        """The memory profile: the memory model's numbers, with every field the config sets taken as
        given. Computed once: the spec is frozen (with_overrides makes a new one)."""
        return self.memory_profile

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> ModelSpec:
        copy = super().model_copy(update=update, deep=deep)
        if update:  # the copy's fields differ: its profile is its own
            copy.__dict__.pop("memory_profile", None)
        return copy

    @functools.cached_property
    def memory_profile(self) -> Memory:
        """profile()'s cache. A cached property, not a private attribute: equality compares
        fields only, so a spec that has computed its profile still equals one that has not."""
        return resolve(self.memory, self.architecture, self.quantization, self.kv_dtype, self.placement.experts == "cpu",
                       self.engine, len(self.placement.devices), self.plan.max_batch_size)

    def fitted(self, room_bytes: int) -> ModelSpec:
        """This spec with the engine arguments it sizes from the room on its smallest GPU (ktransformers'
        GPU experts; engines/base.py `fitted`), the plan's minimum KV cache kept beside them."""
        if self.architecture is None:
            return self
        shape = ModelShape(self.architecture, self.quantization, self.kv_dtype, self.placement.experts == "cpu",
                           len(self.placement.devices), self.plan.max_batch_size)
        engine = self.engine.fitted(shape, room_bytes, self.plan.min_kv_tokens)
        return self if engine is self.engine else self.model_copy(update={"engine": engine})

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: list[str]) -> list[str]:
        import re
        bad = [a for a in aliases if not re.match(NAME_PATTERN, a)]
        if bad:
            raise ValueError(f"aliases {bad} must match {NAME_PATTERN}")
        return aliases

    @model_validator(mode="after")
    def _placement_fits_engine(self) -> ModelSpec:
        if self.architecture is None:
            missing = [f for f in ("weights", "kv_bytes_per_token") if getattr(self.memory, f) is None]
            if missing:
                raise ValueError(f"memory.{missing[0]}: required when no architecture is given and "
                                 f"engine.model_path holds no config.json or GGUF ({self.engine.model_path}): give "
                                 f"architecture.hf_config, or memory.{' and memory.'.join(missing)}")
        engine, most = self.engine, self.engine.max_devices
        if self.placement.experts == "cpu" and not engine.hybrid:
            hybrid = ", ".join(sorted(k for k, args in ENGINE_ARGS.items() if args.hybrid))
            raise ValueError(f"placement.experts: 'cpu' needs a hybrid engine ({hybrid}), not '{engine.engine_kind()}'")
        if len(set(self.placement.devices)) != len(self.placement.devices):
            raise ValueError("placement.devices: a GPU index is listed twice")
        problem = engine.placement_problem(len(self.placement.devices))
        if problem:
            raise ValueError(problem)
        if most is not None and len(self.placement.devices) > most:
            span = "one GPU; list exactly one" if most == 1 else f"at most {most} GPUs; list at most {most}"
            raise ValueError(f"placement.devices: {engine.title} runs on {span}")
        return self
