"""Admission and eviction policies. Pure decisions over a Snapshot: no I/O, no logging, no state.

Each policy only chooses *which* models may be evicted and in what order; the arithmetic of
"does it fit after evicting these" is shared so every policy answers the same way. Before any
eviction, `shrink_to_cover` tries the lighter lever: where the idle models it could evict can give
back enough of their KV caches (elastic KV, `ModelView.kv_spare_bytes`), they shrink and stay.

One rule binds every policy that evicts: a *quiet* model (nothing in flight, no request and no
load within the churn age) yields to a model whose requests wait, when nothing the policy would
rather evict makes the room; the policy's own order says which quiet model goes. A request is
never left waiting on a model nobody uses (Ollama and llama-swap swap at once): it waits only for
busy models, or for an idle one to turn quiet (the `Queue` says when), or it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .snapshot import AdmissionRequest, Admit, Decision, Evict, ModelView, Queue, Rejected, Snapshot

Policy = Callable[[AdmissionRequest, Snapshot], Decision]

# policy.churn_age's default: how long an idle model goes unasked before it yields to a waiting
# one, where no churn_age_s is given (PolicyConfig.build gives lru_idle, priority and value the
# configured one).
CHURN_AGE_S = 60.0


def shortfall(request: AdmissionRequest, snapshot: Snapshot) -> dict[str, int]:
    """Bytes missing per device for the request to fit now; empty when it fits. A give-back needs
    nothing new: it is short by the overcommit alone."""
    short = {}
    for device, need in request.need_bytes.items():
        budget = snapshot.devices.get(device)
        free = budget.free_bytes if budget else 0
        if (need > 0 or request.is_give_back) and need > free:
            short[device] = need - free
    return short


def _size(n: int) -> str:
    """Bytes as the daemon's messages write them (daemon/units.py format_bytes: 1.5 GiB, 512.0 MiB)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _describe(short: dict[str, int]) -> str:
    return ", ".join(f"{_size(b)} on {d}" for d, b in sorted(short.items()))


def holds_on(model: ModelView, devices: Iterable[str]) -> bool:
    """It holds memory on one of `devices` at least."""
    return any(model.held_bytes.get(d, 0) > 0 for d in devices)


def _held(short: dict[str, int], victims: Iterable[ModelView]) -> dict[str, int]:
    """What the victims hold on the devices where the request is short."""
    return {d: sum(v.held_bytes.get(d, 0) for v in victims) for d in short}


def free_with(short: dict[str, int], models: Iterable[ModelView]) -> tuple[list[str], dict[str, int]]:
    """Take models in order while they still help; return the victims and what stays short."""
    remaining = dict(short)
    victims = []
    for model in models:
        if not remaining:
            break
        if not holds_on(model, remaining):
            continue
        victims.append(model.name)
        deduct(remaining, model)
    return victims, remaining


def deduct(remaining: dict[str, int], victim: ModelView) -> None:
    """What stays short per device once `victim` is gone (devices it covers drop out)."""
    for device in list(remaining):
        remaining[device] -= victim.held_bytes.get(device, 0)
        if remaining[device] <= 0:
            del remaining[device]


def shrink_to_cover(short: dict[str, int], models: Iterable[ModelView]) -> dict[str, dict[str, int]] | None:
    """model -> device -> bytes: what the idle `models` (in this order) give back of their KV leases
    to cover `short` on every device, taking no more than is short; None where all they could give
    would not cover it (then nothing is shrunk: evicting makes the room instead)."""
    remaining = dict(short)
    shrink: dict[str, dict[str, int]] = {}
    for model in models:
        if not model.idle:
            continue
        for device in list(remaining):
            take = min(model.kv_spare_bytes.get(device, 0), remaining[device])
            if take > 0:
                shrink.setdefault(model.name, {})[device] = take
                remaining[device] -= take
                if remaining[device] <= 0:
                    del remaining[device]
    return None if remaining else shrink


def decide_with_candidates(request: AdmissionRequest, snapshot: Snapshot,
                           eligible: Callable[[ModelView], bool], order: Callable[[ModelView], tuple],
                           churn_age_s: float = CHURN_AGE_S) -> Decision:
    short = shortfall(request, snapshot)
    if not short:
        return Admit()
    evictable = sorted((m for m in snapshot.models.values()
                        if m.name != request.model and not m.pinned and m.held_bytes), key=order)
    others = [m for m in evictable if eligible(m)]
    shrink = shrink_to_cover(short, others)
    if shrink:
        return Evict((), shrink)
    victims, remaining = free_with(short, (m for m in others if m.idle))
    if not remaining:
        return Evict(tuple(victims))
    if yields_to(request):
        now = snapshot.now_s
        # The models this policy would not evict join the ones it would, once they are quiet.
        yielding = (m for m in evictable if m.idle and (eligible(m) or m.quiet(now, churn_age_s)))
        victims, remaining = free_with(short, yielding)
        if not remaining:
            return Evict(tuple(victims))
        waiting = turns_quiet(short, [m for m in evictable if not eligible(m)], now,
                              lambda m: m.quiet_at(churn_age_s), [m for m in others if m.idle])
        if waiting is not None:
            return waiting
    _, still_short = free_with(short, others)
    if not still_short:
        # Whom it would evict were every ready model idle: the models a waiting load waits for.
        blockers, uncovered = free_with(short, (m for m in others if m.state == "ready"))
        # The reason says no figure: the answer that carries it (ModelsBusy) gives the shortfall once.
        return Queue("the models that could make room are busy", () if uncovered else tuple(blockers))
    return rejected(short, still_short, others)


def yields_to(request: AdmissionRequest) -> bool:
    """Quiet models yield to this load: requests wait for it (no request waits for an operator's
    load, a restart's or a give-back)."""
    return request.cause == "request" and not request.is_give_back


def turns_quiet(short: dict[str, int], idle_later: Sequence[ModelView], now: float,
                quiet_at: Callable[[ModelView], float], idle_now: Sequence[ModelView] = ()) -> Queue | None:
    """The load waits for idle models to turn quiet (`quiet_at`: when one does if nobody asks for
    it): a Queue that says when enough of them (with `idle_now`, evictable already) make the room;
    None where they never would (busy models hold the room)."""
    remaining = dict(short)
    for model in idle_now:
        deduct(remaining, model)
    waited_for = []
    for model in sorted((m for m in idle_later if m.idle and holds_on(m, short)), key=quiet_at):
        if not remaining:
            break
        deduct(remaining, model)
        waited_for.append(model)
    if remaining or not waited_for:
        return None
    quiet_in = max(1.0, quiet_at(waited_for[-1]) - now)
    names = ", ".join(m.name for m in waited_for)
    return Queue(f"{names} idle, but asked for too recently to yield: it does in {quiet_in:.0f} s unless asked "
                 "again (policy.churn_age)", (), quiet_in)


def rejected(short: dict[str, int], still_short: dict[str, int], others: Iterable[ModelView]) -> Rejected:
    """Evicting every one of `others` would still leave `still_short`: nothing is evicted."""
    helping = [m for m in others if holds_on(m, short)]
    freed = _held(short, helping)
    if not helping:
        why = f"{_describe(short)} short and no model this policy may evict holds memory there: nothing evicted"
    else:
        against = ", ".join(f"{_size(freed[d])} of the {_size(b)} short on {d}" for d, b in sorted(short.items()))
        why = f"evicting {', '.join(m.name for m in helping)} would free {against}: not enough, nothing evicted"
    return Rejected(why, still_short, tuple(m.name for m in helping), freed)


def fit(request: AdmissionRequest, snapshot: Snapshot) -> Decision:
    """Admit only what fits beside the models already loaded; never evict."""
    short = shortfall(request, snapshot)
    if not short:
        return Admit()
    return Rejected(f"{_describe(short)} short, and policy 'fit' never evicts: nothing evicted", short)


def lru_idle(request: AdmissionRequest, snapshot: Snapshot, churn_age_s: float = CHURN_AGE_S) -> Decision:
    """Evict idle, unpinned models, least recently used first."""
    return decide_with_candidates(request, snapshot, eligible=lambda m: True,
                                  order=lambda m: (m.last_used_s, m.name), churn_age_s=churn_age_s)


def priority(request: AdmissionRequest, snapshot: Snapshot, churn_age_s: float = CHURN_AGE_S) -> Decision:
    """Evict idle, unpinned models of lower priority than the request: lowest first, then LRU (a
    quiet model of any priority yields to waiting requests, after `churn_age_s` unasked)."""
    return decide_with_candidates(request, snapshot, eligible=lambda m: m.priority < request.priority,
                                  order=lambda m: (m.priority, m.last_used_s, m.name), churn_age_s=churn_age_s)


