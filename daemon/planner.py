"""The planner: turns a model spec and today's budgets into leases and engine parameters.

Pure: no I/O. It sizes the KV cache from the bytes left after the weights (the load peak is
transient and released before the KV cache is granted), applies the engine's parameter rules,
and says why nothing fits when nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError

from ..engines.base import Sizing
from ..policies import DeviceBudget
from .config import ModelSpec, problems_from
from .devices import HOST, gpu_id
from .errors import PlanRejected
from .ledger import LeaseKind, LeaseWant
from .fingerprints import Fingerprint
from .profile import DeviceMemory, Memory, with_measured
from .units import format_bytes


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
                "fingerprint": dict(self.fingerprint) if self.fingerprint else None}


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
    weights from the room (ktransformers' GPU experts) sizes them first, beside the minimum KV cache."""
    spec, result = _fitted(spec, budgets, extra_free or {}, measured)
    result = result or _plan(spec, budgets, extra_free, measured)
    wider = _wider(spec, result)
    return _plan(wider, budgets, extra_free, measured) if wider else result


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
    reasons = [f"{d}: load needs {format_bytes(b)} (weights + load peak), {format_bytes(max(free[d], 0))} free; free "
               f"{format_bytes(b - free[d])} more or lower the load peak" for d, b in _sum(loads).items()
               if d in free and b > free[d]]
    # A one-phase engine holds its load peak while it allocates its KV cache: the KV room excludes it.
    one_phase = not spec.engine.two_phase
    held = _sum(loads) if one_phase else _sum(loads, LeaseKind.LOAD_PEAK)
    return _sized(spec, memory, budgets, {d: f - held.get(d, 0) for d, f in free.items()}, loads, reasons,
                  one_phase=one_phase)


def plan_kv(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], measured: Measured | None = None) -> Plan:
    """Step 4 of the load protocol: the weights are leased and in; size the KV cache from what is free now."""
    free = {d: b.free_bytes for d, b in budgets.items()}
    result = _sized(spec, _memory(spec, measured), budgets, free)
    wider = _wider(spec, result)
    return _sized(wider, _memory(wider, measured), budgets, free) if wider else result


def _sized(spec: ModelSpec, memory: Memory, budgets: Mapping[str, DeviceBudget], room: Mapping[str, int],
           loads: tuple[LeaseWant, ...] = (), reasons: list[str] | None = None, one_phase: bool = False) -> Plan:
    """The KV cache and engine parameters from `room` (bytes per device left for KV and workspace)."""
    devices = [gpu_id(i) for i in spec.placement.devices]
    missing = [d for d in dict.fromkeys(devices + [w.device for w in loads]) if d not in budgets]
    if missing:
        return Plan(spec.name, False, 0, {}, loads, (),
                    (f"no device {', '.join(missing)} (devices: {', '.join(sorted(budgets))})",), one_phase=one_phase)
    total = min(budgets[d].total_bytes for d in devices)
    kv_tokens, params, kv_reasons, warnings = _size_kv(spec, memory, {d: room[d] for d in devices}, total)
    warnings = [*memory.notes, *warnings]
    reasons = [*(reasons or []), *kv_reasons]
    return Plan(spec.name, not reasons, kv_tokens, params, loads, _steady_leases(memory, devices, kv_tokens),
                tuple(reasons), warnings=tuple(warnings), estimated=memory.estimated, profile=memory,
                placement=tuple(devices), one_phase=one_phase)


def _steady_leases(memory: Memory, devices: list[str], kv_tokens: int) -> tuple[LeaseWant, ...]:
    wants = [LeaseWant(d, LeaseKind.KV, kv_bytes(m, kv_tokens)) for d, m in zip(devices, memory.devices)]
    wants += [LeaseWant(d, LeaseKind.RESERVE, m.workspace) for d, m in zip(devices, memory.devices) if m.workspace]
    return tuple(wants)


def kv_bytes(device: DeviceMemory, tokens: int) -> int:
    """The KV lease of one device: the cache and what grows with it (a context-sized buffer)."""
    return _tokens_bytes(tokens, device.kv_rate)


def _tokens_bytes(tokens: int, rate: float) -> int:
    """Bytes for `tokens` at a rate that may be fractional, rounded up (to a thousandth of a byte first)."""
    return -(-int(tokens * rate * 1000) // 1000)


def _fit_tokens(memory: Memory, after_weights: Mapping[str, int]) -> tuple[int, int]:
    """KV tokens that fit on every device, and the room (bytes after weights and workspace) of the
    device that limits them."""
    rooms = [(after_weights[d] - m.workspace, m.kv_rate) for d, m in zip(after_weights, memory.devices)]
    fits = [max(0, int(room // rate)) if rate else 1 << 40 for room, rate in rooms]
    limiting = min(range(len(fits)), key=fits.__getitem__)
    return fits[limiting], rooms[limiting][0]


def _size_kv(spec: ModelSpec, memory: Memory, after_weights: Mapping[str, int],
             total_bytes: int) -> tuple[int, dict[str, Any], list[str], list[str]]:
    """KV tokens and engine parameters from the bytes left on each device after the weights."""
    engine, goal = spec.engine, spec.plan
    fit_tokens, room = _fit_tokens(memory, after_weights)
    rate = max(m.kv_rate for m in memory.devices)
    configured = getattr(engine, engine.kv_param)
    batch = getattr(engine, engine.batch_param)
    granule = engine.kv_granule()
    if configured is not None:
        tokens = configured * ((batch or goal.max_batch_size) if engine.kv_per_sequence else 1)
    else:
        tokens = fit_tokens if goal.max_kv_tokens is None else min(fit_tokens, goal.max_kv_tokens)
        tokens -= tokens % granule
    if batch is None:
        batch = goal.max_batch_size
        if goal.goal == "concurrency" and goal.context_tokens:
            batch = max(1, min(256, tokens // goal.context_tokens))
    reasons = []
    if tokens > fit_tokens:
        reasons.append(f"KV cache of {tokens} tokens needs {format_bytes(int(tokens * rate))} per device, "
                       f"{format_bytes(max(room, 0))} is left after the weights and workspace; lower {engine.kv_param} "
                       f"to {fit_tokens - fit_tokens % granule} or free memory")
    elif tokens < goal.min_kv_tokens and configured is not None:
        reasons.append(f"{engine.kv_param} gives {tokens} KV tokens, below plan.min_kv_tokens {goal.min_kv_tokens}; "
                       f"raise it (up to {fit_tokens - fit_tokens % granule} fit now) or lower plan.min_kv_tokens")
    elif tokens < goal.min_kv_tokens:
        reasons.append(f"only {tokens} KV tokens fit after the weights and workspace ({format_bytes(max(room, 0))} left), "
                       f"below plan.min_kv_tokens {goal.min_kv_tokens}; free "
                       f"{format_bytes(int((goal.min_kv_tokens - tokens) * rate))} more")
        # What the load needs at least: the policy is asked to make room for this, not for the
        # sliver that fits now (evicting for a sliver would end in a KV cache too small to load).
        tokens = -(-goal.min_kv_tokens // granule) * granule
    worst = max(memory.devices, key=lambda m: m.weights + m.workspace + kv_bytes(m, tokens))
    cache = max(_tokens_bytes(tokens, m.cache_rate) for m in memory.devices)
    workspace = worst.workspace + kv_bytes(worst, tokens) - int(tokens * worst.cache_rate)
    flags = engine.planned_flags(Sizing(tokens, batch, cache, len(memory.devices), workspace,
                                        worst.weights + worst.workspace + kv_bytes(worst, tokens), total_bytes))
    return tokens, flags.params, reasons + flags.broken, [*flags.warnings, *engine.env_warnings()]
