"""Request and response bodies of the admin API, as pydantic models; the OpenAPI document is built from them."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..daemon.leases import Lease, LeaseState
from ..daemon.models.lifecycle import ModelState
from ..daemon.planning.profile import Size


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = int | float | str | bool


class ModelAction(Body):
    action: Literal["load", "unload"] = Field(description="What to do with the model.")
    overrides: dict[str, Scalar] = Field(default_factory=dict, description="Engine arguments to use for this load (e.g. max_batch_size).")


class PlanRequest(Body):
    model: str = Field(min_length=1, max_length=128, description="Model name or alias.")
    overrides: dict[str, Scalar] = Field(default_factory=dict, description="Engine arguments to try (e.g. {\"max_batch_size\": 2}).")


class ForeignUsage(Body):
    foreign_bytes: Size = Field(description="Bytes used by processes lessor does not manage (simulated devices only).")


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class DeviceOut(Out):
    id: str
    index: int
    uuid: str
    name: str
    probe: str
    total_bytes: int
    used_bytes: int
    capacity_bytes: int
    headroom_bytes: int
    foreign_bytes: int
    leased_bytes: int
    leasable_bytes: int
    free_bytes: int
    leased_by_kind: dict[str, int]
    models: dict[str, dict[str, int]]


def _lease_fields() -> dict[str, Any]:
    """LeaseOut's fields, from the one source of them (daemon/leases.py's Lease), each typed as Lease
    declares it and required, as Lease.to_dict() gives every one; with the state to_dict() adds
    after `bytes`."""
    types = get_type_hints(Lease)
    fields = [(f.name, (types[f.name], ...)) for f in dataclasses.fields(Lease)]
    at = [name for name, _ in fields].index("bytes") + 1
    return dict([*fields[:at], ("state", (LeaseState, ...)), *fields[at:]])


LeaseOut = create_model("LeaseOut", __base__=Out, __module__=__name__, **_lease_fields())


class OverrunOut(Out):
    device: str
    used_bytes: int = Field(description="What the engine measured at (NVML per process, or its own report on simulated devices)")
    leased_bytes: int


class LoadStepOut(Out):
    step: str
    whose: Literal["lessor", "engine", "measure", "notice"] = Field(description="lessor: its own work (admission, plans, grants, spawn, records); engine: the engine's; measure: the samples that become a fingerprint and the check against the leases; notice: from the engine being ready to lessor knowing it")
    seconds: float


class LoadTimelineOut(Out):
    steps: list[LoadStepOut] = Field(description="In order; the engine's steps split where the engine stamps its phases (the torch engine)")
    totals: dict[str, float] = Field(description="Seconds per whose: lessor, engine, measure, notice")
    seconds: float | None = Field(description="From the load's start to the model serving")
    marks: dict[str, float] = Field(description="The moments themselves, CLOCK_MONOTONIC seconds (the engine's prefixed e:)")


class WaitingOut(Out):
    reason: str = Field(description="Why its load waits, in the policy's words")
    recheck_in_s: float | None = Field(description="Seconds until it is weighed again by itself; null: when a model it waits for finishes, or memory changes")
    blockers: list[str] = Field(description="Busy models whose eviction would make room (it waits for them to finish their requests)")
    requests: int = Field(description="Requests waiting for it")


class ModelOut(Out):
    name: str
    aliases: list[str]
    engine: str
    state: ModelState
    priority: int
    pinned: bool
    keep_alive_s: float
    devices: list[str]
    leased_bytes: dict[str, int]
    in_flight: int = Field(description="Requests the router is running on it now")
    idle_s: float | None = Field(description="Seconds since its last request (or since it became ready) while it serves; null otherwise")
    keep_alive_ends_in_s: float | None = Field(description="Seconds until its keep_alive unloads it, counted from its last request (Ollama's UNTIL); null while it does not serve, pinned, or with keep_alive never (-1)")
    error: str | None = Field(description="Why the last load failed (state failed), or null")
    params: dict[str, Any] | None
    endpoint: str | None = Field(description="The engine's own base URL while it runs (the router forwards there)")
    pid: int | None = Field(description="The engine's process id (leader of its process group) while it runs")
    restarts: int = Field(description="Automatic restarts after crashes in the last 10 minutes")
    overrun: OverrunOut | None = Field(description="Set while the reconciler finds the engine above its leases plus the tolerance")
    request_rate: float = Field(description="Requests per second the router sees for it, decayed (half-life 10 min); kept across restarts")
    started_share: float = Field(description="Of its requests while it was ready, the share its engine could start at once (room in its planned batch); kept across restarts")
    kept_up_share: float = Field(description="Of its requests while it was ready, the share it kept up with: started at once, or fewer than one planned batch ahead of it (a model busy filling its batch is not held against itself): what the `value` policy weighs its rate by, never below the rate it starts requests at; kept across restarts")
    starved_s: float = Field(description="How long its requests have gone unserved (quiet spells count a minute at most; 0 once one starts): what ages its claim under the `value` policy")
    load_s: float | None = Field(description="What its loads took here (spawn to ready, a moving average), or null before the first")
    last_load: LoadTimelineOut | None = Field(description="Where its last load's time went, step by step, or null before one finished")
    waiting: WaitingOut | None = Field(default=None, description="While its state is waiting (requests wait, its load must wait): why, and when it is weighed again; null otherwise")
    evicted: list[str] | None = Field(default=None, description="In the answer to a load only: the models unloaded to make room for it, in order")


class PlanLease(Out):
    kind: str
    device: str
    bytes: int
    transient: bool = Field(description="load_peak: held only while the weights load, released before the kv lease")


class PlanComponent(Out):
    device: str = Field(description="gpuN or host")
    name: str = Field(description="weights, cuda_context, activation, cuda_graphs, nccl, compute_buffer, kv_per_token, ...")
    bytes: int = Field(description="on this device; for kv_per_token, bytes per KV token")
    part: Literal["weights", "workspace", "load_peak", "kv"] = Field(description="the lease it is held under (workspace: reserve)")
    source: Literal["given", "measured", "formula", "constant", "estimate"] = Field(
        description="given: the config's memory.*; formula: from the engine's source; constant: measured elsewhere, "
                    "basis names the source and version; estimate: an approximation")
    basis: str = Field(description="the formula in words, or the constant's source and engine version")
    per_kv_token: float | None = Field(default=None, description="bytes more per planned KV token (a buffer that grows with the context)")


class FingerprintUse(Out):
    key: str = Field(description="the key this load is measured under (model, engine version, devices, flags)")
    engine_version: str
    devices: list[str] = Field(description="device names of the placement")
    used: dict[str, Any] | None = Field(description="the fingerprint of this key the plan used (measured_at_s, outcome, loads, margin), or null")
    not_used: list[dict[str, Any]] = Field(description="this model's measurements under other keys, each with why it does not apply")


class PlanOut(Out):
    model: str
    fits: bool
    kv_tokens: int
    params: dict[str, Any]
    leases: list[PlanLease]
    reasons: list[str]
    evictions: list[str]
    warnings: list[str]
    estimated: list[str] = Field(description="memory-model numbers that are estimates rather than exact formulas")
    memory: list[PlanComponent] = Field(description="every component of the memory model per device, with its source")
    one_phase: bool = Field(description="the engine allocates its KV cache while it loads: every lease at once")
    peak_bytes: dict[str, int] = Field(description="per device: max(weights + load peak, steady leases)")
    fingerprint: FingerprintUse | None = Field(default=None, description="the measurement the plan used, and those it did not")
    sizing: list[str] = Field(default_factory=list, description="where the model's shape was read from, and which limit sized the KV cache (the configured value, the model's context for the batch, plan.max_kv_tokens, or what fits)")
    loaded: bool | None = Field(default=None, description="present (true) when the model is loaded: planned as for its reload, its own leases counted free")
    current: list[dict[str, Any]] | None = Field(default=None, description="with loaded: the leases it holds now (device, kind, bytes)")


class DeviceMeasurementOut(Out):
    device: str
    method: Literal["nvml", "engine", "pss"] = Field(description="nvml: the engine's process group; engine: its own report; pss: its processes' RAM")
    peak_bytes: int = Field(description="the most seen from spawn to ready (or to the failure)")
    loading_peak_bytes: int = Field(description="the most seen before the weights were in")
    steady_bytes: int = Field(description="at ready; 0 when it never got there")
    weights_bytes: int | None = Field(description="when the weights were in (engines that load in two phases)")
    kv_bytes: int | None = Field(description="what allocating the KV cache added (two phases)")
    kv_tokens: int
    leased_bytes: int = Field(description="what the model held on the device at its worst moment")
    two_phase: bool


class FingerprintOut(Out):
    key: str
    model: str
    engine: str
    engine_version: str = Field(description="what the engine's package (or binary) reports")
    devices: list[str] = Field(description="device names of the placement")
    flags: dict[str, Any] = Field(description="every argument that decides the engine's memory")
    outcome: Literal["ready", "overrun", "oom"]
    loads: int = Field(description="loads measured under this key; the figures are the newest one's")
    measured_at_s: float = Field(description="wall-clock seconds of the newest measurement")
    measured: list[DeviceMeasurementOut]
    applies: bool = Field(default=False, description="a load of this model now has this key: its plan uses it")


class ConfigSourceOut(Out):
    path: str = Field(description="The config file's absolute path")
    digest: str = Field(description="The first 12 hex digits of the SHA-256 of its content when lessord read it (start or reload)")


class PendingReloadOut(Out):
    config: ConfigSourceOut | None = Field(description="The file content that waits (its digest), applied once it can")
    waiting_for: list[str] = Field(description="The models it changes or removes that are mid-transition (loading, "
                                               "unloading, adopting); no load of a model it affects starts meanwhile")
    reason: str = Field(description="What it waits for, in words: e.g. waiting for 'm2' to finish loading")


class ReloadOut(Out):
    reloaded: bool = Field(description="true: applied, in force now; false: pending (see `pending`). A refused reload "
                                       "answers an error saying why (the running config is kept)")
    added: list[str] = Field(description="Models the config now has that it did not")
    removed: list[str] = Field(description="Models no longer in the config (unloaded)")
    changed: list[str] = Field(description="Models whose settings changed (applied at their next load)")
    warnings: list[str] = Field(description="check-config's warnings about the new config")
    config: ConfigSourceOut | None = Field(description="The file lessord runs now (the config in force)")
    pending: PendingReloadOut | None = Field(default=None, description="When not applied yet: what it waits for. It "
                                             "applies as soon as that ends, unless a newer reload replaces it")


class StatusOut(Out):
    version: str
    probe: Literal["nvml", "sim"]
    policy: str
    config: ConfigSourceOut | None = Field(description="The file lessord runs; null when it was not started from one")
    pending_reload: PendingReloadOut | None = Field(default=None, description="A reload that waits for loads to end "
                                                    "before it applies (null: none)")
    devices: list[DeviceOut]
    models: list[ModelOut]


class DeviceUsageOut(Out):
    capacity_bytes: int
    headroom_bytes: int
    leased_bytes: int
    foreign_bytes: int = Field(description="used by processes lessor does not manage")
    engines_bytes: int = Field(description="what the probe measured of lessor's engines (0 where it cannot tell)")
    free_bytes: int = Field(description="left to lease")


class UsageSampleOut(Out):
    at_s: float = Field(description="wall-clock seconds of the reading")
    devices: dict[str, DeviceUsageOut]


class HistoryOut(Out):
    window_s: float = Field(description="how far back samples are kept (an hour)")
    interval_s: float = Field(description="seconds between samples when nothing changes; each lease change adds one")
    now_s: float = Field(description="the daemon's wall clock when it answered (the chart's right edge)")
    samples: list[UsageSampleOut] = Field(description="oldest first")


class ErrorDetail(Out):
    type: str
    message: str
    field: str | None = None


class ErrorOut(Out):
    error: ErrorDetail
