"""The planner: turns a model spec and today's budgets into leases and engine parameters.

Pure: no I/O. It sizes the KV cache from the bytes left after the weights (the load peak is
transient and released before the KV cache is granted), applies the engine's parameter rules,
and says why nothing fits when nothing does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ...policies import DeviceBudget
from ..config.model_spec import ModelSpec
from ..config.schema import problems_from
from ..devices.probes import HOST, gpu_id
from ..leases import LeaseKind, LeaseWant
from ..units import format_bytes
from .kv_sizing import KvHint, kv_bytes, size_kv
from .profile import Memory, with_measured
from .rejections import PlanRejected

if TYPE_CHECKING:  # a measured figure is read, never stored, here: the planner stays clear of the ledger's SQL
    from ..ledger.fingerprints import Fingerprint


@dataclass(frozen=True)
class Plan:
    model: str
    fits: bool
    kv_tokens: int
    params: Mapping[str, Any]
    load_leases: tuple[LeaseWant, ...]  # weights, host weights and load_peak: held while loading
    steady_leases: tuple[LeaseWant, ...]  # kv and reserve (workspace): granted after the weights are in
    reasons: tuple[str, ...] = ()
    evictions: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = ()
    estimated: tuple[str, ...] = ()  # memory-model numbers that are estimates, not formulas
    profile: Memory | None = field(default=None, compare=False)  # the memory model it planned with
    placement: tuple[str, ...] = ()
    one_phase: bool = False  # the engine allocates its KV cache while loading: all leases at once
    fingerprint: Mapping[str, Any] | None = field(default=None, compare=False)  # the measurement it used or showed
    kv_hint: KvHint | None = field(default=None, compare=False)  # a configured KV size refused: what to give it
    sizing: tuple[str, ...] = ()  # where the model's shape came from, and which limit sized the KV cache

    @property
    def memory(self) -> list[dict]:
        """Every component per device, with its source (built when shown, not at every plan)."""
        return self.profile.sources(list(self.placement), HOST) if self.profile else []

    def all_leases(self) -> tuple[LeaseWant, ...]:
        return self.load_leases + self.steady_leases

    def peak_need(self) -> dict[str, int]:
        """Bytes per device the load needs at its worst moment: max(weights + peak, steady), or all
        of it for a one-phase engine."""
        if self.one_phase:
            return _sum(self.all_leases())
        load, steady = _sum(self.load_leases), _sum(self.load_leases, exclude=LeaseKind.LOAD_PEAK)
        for want in self.steady_leases:
            steady[want.device] = steady.get(want.device, 0) + want.bytes
        return {d: max(load.get(d, 0), steady.get(d, 0)) for d in set(load) | set(steady)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "fits": self.fits, "kv_tokens": self.kv_tokens, "params": dict(self.params),
                "leases": [{"kind": w.kind.value, "device": w.device, "bytes": w.bytes,
                            "transient": w.kind == LeaseKind.LOAD_PEAK} for w in self.all_leases()],
                "peak_bytes": self.peak_need(),
                "reasons": list(self.reasons), "evictions": list(self.evictions), "warnings": list(self.warnings),
                "estimated": list(self.estimated), "one_phase": self.one_phase, "memory": self.memory,
                "fingerprint": dict(self.fingerprint) if self.fingerprint else None, "sizing": list(self.sizing)}


def _sum(wants, exclude: LeaseKind | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in wants:
        if w.kind != exclude:
            out[w.device] = out.get(w.device, 0) + w.bytes
    return out


def with_overrides(spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
    """The spec with engine arguments replaced, validated by the engine's own rules."""
    if not overrides:
        return spec
    data = spec.model_dump()
    data["engine"].update(overrides)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = problems_from(exc)
        raise PlanRejected(spec.name, [str(p) for p in problems], field=problems[0].path if problems else None) from None


def load_leases(spec: ModelSpec, memory: Memory) -> tuple[LeaseWant, ...]:
    devices = [gpu_id(i) for i in spec.placement.devices]
    wants = [LeaseWant(d, LeaseKind.WEIGHTS, m.weights) for d, m in zip(devices, memory.devices)]
    if memory.host_weights:
        wants.append(LeaseWant(HOST, LeaseKind.WEIGHTS, memory.host_weights))
    wants += [LeaseWant(d, LeaseKind.LOAD_PEAK, m.load_peak) for d, m in zip(devices, memory.devices) if m.load_peak]
    return tuple(wants)


def _wider(spec: ModelSpec, result: Plan) -> ModelSpec | None:
    """The spec again with the batch the plan chose, where that is more than the memory model
    assumed (goal 'concurrency': sampler rows, CUDA graphs and request tables grow with it)."""
    engine = spec.engine
    batch = result.params.get(engine.batch_param)
    if getattr(engine, engine.batch_param) is not None or not batch or batch <= spec.plan.max_batch_size:
        return None
    return spec.model_copy(update={"plan": spec.plan.model_copy(update={"max_batch_size": batch})})


@dataclass(frozen=True)
class Measured:
    """A fingerprint of this model under the key of this load, and the margin to add to it."""

    fingerprint: Fingerprint
    margin: float

    def applied(self, memory: Memory) -> Memory:
        return with_measured(memory, self.fingerprint, self.margin)


def _memory(spec: ModelSpec, measured: Measured | None) -> Memory:
    return measured.applied(spec.profile()) if measured else spec.profile()


def plan(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], extra_free: Mapping[str, int] | None = None,
         measured: Measured | None = None) -> Plan:
    """Plan against `budgets`, counting `extra_free` bytes per device as free (what evictions would give),
    with max(predicted, measured) per figure where a fingerprint of this key is `measured`.
    A batch chosen larger than the memory model assumed is planned once more with it (the second
    batch is no larger: more workspace leaves fewer tokens). An engine that sizes part of its
    weights from the room (ktransformers' GPU experts) sizes them first, beside the minimum KV cache.
    A configured KV size that does not fit is answered with one that does, planned to be sure."""
    def planned(spec: ModelSpec) -> Plan:
        fitted, result = _fitted(spec, budgets, extra_free or {}, measured)
        result = result or _plan(fitted, budgets, extra_free, measured)
        wider = _wider(fitted, result)
        return _plan(wider, budgets, extra_free, measured) if wider else result
    return _hinted(spec, planned(spec), planned)


def ceiling(budgets: Mapping[str, DeviceBudget]) -> dict[str, DeviceBudget]:
    """The most each device could ever give: capacity − headroom, with no other process and no lease."""
    return {d: replace(b, foreign_bytes=0, leased_bytes=0) for d, b in budgets.items()}


def _hinted(spec: ModelSpec, result: Plan, replan: Callable[[ModelSpec], Plan]) -> Plan:
    """The plan with its KV hint confirmed: the value the arithmetic offered, planned again, and
    the next value that plan offers where it still did not fit (a few rounds); none if none fits."""
    hint = result.kv_hint
    if hint is None:
        return result
    value = hint.value
    for _ in range(8):
        if not value or value <= 0:
            value = None
            break
        try:
            tried = replan(with_overrides(spec, {spec.engine.kv_param: value}))
        except PlanRejected:  # an engine rule refuses the value: no hint rather than a wrong one
            value = None
            break
        if tried.fits:
            break
        offered = tried.kv_hint.value if tried.kv_hint else None
        value = offered if offered is not None and offered < value else None
    else:
        value = None
    reasons = list(result.reasons)
    reasons[hint.reason] = hint.say(value)
    return replace(result, reasons=tuple(reasons), kv_hint=None)


def _fitted(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], extra_free: Mapping[str, int],
            measured: Measured | None) -> tuple[ModelSpec, Plan | None]:
    """The engine's choice for the room on its smallest GPU, and its plan where one was made; where
    that plan does not fit (the engine's sum is not the planner's: granules, measurements), the
    choice for the most room whose plan fits, found by halving (to 64 MiB)."""
    devices = [gpu_id(i) for i in spec.placement.devices]
    if not devices or any(d not in budgets for d in devices):
        return spec, None  # _sized says what is missing
    room = min(budgets[d].free_bytes + extra_free.get(d, 0) for d in devices)
    fitted = spec.fitted(room)
    if fitted is spec:
        return spec, None
    result = _plan(fitted, budgets, extra_free, measured)
    if result.fits:
        return fitted, result
    low, high = 0, room
    while high - low > 64 * 2**20:
        middle = (low + high) // 2
        low, high = (middle, high) if _plan(spec.fitted(middle), budgets, extra_free, measured).fits else (low, middle)
    return spec.fitted(low), None


def _plan(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], extra_free: Mapping[str, int] | None,
          measured: Measured | None) -> Plan:
    extra_free = extra_free or {}
    memory = _memory(spec, measured)
    loads = load_leases(spec, memory)
    if HOST not in budgets:  # devices.host.enabled: false: host RAM is not leased
        loads = tuple(w for w in loads if w.device != HOST)
    free = {d: budgets[d].free_bytes + extra_free.get(d, 0) for d in budgets}
    peaks = _sum(w for w in loads if w.kind == LeaseKind.LOAD_PEAK)
    reasons = [_load_reason(d, b, free[d], budgets[d], peaks.get(d, 0)) for d, b in _sum(loads).items()
               if d in free and b > free[d]]
    # A one-phase engine holds its load peak while it allocates its KV cache: the KV room excludes it.
    one_phase = not spec.engine.two_phase
    held = _sum(loads) if one_phase else _sum(loads, LeaseKind.LOAD_PEAK)
    return _sized(spec, memory, budgets, {d: f - held.get(d, 0) for d, f in free.items()}, loads, reasons,
                  one_phase=one_phase)


def _load_reason(device: str, need: int, free: int, budget: DeviceBudget, peak: int) -> str:
    """Why the weights (and load peak) do not fit on `device`, and what to change: what may never
    fit says so (no eviction helps); the load peak is named only where there is one."""
    what = "weights + load peak" if peak else "weights"
    most = budget.capacity_bytes - budget.headroom_bytes
    if need > most:
        return (f"{device}: load needs {format_bytes(need)} ({what}), at most {format_bytes(max(most, 0))} can ever be "
                f"leased there ({format_bytes(budget.capacity_bytes)} capacity − {format_bytes(budget.headroom_bytes)} "
                f"headroom); {NEVER_FITS_FIX}")
    lower = f" or lower the load peak ({format_bytes(peak)})" if peak else ""
    return (f"{device}: load needs {format_bytes(need)} ({what}), {format_bytes(max(free, 0))} free; free "
            f"{format_bytes(need - max(free, 0))} more{lower}")


# What makes weights fit a device they can never fit as they are.
NEVER_FITS_FIX = ("use a quantized model (fewer bytes per weight), a GPU with more memory, tensor parallel over more "
                  "GPUs (placement.devices), or offload to the CPU (a hybrid engine: placement.experts: cpu)")


def plan_kv(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], measured: Measured | None = None) -> Plan:
    """Step 4 of the load protocol: the weights are leased and in; size the KV cache from what is free now."""
    free = {d: b.free_bytes for d, b in budgets.items()}

    def sized(spec: ModelSpec) -> Plan:
        result = _sized(spec, _memory(spec, measured), budgets, free)
        wider = _wider(spec, result)
        return _sized(wider, _memory(wider, measured), budgets, free) if wider else result
    return _hinted(spec, sized(spec), sized)


def _sized(spec: ModelSpec, memory: Memory, budgets: Mapping[str, DeviceBudget], room: Mapping[str, int],
           loads: tuple[LeaseWant, ...] = (), reasons: list[str] | None = None, one_phase: bool = False) -> Plan:
    """The KV cache and engine parameters from `room` (bytes per device left for KV and workspace)."""
    devices = [gpu_id(i) for i in spec.placement.devices]
    missing = [d for d in dict.fromkeys(devices + [w.device for w in loads]) if d not in budgets]
    if missing:
        return Plan(spec.name, False, 0, {}, loads, (),
                    (f"no device {', '.join(missing)} (devices: {', '.join(sorted(budgets))})",), one_phase=one_phase)
    total = min(budgets[d].total_bytes for d in devices)
    kv_tokens, params, kv_reasons, warnings, hint, sizing = size_kv(spec, memory, {d: room[d] for d in devices}, total)
    warnings = [*memory.notes, *warnings]
    reasons = [*(reasons or []), *kv_reasons]
    if hint is not None:  # its index among these reasons (the KV reason is the first of kv_reasons)
        hint = replace(hint, reason=len(reasons) - len(kv_reasons))
    return Plan(spec.name, not reasons, kv_tokens, params, loads, _steady_leases(memory, devices, kv_tokens),
                tuple(reasons), warnings=tuple(warnings), estimated=memory.estimated, profile=memory,
                placement=tuple(devices), one_phase=one_phase, kv_hint=hint, sizing=tuple(sizing))


def _steady_leases(memory: Memory, devices: list[str], kv_tokens: int) -> tuple[LeaseWant, ...]:
    wants = [LeaseWant(d, LeaseKind.KV, kv_bytes(m, kv_tokens)) for d, m in zip(devices, memory.devices)]
    wants += [LeaseWant(d, LeaseKind.RESERVE, m.workspace) for d, m in zip(devices, memory.devices) if m.workspace]
    return tuple(wants)
