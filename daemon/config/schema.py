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
from pydantic_core import ErrorDetails

from ...engines import ENGINE_KINDS
from ...engines.enginelog import LogLimits
from ...policies import POLICIES, Policy, Value, lru_idle, priority
from ..errors import ConfigError, ConfigProblem
from ..units import GiB
from .fields import Duration, MemorySize, NonzeroMemorySize, Strict, parse_listen, port_clash
from .listeners import AdminConfig, RouterConfig
from .model_spec import ModelSpec


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
            return functools.partial({"lru_idle": lru_idle, "priority": priority}[self.name], churn_age_s=self.churn_age)
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
    def _names_unique(self) -> LessorConfig:
        seen: dict[str, str] = {}
        for spec in self.models:
            for name in (spec.name, *spec.aliases):
                if name in seen:
                    raise ValueError(f"models: name '{name}' of model '{spec.name}' is already used by model '{seen[name]}'")
                seen[name] = spec.name
        return self

    @model_validator(mode="after")
    def _api_key_models_exist(self) -> LessorConfig:
        for i, key in enumerate(self.router.api_keys):
            unknown = [m for m in key.models if m != "*" and self.model(m) is None]
            if unknown:
                raise ValueError(f"router.api_keys[{i}].models: no model named {', '.join(map(repr, unknown))}")
        return self

    @model_validator(mode="after")
    def _ports_unique(self) -> LessorConfig:
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


def _reason(error: ErrorDetails) -> str:
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
