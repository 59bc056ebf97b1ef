"""A model's lifecycle as the supervisor owns it: the states, why a load waits, and the record the
supervisor keeps per model (its one writer: nobody but the supervisor writes a `ModelRecord`).

Beside it: the engines' time bounds (timeouts.py), what the supervisor reads of the router's
traffic (traffic_counters.py), and what a config reload changed (daemon/config/changes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ...engines.base import EngineHandle
from ..config.model_spec import ModelSpec
from ..planning.planner import Plan
from .timeline import LoadTimeline


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"
    # After a restart, while the previous lessord's engine is checked: served 503 with Retry-After,
    # never loaded a second time meanwhile; it ends ready (adopted) or unloaded (stopped, gone).
    ADOPTING = "adopting"
    # Requests wait for it, but its admission said the load must wait (busy models, a policy that
    # weighs it again later): it holds nothing, like unloaded, and says why (ModelRecord.waiting).
    # It ends loading (admitted) or unloaded (no request waits for it any more).
    WAITING = "waiting"


# Holding no memory: what a load may start from.
UNLOADED_LIKE = (ModelState.UNLOADED, ModelState.WAITING)


@dataclass(frozen=True)
class Waiting:
    """Why a model's load waits, as its last admission said: the policy's reason, the busy models
    whose eviction would make room (`blockers`), and when the policy's answer changes by itself
    (`recheck_s` from `since_s`, None: only when memory or a blocker changes)."""

    reason: str
    blockers: tuple[str, ...] = ()
    recheck_s: float | None = None
    since_s: float = 0.0


@dataclass
class ModelRecord:
    """One configured model, as the supervisor sees it. Read by everyone, written by the supervisor."""

    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    ready_at_s: float = 0.0  # when it last became ready (idle time counts from here until a request)
    error: str = ""
    plan: Plan | None = None
    handle: EngineHandle | None = field(default=None, repr=False)
    attempt: str = ""  # the load attempt whose leases the running engine holds
    overrun: dict[str, Any] | None = None  # while the reconciler measures it above its leases
    generation: int = 0  # engine starts so far: an exit report from an older start is ignored
    last_load: LoadTimeline | None = None  # where its last successful load's time went
    waiting: Waiting | None = None  # while WAITING: why
