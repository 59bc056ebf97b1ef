"""The configuration: one pydantic tree, loaded once and injected, never read from globals.

Every field has a description and bounds; cross-field rules live in validators; a bad file
fails with every problem listed by path (`models[1].engine.cache_lens: must be ...`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ...engines import ENGINE_ARGS, ENGINE_KINDS, EngineArgs
from ...engines.enginelog import LogLimits
from ...memory.architecture import Architecture, read_hf_config
from ...memory.footprint import ModelShape
from ...memory.model_folder import read_shape
from ..planning.profile import KvDtype, Memory, MemoryProfile, Size, WeightFormat, resolve
from ...policies import POLICIES, Policy, Value
from ..errors import ConfigError, ConfigProblem
from .listeners import AdminConfig, RouterConfig
from .fields import (NAME_PATTERN, Duration, DurationOrNever, MemorySize, NonzeroMemorySize, Strict, parse_listen,
                           port_clash)
from ..units import GiB



class GpuSettings(Strict):
    index: int = Field(ge=0, le=63, description="GPU index as NVML numbers it (or the simulated device's position).")
    capacity: NonzeroMemorySize | None = Field(default=None, description="Bytes of this card lessor may use at most (a cap below the card's total).")
    headroom: MemorySize | None = Field(default=None, description="Bytes kept free on this card; overrides devices.headroom.")


class SimulatedGpu(Strict):
    name: str = Field(default="Simulated GPU", min_length=1, max_length=96, description="Device name shown by status.")
    total: NonzeroMemorySize = Field(gt=0, description="Total bytes of the simulated card.")
    foreign: MemorySize = Field(default=0, description="Bytes used by processes lessor does not manage (changeable at run time).")


class HostPool(Strict):
    enabled: bool = Field(default=True, description="Lease host RAM too (hybrid engines keep experts there).")
    headroom: MemorySize = Field(default=4 * GiB, description="RAM kept free for the OS and everything else.")
    capacity: NonzeroMemorySize | None = Field(default=None, description="Bytes of RAM lessor may lease at most.")
    simulated_total: NonzeroMemorySize | None = Field(default=None, description="With the simulated probe: RAM size to pretend (default: the real RAM).")


class DevicesConfig(Strict):
    probe: Literal["auto", "nvml", "sim"] = Field(default="auto", description="auto: NVML when a driver answers, else the simulated devices.")
    headroom: MemorySize = Field(default=1 * GiB, description="Bytes kept free on every GPU (default 1 GiB).")
    gpus: list[GpuSettings] = Field(default_factory=list, description="Per-GPU capacity caps and headroom overrides.")
    simulated: list[SimulatedGpu] = Field(default_factory=list, description="Devices of the simulated probe, indexed in order.")
    host: HostPool = Field(default_factory=HostPool, description="The host-RAM pool.")

    @field_validator("gpus")
    @classmethod
    def _unique_indices(cls, gpus: list[GpuSettings]) -> list[GpuSettings]:
        seen = [g.index for g in gpus]
        dupes = sorted({i for i in seen if seen.count(i) > 1})
        if dupes:
            raise ValueError(f"GPU index listed more than once: {dupes}")
        return gpus

    def settings_for(self, index: int) -> GpuSettings:
        return next((g for g in self.gpus if g.index == index), None) or _default_gpu_settings(index)


@functools.lru_cache(maxsize=64)
def _default_gpu_settings(index: int) -> GpuSettings:
    """A card the config does not mention (read on every budget: built once, never changed)."""
    return GpuSettings(index=index)


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
    def _min_within_max(self) -> "PlanSettings":
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

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "ModelSpec":
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

    def fitted(self, room_bytes: int) -> "ModelSpec":
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
    def _placement_fits_engine(self) -> "ModelSpec":
        if self.architecture is None:
            missing = [f for f in ("weights", "kv_bytes_per_token") if getattr(self.memory, f) is None]
            if missing:
                raise ValueError(f"memory.{missing[0]}: required when no architecture is given and "
                                 f"engine.model_path holds no config.json or GGUF ({self.engine.model_path}): give "
                                 f"architecture.hf_config, or memory.{' and memory.'.join(missing)}")
        engine, most = self.engine, self.engine.max_devices
        if self.placement.experts == "cpu" and not engine.hybrid:
            hybrid = ", ".join(sorted(k for k, args in ENGINE_ARGS.items() if args.hybrid))
            raise ValueError(f"placement.experts: 'cpu' needs a hybrid engine ({hybrid}), not '{engine.kind}'")
        if len(set(self.placement.devices)) != len(self.placement.devices):
            raise ValueError("placement.devices: a GPU index is listed twice")
        problem = engine.placement_problem(len(self.placement.devices))
        if problem:
            raise ValueError(problem)
        if most is not None and len(self.placement.devices) > most:
            span = "one GPU; list exactly one" if most == 1 else f"at most {most} GPUs; list at most {most}"
            raise ValueError(f"placement.devices: {engine.title} runs on {span}")
        return self


class LedgerConfig(Strict):
    url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite+aiosqlite:///<state_dir>/ledger.db. PostgreSQL: postgresql+asyncpg://...")
    history: Duration = Field(default=7 * 86400.0, ge=60, le=3650 * 86400, description="Seconds (or 30m, 12h, 7d) a released lease stays in the database as history (default 7 days); older ones are deleted in the background, every hour (or every `history`, when shorter). Granted leases always stay.")
    connect_timeout: Duration = Field(default=5.0, ge=0.1, le=300, description="Longest lessor waits to connect to the database, or for a free connection of its pool. With `statement_timeout` it bounds every ledger call: a call the database has not answered within the two together (a hung server answers nothing, not even an error) fails, a load answers 503 `ledger_unavailable` with Retry-After and `/readyz` says the ledger is unavailable until it answers again.")
    statement_timeout: Duration = Field(default=10.0, ge=0.1, le=3600, description="Longest one statement may take: PostgreSQL's statement_timeout and the client's own wait for its answer; SQLite's busy timeout (how long a write waits for another connection's lock on the file). A ledger statement takes milliseconds.")

    def deadlines(self):
        """daemon/ledger_db.Deadlines of this section (imported here: SQLAlchemy only where a ledger opens)."""
        from ..ledger.database import Deadlines

        return Deadlines(self.connect_timeout, self.statement_timeout)

    @field_validator("url")
    @classmethod
    def _driver(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
        return url


class PolicyConfig(Strict):
    name: str = Field(default="value", description=f"Admission/eviction policy: one of {sorted(POLICIES)}. `value` (the default) keeps the models that serve the most requests per byte, learned from the traffic; `priority` evicts lower priorities only; `lru_idle` the least recently used; `fit` never evicts.")
    churn_age: Duration = Field(default=60.0, ge=0, le=86400, description="An idle model the policy would not evict (`priority`: a higher priority; `value`: worth more than the newcomer) yields to another model's waiting requests once nobody has asked for it or loaded it for this long. `value`'s weighing also never evicts a model loaded less than this long ago, so a burst cannot swap it straight back out; an idle model asked so rarely that its requests come more than six of its reloads apart yields at once.")
    starvation: Duration = Field(default=7200.0, gt=0, le=30 * 86400, description="Policy `value`: a model whose requests have gone unserved this long (quiet spells count at most a minute each) counts its request rate double, three times after twice as long, and so on, so however rare it is loaded in the end.")

    def build(self) -> Policy:
        """The policy this section names, with its parameters."""
        if self.name == "value":
            return Value(churn_age_s=self.churn_age, starvation_s=self.starvation)
        if self.name in ("lru_idle", "priority"):
            return functools.partial(POLICIES[self.name], churn_age_s=self.churn_age)
        return POLICIES[self.name]

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown policy '{name}'; valid: {', '.join(sorted(POLICIES))}")
        return name


class TimeoutsConfig(Strict):
    weights: Duration = Field(default=600.0, gt=0, description="Longest an engine may take to load its weights before the load is rolled back.")
    ready: Duration = Field(default=120.0, gt=0, description="Longest an engine may take from its KV grant (or, one-phase, from start) to answer its health check.")
    stop_grace: Duration = Field(default=15.0, ge=0, le=3600, description="After SIGTERM, how long an engine may take to exit before its processes get SIGKILL: its process group and the workers that left it (they carry its environment marker or descend from it).")
    adopt_s: Duration = Field(default=30.0, gt=0, le=3600, description="After a restart, how long an engine that still runs may take to answer its health check before it is stopped instead of adopted.")
    adopt_stopped_s: Duration = Field(default=10.0, ge=0, le=3600, description="After a restart, how long an engine found stopped (SIGSTOP, a debugger) may take to resume before it is killed (SIGKILL: a stopped process does not act on SIGTERM) and its leases released; a pinned model is loaded again. The other models are served meanwhile.")
    stray_grace_s: Duration = Field(default=5.0, ge=0, le=3600, description="After a restart, how long an engine found running but never recorded may take to exit after SIGTERM before SIGKILL.")
    unload_verify_s: Duration = Field(default=10.0, ge=0, le=3600, description="After an engine stops, how long its devices' usage may take to fall by its leases; past it an event and a metric say the memory lingers (it counts as foreign until it is gone).")


class PlannerConfig(Strict):
    measured_margin: float = Field(default=0.03, ge=0, le=1, description="Added to a measured figure (a fingerprint of the same model, engine version, device and flags) before the plan takes max(predicted, measured): 0.03 = 3 %.")
    oom_retries: int = Field(default=1, ge=0, le=5, description="A load that ran out of memory (its engine died of it, or it measured above its leases) is retried this many times, planned from what it measured (a smaller KV cache, or after evicting idle models); then the model is failed with every attempt's reason.")


class ReconcilerConfig(Strict):
    interval: Duration = Field(default=5.0, gt=0, le=3600, description="How often measured usage is compared with the leases.")
    on_overrun: Literal["report", "stop"] = Field(default="report", description="An engine above its leases (plus max(128 MiB, 5 %)) for `overrun_checks` checks in a row: report it (event, metric, API), or also stop it.")
    overrun_checks: int = Field(default=2, ge=1, le=100, description="Consecutive checks over its leases before an engine counts as overrunning (one spike is not).")
    evict_on_foreign_growth: bool = Field(default=True, description="When processes lessor does not manage grow past the free memory, evict idle models by the policy to give it back (before an engine hits OOM).")
    health_timeout: Duration = Field(default=10.0, ge=0.05, le=600, description="Each check asks every ready engine's health URL; an engine that gives no answer within this (none at all: any HTTP status, 503 included, says it is alive, as a busy or resizing engine may) fails the check. 10 s by default: an engine's server answers its health between the steps of its batch, in milliseconds even when busy.")
    hung_checks: int = Field(default=3, ge=1, le=100, description="Checks in a row an engine's health must fail before it counts as hung: it is stopped (SIGKILL at once when stopped by a signal), its leases released, and its model's restart policy decides what follows, as for a crash (an engine_exited event, hung: true). 3 by default: one slow answer is not a hang, and a hung engine is noticed within about 3 x (interval + health_timeout).")


class EngineLogsConfig(Strict):
    per_model: NonzeroMemorySize = Field(default=64 << 20, description="The most one model's engine logs take on disk: its current file and its rotated ones (logs/NAME.log, .log.1 newest), rotated by size.")
    files_per_model: int = Field(default=4, ge=1, le=100, description="The files `per_model` is split into: the current one and files_per_model - 1 rotated ones; the oldest goes at each rotation.")
    total: NonzeroMemorySize = Field(default=GiB, description="The most all engine logs take together; past it the oldest rotated files of any model go (a current file never).")
    keep_free: MemorySize = Field(default=256 << 20, description="Engine output is dropped, and the log says how much, while the state_dir's disk has less than this free: logs never take the ledger's last megabytes.")
    on_stop: Literal["keep", "drop_older"] = Field(default="keep", description="When a model's engine stops (unload, eviction, shutdown): keep its rotated logs, or drop them; its last log stays for `lessor logs`.")

    def limits(self) -> LogLimits:
        return LogLimits(self.per_model, self.files_per_model, self.total, self.keep_free, self.on_stop == "drop_older")


class MqttConfig(Strict):
    url: str = Field(pattern=r"^mqtts?://[^/:]+(:\d+)?/?$", description="Broker: mqtt://HOST[:1883] or mqtts://HOST[:8883] (TLS).")
    username: str | None = Field(default=None, description="Broker user name.")
    password_file: str | None = Field(default=None, description="File holding the broker password (kept out of the config).")
    ca_file: str | None = Field(default=None, description="CA bundle for TLS; the system's when unset.")
    topic_prefix: str = Field(default="lessor", pattern=r"^[^#+]+$", description="Topics: PREFIX/events/TYPE, PREFIX/state/devices/ID, PREFIX/state/models/NAME, PREFIX/status.")
    client_id: str | None = Field(default=None, max_length=64, description="MQTT client id; default lessord-HOSTNAME.")
    buffer_size: int = Field(default=1000, ge=1, le=1_000_000, description="Events kept while the broker is away; older ones are dropped and counted.")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="Longest wait between reconnects (backoff doubles from 1 s).")


class LessorConfig(Strict):
    state_dir: str = Field(default_factory=lambda: os.environ.get("STATE_DIRECTORY", "var/lessor"), description="Ledger, token and engine logs; $STATE_DIRECTORY under systemd.")
    devices: DevicesConfig = Field(default_factory=DevicesConfig, description="Probe choice, headroom, caps, simulated devices.")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="Where leases persist.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Admission and eviction.")
    admin: AdminConfig = Field(default_factory=AdminConfig, description="The admin API.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The OpenAI-compatible front door.")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Engine start and stop limits.")
    reconciler: ReconcilerConfig = Field(default_factory=ReconcilerConfig, description="Measured usage against the leases, every few seconds.")
    planner: PlannerConfig = Field(default_factory=PlannerConfig, description="How measurements feed the plans, and retries after out-of-memory.")
    engine_logs: EngineLogsConfig = Field(default_factory=EngineLogsConfig, description="Size limits of the engines' logs in state_dir/logs.")
    mqtt: MqttConfig | None = Field(default=None, description="Publish events and state to an MQTT broker (off when unset).")
    models: list[ModelSpec] = Field(default_factory=list, description="The models lessor may load.")

    @model_validator(mode="after")
    def _names_unique(self) -> "LessorConfig":
        seen: dict[str, str] = {}
        for spec in self.models:
            for name in (spec.name, *spec.aliases):
                if name in seen:
                    raise ValueError(f"models: name '{name}' of model '{spec.name}' is already used by model '{seen[name]}'")
                seen[name] = spec.name
        return self

    @model_validator(mode="after")
    def _api_key_models_exist(self) -> "LessorConfig":
        for i, key in enumerate(self.router.api_keys):
            unknown = [m for m in key.models if m != "*" and self.model(m) is None]
            if unknown:
                raise ValueError(f"router.api_keys[{i}].models: no model named {', '.join(map(repr, unknown))}")
        return self

    @model_validator(mode="after")
    def _ports_unique(self) -> "LessorConfig":
        listeners = [("admin.listen", *parse_listen(self.admin.listen)), ("router.listen", *parse_listen(self.router.listen))]
        listeners += [(f"models[{i}].engine.port", "127.0.0.1", spec.engine.port)  # engines listen on loopback
                      for i, spec in enumerate(self.models) if spec.engine.port is not None]
        clash = port_clash(listeners)
        if clash:
            raise ValueError(clash)
        return self

    def ledger_url(self) -> str:
        return self.ledger.url or f"sqlite+aiosqlite:///{Path(self.state_dir).absolute() / 'ledger.db'}"

    def token_path(self) -> Path:
        return Path(self.admin.token_file) if self.admin.token_file else Path(self.state_dir) / "admin.token"

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if name == m.name or name in m.aliases), None)


def problems_from(error: ValidationError) -> list[ConfigProblem]:
    return [ConfigProblem(path=loc_path(e["loc"]), reason=_reason(e)) for e in error.errors()]


def loc_path(loc: tuple[Any, ...]) -> str:
    """('models', 1, 'engine', 'ktransformers', 'cache_lens') -> 'models[1].engine.cache_lens'."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ENGINE_KINDS and i > 0 and loc[i - 1] == "engine":
            continue  # the discriminated union's tag is not a field the operator wrote
        else:
            path += f".{part}" if path else str(part)
    return path


def _reason(error: dict[str, Any]) -> str:
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if error["type"] == "extra_forbidden":
        return "unknown field (check its spelling and the config reference)"
    if error["type"] == "union_tag_invalid":
        return f"unknown engine kind; valid: {', '.join(ENGINE_KINDS)}"
    return msg


def parse_config(data: Any, source: str = "<config>") -> LessorConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigProblem("", f"the top level must be a mapping, not {type(data).__name__}")])
    try:
        return LessorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, problems_from(exc)) from None


def load_config(path: str | os.PathLike[str]) -> LessorConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigProblem("", f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [ConfigProblem("", f"not valid YAML: {where}{getattr(exc, 'problem', exc)}")]) from None
    return parse_config(data, source)
