"""The planner: turns a model spec and today's budgets into leases and engine parameters.

Pure: no I/O. It sizes the KV cache from the bytes left after the weights (the load peak is
transient and released before the KV cache is granted), applies the engine's parameter rules,
and says why nothing fits when nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from ...engines.base import Sizing
from ...policies import DeviceBudget
from ..config.schema import ModelSpec, problems_from
from ..devices.probes import HOST, gpu_id
from .rejections import PlanRejected
from ..leases import LeaseKind, LeaseWant
from ..ledger.fingerprints import Fingerprint
from .profile import DeviceMemory, Memory, with_measured
from ...memory.context import ContextLimit
from ..units import GiB, MiB, format_bytes


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
    kv_hint: "KvHint | None" = field(default=None, compare=False)  # a configured KV size refused: what to give it
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


@dataclass(frozen=True)
class KvHint:
    """The configured KV size was refused: the value of the engine's KV argument that the arithmetic
    says fits (None: none does), and how the reason reads with the value once a plan confirmed it."""

    reason: int  # its index in the plan's reasons
    value: int | None
    say: Callable[[int | None], str]


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
    kv_tokens, params, kv_reasons, warnings, hint, sizing = _size_kv(spec, memory, {d: room[d] for d in devices}, total)
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


def _context(spec: ModelSpec) -> tuple[ContextLimit, bool] | None:
    """The engine's context limit for this model (engines/*.py `context_limit`) and whether the
    engine refuses more; None where the architecture does not say the model's context."""
    if spec.architecture is None:
        return None
    limit, hard = spec.engine.context_limit(spec.architecture)
    return (limit, hard) if limit is not None else None


def _size_kv(spec: ModelSpec, memory: Memory, after_weights: Mapping[str, int],
             total_bytes: int) -> tuple[int, dict[str, Any], list[str], list[str], KvHint | None, list[str]]:
    """KV tokens and engine parameters from the bytes left on each device after the weights, never
    more than the model's context (as its engine derives it) for every sequence planned; and the
    lines that say how the size was chosen."""
    engine, goal = spec.engine, spec.plan
    fit_tokens, room = _fit_tokens(memory, after_weights)
    rate = max(m.kv_rate for m in memory.devices)
    configured = getattr(engine, engine.kv_param)
    batch = getattr(engine, engine.batch_param)
    granule = engine.kv_granule(batch or goal.max_batch_size)
    limit = _context(spec)
    per_sequence = limit[0].tokens if limit else None
    warnings, sizing = [], [_shape_line(spec)]
    # An engine that sizes its cache per sequence holds kv_param x batch tokens (vLLM, torch); the
    # others share one pool of kv_param tokens among every sequence (SGLang, llama.cpp, ktransformers).
    sequences = (batch or goal.max_batch_size) if engine.kv_per_sequence else 1
    if configured is not None:
        configured, rounded = engine.rounded_kv(configured, batch or goal.max_batch_size)
        warnings += [rounded] if rounded else []
        tokens = configured * sequences
        by = "configured"
    else:
        by = "max_kv" if goal.max_kv_tokens is not None and goal.max_kv_tokens < fit_tokens else "fit"
        tokens = fit_tokens if goal.max_kv_tokens is None else min(fit_tokens, goal.max_kv_tokens)
        tokens -= tokens % granule
    if batch is None:
        batch = goal.max_batch_size
        if goal.goal == "concurrency" and goal.context_tokens:
            batch = max(1, min(256, tokens // goal.context_tokens))
    cap = per_sequence * batch if per_sequence else None
    reasons, hint = [], None
    fitting = fit_tokens // sequences // granule * granule  # the most kv_param that fits now
    if cap is not None and limit[1]:  # never offer a value the engine refuses
        fitting = min(fitting, per_sequence if engine.kv_per_sequence else cap // granule * granule)
    of = f" ({engine.kv_param} {configured} x {engine.batch_param} {sequences})" if sequences > 1 else ""
    if configured is None and cap is not None and tokens > cap:
        tokens, by = max(granule, cap // granule * granule), "context"
    sizing.append(_kv_line(spec, tokens, by, limit, batch))
    above = _above_limit(engine, configured, sequences, batch, limit)
    if tokens > fit_tokens:
        said = f"KV cache of {tokens} tokens{of} needs {_need_and_left(int(tokens * rate), room)}"
        fewer = f" or lower {engine.batch_param}" if sequences > 1 else ""
        hint = KvHint(0, fitting, lambda v: f"{said}; lower {engine.kv_param} to {v} or free memory" if v else
                      f"{said}; no {engine.kv_param} fits: free memory{fewer}")
    elif tokens < goal.min_kv_tokens and configured is not None:
        said = f"{engine.kv_param} gives {tokens} KV tokens{of}, below plan.min_kv_tokens {goal.min_kv_tokens}"
        more = format_bytes(int(max(goal.min_kv_tokens - fitting * sequences, granule) * rate))
        hint = KvHint(0, fitting, lambda v: f"{said}; raise it to {v} (the most that fits now) or lower "
                      f"plan.min_kv_tokens" if v else f"{said}; no {engine.kv_param} that fits now reaches it: "
                      f"free {more} more or lower plan.min_kv_tokens")
    elif tokens < goal.min_kv_tokens and cap is not None and cap < goal.min_kv_tokens:
        reasons.append(f"plan.min_kv_tokens {goal.min_kv_tokens} is more than the model can use: its context "
                       f"{per_sequence} x {batch} sequences = {cap} tokens ({limit[0].basis}); lower "
                       f"plan.min_kv_tokens or raise {engine.batch_param}")
    elif tokens < goal.min_kv_tokens:
        short = int((goal.min_kv_tokens - tokens) * rate)
        reasons.append(f"only {tokens} KV tokens fit after the weights and workspace ({_precise(max(room, 0))} left), "
                       f"below plan.min_kv_tokens {goal.min_kv_tokens}; free {_precise(short)} more or lower "
                       "plan.min_kv_tokens")
        # What the load needs at least: the policy is asked to make room for this, not for the
        # sliver that fits now (evicting for a sliver would end in a KV cache too small to load).
        tokens = -(-goal.min_kv_tokens // granule) * granule
    if hint is not None:  # said as the arithmetic has it; plan() confirms the value by planning with it
        reasons.append(hint.say(hint.value))
    if above:  # after the KV reason, which the hint's index names
        (reasons if limit[1] else warnings).append(above)
    worst = max(memory.devices, key=lambda m: m.weights + m.workspace + kv_bytes(m, tokens))
    cache = max(_tokens_bytes(tokens, m.cache_rate) for m in memory.devices)
    workspace = worst.workspace + kv_bytes(worst, tokens) - int(tokens * worst.cache_rate)
    flags = engine.planned_flags(Sizing(tokens, batch, cache, len(memory.devices), workspace,
                                        worst.weights + worst.workspace + kv_bytes(worst, tokens), total_bytes,
                                        per_sequence))
    return (tokens, flags.params, reasons + flags.broken, [*warnings, *flags.warnings, *engine.env_warnings()], hint,
            sizing)


def _shape_line(spec: ModelSpec) -> str:
    a = spec.architecture
    if a is None:
        return "model shape: none given (memory.* as configured)"
    return f"model shape: {a.model_type or 'a model'} read from {a.source}" if a.source else \
        f"model shape: {a.model_type or 'a model'} from the config's architecture fields"


def _kv_line(spec: ModelSpec, tokens: int, by: str, limit, batch: int) -> str:
    """Which limit sized the KV cache: the configured value, the model's context for the planned
    batch, the plan's maximum, or the memory that fits."""
    if limit is None:
        bound = ("; no context limit known (no max_position_embeddings in the architecture): give it, or "
                 "plan.max_kv_tokens, to leave the rest of the card to other models")
    else:
        bound = (f"the model's context {limit[0].tokens} x {batch} sequences = {limit[0].tokens * batch} tokens "
                 f"({limit[0].basis})")
        bound = f"; at most {bound}" if by != "context" else f"{bound}; the rest of the card is left to other models"
    what = {"configured": f"engine.{spec.engine.kv_param} as configured", "context": "capped at ",
            "max_kv": f"capped by plan.max_kv_tokens {spec.plan.max_kv_tokens}",
            "fit": "what fits after the weights and workspace"}[by]
    return f"KV cache: {tokens} tokens, {what}{bound}"


def _above_limit(engine, configured: int | None, sequences: int, batch: int, limit) -> str | None:
    """A configured KV size (or SGLang's context_length) above the model's context: refused where
    the engine refuses it, a warning where it would only hold what no sequence can use."""
    if limit is None:
        return None
    context, hard = limit
    given_context = getattr(engine, "context_length", None)
    if given_context and given_context > context.tokens:
        return (f"engine.context_length {given_context} is above the {context.tokens} tokens {engine.title} accepts "
                f"for this model ({context.basis}); lower it to {context.tokens} or leave it unset")
    if configured is None:
        return None
    if engine.kv_per_sequence and configured > context.tokens:
        then = "it would refuse to start" if hard else "positions past it are untrained"
        return (f"engine.{engine.kv_param} {configured} is above the model's context {context.tokens} ({context.basis}): "
                f"{then}; lower it to {context.tokens} or leave it unset")
    if not engine.kv_per_sequence and configured > context.tokens * batch:
        return (f"engine.{engine.kv_param} {configured} is more than {batch} sequences can use: the model's context "
                f"{context.tokens} x {engine.batch_param} {batch} = {context.tokens * batch} tokens ({context.basis}); "
                f"the rest of the cache would sit unused")
    return None


def _precise(n: int) -> str:
    """Bytes with enough digits to compare: MiB below 10 GiB (to 0.1), GiB to 0.01 above."""
    return f"{n / MiB:.1f} MiB" if abs(n) < 10 * GiB else f"{n / GiB:.2f} GiB"


def _need_and_left(need: int, left: int) -> str:
    """What a KV cache needs against what is left, with digits enough to see the gap."""
    return (f"{_precise(need)} per device, {_precise(max(left, 0))} is left after the weights and workspace: "
            f"{_precise(need - max(left, 0))} short")
