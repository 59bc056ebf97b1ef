"""Admission: a load's plan put to the policy (`decide`, the one function lessord's supervisor,
its reconciler's give-back and the policy simulator all ask), and what an admission answers when
the load cannot go now: `MustWait`, the ModelsBusy it carries (what is short, and which busy
models the load waits for), `refused` (the policy rejected it: NotEnoughMemory), `never_fits`
(no eviction or wait could ever make room: ModelTooLarge), and what evicting models would free;
and the admission's log line. Pure: it reads a policy snapshot and changes nothing."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ...policies import (
    AdmissionRequest,
    Admit,
    Decision,
    DeviceBudget,
    Evict,
    Policy,
    Queue,
    Rejected,
    Snapshot,
    shortfall,
)
from ..config.model_spec import ModelSpec
from ..leases import LeaseKind
from ..units import format_bytes
from . import planner
from .planner import NEVER_FITS_FIX, Measured, Plan, ceiling
from .rejections import ModelsBusy, ModelTooLarge, NotEnoughMemory

log = logging.getLogger("lessor.supervisor")  # the load's lines, under the supervisor's name

Planner = Callable[[ModelSpec, Mapping[str, DeviceBudget], Measured | None], Plan]


@dataclass(frozen=True)
class GiveBack:
    """Not a load: foreign usage grew past what the leases leave free on `device`, and the policy
    is asked which models give memory back (the reconciler's question)."""

    device: str


@dataclass(frozen=True)
class Admission:
    """The policy's answer (`decision`: Admit, Evict these first, Queue, Rejected) to `request`,
    the load's worst moment as `plan` says it (None for a give-back). An admitted load goes with
    this plan; one that evicted first plans again, against the memory the evictions freed."""

    request: AdmissionRequest
    decision: Decision
    plan: Plan | None = None

    @property
    def admitted(self) -> bool:
        """Admitted as it is: nothing to evict or shrink first."""
        return isinstance(self.decision, Admit)


def _planned(spec: ModelSpec, budgets: Mapping[str, DeviceBudget], measured: Measured | None) -> Plan:
    return planner.plan(spec, budgets, measured=measured)


def decide(spec: ModelSpec | GiveBack, snapshot: Snapshot, measured: Measured | None, policy: Policy,
           cause: str = "request", plan: Planner | None = None) -> Admission:
    """Plan against the snapshot's budgets (with the model's fingerprint, `measured`), then ask
    `policy` for the plan's worst moment. `plan`: the planner (the simulator's keeps its answers per
    state of the leases; the baselines it compares with ask for an estimate of their own)."""
    if isinstance(spec, GiveBack):
        request = AdmissionRequest.give_back(spec.device)
        return Admission(request, policy(request, snapshot))
    first = (plan or _planned)(spec, snapshot.devices, measured)
    request = AdmissionRequest(spec.name, first.peak_need(), spec.priority, cause)
    return Admission(request, policy(request, snapshot), first)


def shown(spec: ModelSpec, snapshot: Snapshot, measured: Measured | None, admission: Admission) -> Plan:
    """What a load would do now (a dry run): the plan, with the evictions the policy would make
    and the plan once they freed their memory, or why the policy would not let it go."""
    decision, first = admission.decision, admission.plan
    assert first is not None
    if isinstance(decision, Evict):
        result = planner.plan(spec, snapshot.devices, freed_by(snapshot, decision.victims, decision.shrink), measured)
        return dataclasses.replace(result, evictions=decision.victims)
    if isinstance(decision, (Rejected, Queue)) and first.fits:
        return dataclasses.replace(first, fits=False, reasons=(decision.reason,))
    return first


@dataclass(frozen=True)
class MustWait:
    """The load would fit once busy models finish their requests: the policy queued it.
    `blockers` are the models whose eviction would make room (the router drains them)."""

    error: ModelsBusy
    recheck_s: float | None = None  # the policy's answer changes by itself by then (Queue.recheck_s)
    reason: str = ""  # the policy's words (the error's hint adds what frees it)

    @property
    def blockers(self) -> tuple[str, ...]:
        return self.error.blockers

    def after(self, earlier: str) -> MustWait:
        """The same wait, its reason led by what the earlier attempts of the load said."""
        return MustWait(dataclasses.replace(self.error, hint=f"{earlier}; then: {self.error.hint}"), self.recheck_s,
                        self.reason)


def must_wait(request: AdmissionRequest, snapshot: Snapshot, reason: str, blockers: tuple[str, ...],
              recheck_s: float | None = None) -> MustWait:
    if recheck_s is not None and not blockers:
        hint = f"{reason}; it is weighed again in {recheck_s:.0f} s, or when memory changes"
    else:
        hint = f"{reason}; it loads once {', '.join(blockers) or 'they'} finish their requests"
    return MustWait(ModelsBusy(request.model, *worst_shortfall(snapshot.devices, shortfall(request, snapshot)),
                               hint, blockers=blockers), recheck_s, reason)


def freed_by(snapshot: Snapshot, victims: tuple[str, ...],
             shrink: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, int]:
    """Bytes per device the victims hold: what their eviction would free (and the KV caches
    shrunk first, `shrink`, give back)."""
    freed: dict[str, int] = {}
    for held in [*(snapshot.models[name].held_bytes for name in victims), *(shrink or {}).values()]:
        for device, b in held.items():
            freed[device] = freed.get(device, 0) + b
    return freed


def shortest(budgets: Mapping[str, DeviceBudget], need_bytes: Mapping[str, int]) -> tuple[str, int, int]:
    """(device, bytes needed there, bytes free there) where need − free is largest: the numbers
    of one device, from one snapshot (free may be negative; the error's message never shows it so)."""
    def free(device: str) -> int:
        return budgets[device].free_bytes if device in budgets else 0
    device = max(need_bytes, key=lambda d: (need_bytes[d] - free(d), d)) if need_bytes else "devices"
    return device, need_bytes.get(device, 0), free(device)


def refused(request: AdmissionRequest, snapshot: Snapshot, decision: Rejected, policy: str) -> NotEnoughMemory:
    """Policy `policy` rejected an explicit load: what it needs and what is free on its shortest
    device, and, once, what evicting would have freed there and what to change."""
    device, wanted, free = shortest(snapshot.devices, request.need_bytes)
    holders = sorted(m.name for m in snapshot.models.values()
                     if m.name != request.model and m.held_bytes.get(device, 0))
    if decision.victims:
        why = (f"evicting {', '.join(decision.victims)} (every model policy '{policy}' may evict) would free only "
               f"{format_bytes(decision.freed_bytes.get(device, 0))} there")
    elif not holders:
        why = "no other model holds memory there"
    elif policy == "fit":
        why = f"policy 'fit' never evicts ({', '.join(holders)} hold memory there)"
    else:
        why = (f"policy '{policy}' may evict none of the models holding it ({', '.join(holders)}: pinned, or of "
               "higher priority)")
    return NotEnoughMemory(request.model, device, wanted, free,
                           f"{why}; free memory on {device} or give this model a smaller KV cache (plan.max_kv_tokens)")


def as_reload(snapshot: Snapshot, model: str) -> Snapshot:
    """The snapshot with `model`'s own leases counted as free (a plan of a loaded model is a plan
    of its reload: what it holds now would be its own again)."""
    view = snapshot.models.get(model)
    if view is None or not view.held_bytes:
        return snapshot
    held = dict(view.held_bytes)
    devices = {d: dataclasses.replace(b, leased_bytes=b.leased_bytes - held.get(d, 0))
               for d, b in snapshot.devices.items()}
    models = {**snapshot.models, model: dataclasses.replace(view, held_bytes={})}
    return Snapshot(devices, models, snapshot.now_s)


def never_fits(spec: ModelSpec, budgets: Mapping[str, DeviceBudget],
               measured: Measured | None = None) -> ModelTooLarge | None:
    """ModelTooLarge where the model needs more on a device than lessor could ever lease there
    (capacity − headroom: every other model evicted, no other process); None where it could fit."""
    top = ceiling(budgets)
    alone = planner.plan(spec, top, measured=measured)
    over = {d: need - top[d].leasable_bytes for d, need in alone.peak_need().items()
            if d in top and need > top[d].leasable_bytes}
    if not over:
        return None
    device = max(over, key=lambda d: (over[d], d))
    budget = top[device]
    loads = [w for w in alone.load_leases if w.device == device]
    weights = sum(w.bytes for w in loads)
    if weights > budget.leasable_bytes or not alone.reasons:
        what = "weights and load peak" if any(w.kind == LeaseKind.LOAD_PEAK and w.bytes for w in loads) else "weights"
        hint = f"its {what} alone need {format_bytes(weights)}: {NEVER_FITS_FIX}"
    else:  # the weights fit: its KV cache (or workspace) does not beside them, even alone
        hint = "its KV cache does not fit beside the weights even alone: " + "; ".join(alone.reasons)
    return ModelTooLarge(spec.name, device, alone.peak_need()[device], budget.leasable_bytes, hint,
                         capacity_bytes=budget.capacity_bytes, headroom_bytes=budget.headroom_bytes)


def log_admission(request: AdmissionRequest, decision: Decision, policy: str, again: bool = False) -> None:
    """Step 2's line: the policy's answer, and the peak it was asked for (`again`: a waiting load
    weighed again to the same wait, at DEBUG). The attempt's own plan (made once the evictions
    freed their memory) has a line of its own."""
    model, need = request.model, bytes_text(request.need_bytes)
    extra = {"model": model, "step": "admission", "result": type(decision).__name__.lower()}
    if isinstance(decision, Evict):
        log.info("%s: admitted by %s after %s (peak %s)", model, policy, _making_room(decision), need, extra=extra)
    elif isinstance(decision, Queue):
        log.log(logging.DEBUG if again else logging.INFO, "%s: queued behind %s (peak %s): %s", model,
                ", ".join(decision.blockers) or "busy models", need, decision.reason, extra=extra)
    elif isinstance(decision, Rejected):
        log.info("%s: not admitted by %s (peak %s): %s", model, policy, need, decision.reason, extra=extra)
    else:
        log.info("%s: admitted by %s (peak %s)", model, policy, need, extra=extra)


def _making_room(decision: Evict) -> str:
    shrunk = [f"shrinking {m}'s KV cache by {bytes_text(give)}" for m, give in decision.shrink.items()]
    return ", then ".join([*shrunk, *([f"evicting {', '.join(decision.victims)}"] if decision.victims else [])])


def attempts_text(failures: list[str], then: str | None = None) -> str:
    parts = [f"attempt {i}: {text}" for i, text in enumerate(failures, 1)]
    if then:
        parts.append(f"attempt {len(failures) + 1}: {then}")
    return "; ".join(parts)


def worst_shortfall(budgets: Mapping[str, DeviceBudget], short_bytes: Mapping[str, int]) -> tuple[str, int, int]:
    """(device, bytes wanted there, bytes free there) for the device the request is shortest on."""
    device, short = max(short_bytes.items() or [("devices", 0)], key=lambda kv: kv[1])
    free = budgets[device].free_bytes if device in budgets else 0
    return device, free + short, free


def bytes_text(per_device: Mapping[str, int]) -> str:
    return ", ".join(f"{device} {format_bytes(n)}" for device, n in sorted(per_device.items())) or "nothing"
