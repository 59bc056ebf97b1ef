"""When a wait ends, estimated from what the lanes measured (daemon/traffic/lanes.py acts on it):
the Retry-After a refused request is given, what a waiting request waits for, the soonest a load
that waits could start, and whether the policy's estimate of it moved. Arithmetic over the lanes'
data; nothing here changes a lane but a wish's record of the time it was promised.

A request is never left waiting on nothing: when a load must wait, the lanes estimate when it
could start at the soonest (the policy's recheck, the blockers' requests at their measured
service time) and, with `refuse_late`, answer at once (NotServedInTime, a 503 with that time as
Retry-After) the requests that its load would reach only after their wait timeout. A policy's
estimate that came due and was not kept (weighed again then, still "wait", further off: the
model it waits for is still asked) is a moving target: its requests are answered then, not at
their timeout. An unknown estimate is no reason to refuse: such a request waits, and is weighed
again as things change. lessord refuses late (LaneRules.of); the simulator chooses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..models.lifecycle import ModelState
from .lane import NEVER, Lane, LaneRules, LoadWish
from .request_errors import NotServedInTime

# A policy's recheck (its answer ages) is looked at no later than this: memory that processes
# lessor does not manage free changes the answer without any model changing state.
RECHECK_CAP_S = 30.0


def retry_after_s(lane: Lane, rules: LaneRules, now: float) -> float:
    """When a request refused now would likely get its turn: what is left of the model's load
    (its last measured one, else `retry_after_loading_s`), then the requests ahead of it
    over the slots at the measured time a request holds one (else `retry_after_busy_s`
    for the queue). Never over the wait timeout, never under a second."""
    wait = 0.0
    if lane.record.state is not ModelState.READY:
        wish, measured = lane.load, lane.load_s
        if measured is None:
            wait = rules.retry_after_loading_s
        else:
            wait = max(0.0, measured - (now - wish.asked_s)) if wish is not None else measured
    service = lane.service_s()
    if service is None:
        wait += rules.retry_after_busy_s if lane.record.state is ModelState.READY else 0.0
    else:
        wait += (len(lane.waiting) + 1) * service / max(1, lane.slots or lane.active or 1)
    return min(max(1.0, wait), rules.wait_timeout_s)


def waiting_for(lane: Lane) -> str:
    if lane.drain_from is not NEVER:
        return f"other models' turn ({', '.join(sorted(lane.drains))})"
    if lane.record.state is ModelState.READY:
        return f"a free slot (max_concurrency {lane.slots})"
    waiting = getattr(lane.record, "waiting", None)  # lessord's record says why its load waits
    if lane.record.state is ModelState.WAITING and waiting is not None:
        return f"its load, which waits: {waiting.reason}"
    return f"its load (state {lane.record.state.value})"


def moved(wish: LoadWish, now: float, start_s: float | None) -> float | None:
    """The policy's estimate that came due and was not kept (the seconds it had said), or None.
    A new estimate replaces one not yet due only when it is sooner: one that moves later
    before its time is still held to the time first said."""
    if start_s is None:
        wish.promised_s = None
        return None
    promised_s, said_s = wish.promised_s, wish.promised_in_s
    if promised_s is not None and now >= promised_s and now + start_s > promised_s:
        wish.promised_s = None
        return said_s
    if promised_s is None or now >= promised_s or now + start_s < promised_s:
        wish.promised_s, wish.promised_in_s = now + start_s, start_s
    return None


def start_in_s(lanes: Mapping[str, Lane], blockers: tuple[str, ...], recheck_s: float | None) -> float | None:
    """The soonest a waiting load could start, from what will change: the blockers' requests
    done at their measured service time, or the policy's own recheck. None: unknown."""
    if blockers:
        left = [work_left_s(lanes.get(name)) for name in blockers]
        known = [s for s in left if s is not None]
        return max(known) if len(known) == len(left) else None
    return recheck_s


def work_left_s(lane: Lane | None) -> float | None:
    if lane is None or not lane.in_flight:
        return 0.0
    service = lane.service_s()
    if service is None:
        return None
    return lane.in_flight * service / max(1, lane.slots or lane.active or 1)


def retry_delay_s(rules: LaneRules, recheck_s: float | None) -> float | None:
    """How soon a waiting load is weighed again by itself: the rules' retry, or the policy's
    recheck (at most RECHECK_CAP_S away, so freed memory is still seen), whichever is later."""
    retry_s = rules.retry_s
    if recheck_s is None:
        return retry_s
    recheck_s = min(recheck_s, RECHECK_CAP_S)
    return recheck_s if retry_s is None else max(retry_s, recheck_s)


def too_late(model: str, rules: LaneRules, now: float, deadline_s: float, start_s: float, ready_s: float,
             missed_s: float | None, blockers: tuple[str, ...], reason: str) -> NotServedInTime:
    """The answer to a request its model's load would reach past its deadline (`ready_s`), or
    at once when the policy's estimate moved (`missed_s`)."""
    waits_for = f"it waits for {', '.join(blockers)} to finish their requests" if blockers else ""
    why = "; ".join(part for part in (reason, waits_for) if part) or "its load waits"
    retry_s = math.ceil(min(max(1.0, start_s), rules.wait_timeout_s))  # Retry-After is whole seconds
    return NotServedInTime(model, rules.wait_timeout_s, why, retry_after_s=retry_s, expected_s=ready_s - now,
                           left_s=max(0.0, deadline_s - now), missed_s=missed_s)


def recheck_in_s(wish: LoadWish, rules: LaneRules, now: float) -> float | None:
    """In how many seconds a waiting load is weighed again by itself: its blockers' drain
    patience, or the retry; None: only when something changes."""
    at = wish.look_at_s
    if wish.blockers:
        patience_s = wish.asked_s + rules.drain_after_s if rules.drain_after_s is not None else NEVER
        at = patience_s if patience_s > now else None
    return None if at is None else round(max(0.0, at - now), 3)
