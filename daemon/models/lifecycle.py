"""A model's lifecycle as the supervisor owns it: the states, the record the supervisor keeps per
model (its one writer), and what others may read of the router's traffic.

The router counts requests in its own lanes; the supervisor reads them through `Traffic` when it
builds a policy snapshot or checks that a model is idle before evicting it. Nobody but the
supervisor writes a `ModelRecord`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

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


class Traffic(Protocol):
    """The router's counters, read-only: requests running or due per model, and last use."""

    def in_flight(self, model: str) -> int: ...

    def last_used_s(self, model: str) -> float: ...

    def learned_view(self, model: str, size_bytes: int) -> dict[str, float]:
        """What the router learned of it, as `ModelView` fields: request_rate, load_cost_s, waiting,
        oldest_wait_s, starved_s, started_share."""


class NoTraffic:
    """Before a router is attached (the CLI's local plan, tests of the supervisor alone)."""

    def in_flight(self, model: str) -> int:
        return 0

    def last_used_s(self, model: str) -> float:
        return 0.0

    def learned_view(self, model: str, size_bytes: int) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class Timeouts:
    weights_s: float = 600.0
    ready_s: float = 120.0
    stop_grace_s: float = 15.0
    adopt_s: float = 30.0  # an adopted engine must answer its health check within this
    adopt_stopped_s: float = 10.0  # an engine found stopped (SIGSTOP) at adoption may resume within this
    stray_grace_s: float = 5.0  # SIGTERM to SIGKILL for engines found running but never recorded
    unload_verify_s: float = 10.0  # a stopped engine's memory must be back within this


@dataclass(frozen=True)
class ConfigChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
