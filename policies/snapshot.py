"""The frozen view policies decide over. Built by the daemon from the ledger and the supervisor;
plain values only, so a policy can be tested with hand-written snapshots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceBudget:
    """One pool's arithmetic: free = capacity − headroom − foreign − leased (negative when overrun)."""

    device: str
    total_bytes: int
    capacity_bytes: int
    headroom_bytes: int
    foreign_bytes: int
    leased_bytes: int

    @property
    def leasable_bytes(self) -> int:
        """What lessor may lease in all, before any lease: capacity − headroom − foreign."""
        return self.capacity_bytes - self.headroom_bytes - self.foreign_bytes

    @property
    def free_bytes(self) -> int:
        return self.leasable_bytes - self.leased_bytes


@dataclass(frozen=True)
class ModelView:
    name: str
    state: str  # a supervisor ModelState value: unloaded, loading, ready, unloading, failed, adopting (a previous lessord's engine, not yet checked)
    priority: int = 50
    pinned: bool = False
    in_flight: int = 0
    last_used_s: float = 0.0
    held_bytes: Mapping[str, int] = field(default_factory=dict)  # device -> bytes of all its leases
    # What the router has seen (daemon/traffic/stats.py): zero where nothing is known yet.
    request_rate: float = 0.0  # requests per second, exponentially decayed
    load_cost_s: float = 0.0  # predicted seconds one load takes (measured loads, else bytes / bandwidth)
    size_bytes: int = 0  # what it holds now, over all devices (0 unloaded: a request's need_bytes says its size)
    ready_since_s: float = 0.0  # when its current load became ready (its age against a churn age)
    waiting: int = 0  # requests waiting for it (not in flight)
    oldest_wait_s: float = 0.0  # how long the oldest of them has waited
    starved_s: float = 0.0  # how long its requests have gone unserved (0: it started the latest one)
    started_share: float = 1.0  # of its requests while it was ready, the share that started at once
    # Of the same requests, the share it kept up with: started at once, or queued behind less than
    # one full batch (its slots busy serving: saturated, not falling behind). What `value` weighs
    # its rate by, so the busiest model never looks the cheapest (daemon/traffic/stats.py).
    kept_up_share: float = 1.0
    start_rate: float = 0.0  # requests it started per second, decayed as request_rate: what it serves
    first_time: bool = False  # asked for, never served here: no history to weigh it by (an optimistic prior)
    # Elastic KV: what its KV lease could give back per device, down to its plan's min_kv_tokens,
    # with its engine running on (empty where its engine cannot resize its cache in place).
    kv_spare_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.in_flight == 0

    def quiet(self, now: float, churn_age_s: float) -> bool:
        """Idle, and neither a request nor its load within `churn_age_s`: in use by nobody now, so
        it yields its memory to a model whose requests wait, whatever the policy's weighing."""
        return self.idle and now - max(self.last_used_s, self.ready_since_s) >= churn_age_s

    def quiet_at(self, churn_age_s: float) -> float:
        """When it turns quiet if no request comes (it must be idle by then)."""
        return max(self.last_used_s, self.ready_since_s) + churn_age_s


@dataclass(frozen=True)
class Snapshot:
    devices: Mapping[str, DeviceBudget]
    models: Mapping[str, ModelView] = field(default_factory=dict)
    now_s: float = 0.0


# Above every model's priority (the config bounds it to 0..1000): what processes lessor does not
# manage already use is not up for negotiation, so any idle model may give memory back to them.
GIVE_BACK_PRIORITY = 1001


@dataclass(frozen=True)
class AdmissionRequest:
    model: str
    need_bytes: Mapping[str, int]  # device -> bytes the load holds at its peak
    priority: int = 50
    cause: str = "request"  # who asked: "request" (the router's traffic), "operator" or "restart"

    @classmethod
    def give_back(cls, device: str) -> AdmissionRequest:
        """Foreign usage grew past what the leases leave free on `device`: room for nothing new,
        only the overcommit to cover (the snapshot's negative free bytes). Decided by the policy
        like any admission."""
        return cls("", {device: 0}, GIVE_BACK_PRIORITY)

    @property
    def is_give_back(self) -> bool:
        return not self.model


@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class Evict:
    """Unload these models first (in this order), then admit. `shrink`: model -> device -> bytes
    its KV lease gives back first (elastic KV), the model kept loaded."""

    victims: tuple[str, ...]
    shrink: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    """It would fit once busy models go idle: wait and ask again. `blockers`: the ready models
    that would be evicted were they idle (empty when a load under way holds the memory)."""

    reason: str
    blockers: tuple[str, ...] = ()
    recheck_s: float | None = None  # the answer changes by itself in this many seconds (a wait that ages)


@dataclass(frozen=True)
class Rejected:
    """It does not fit, and the evictions this policy may make would not make it fit. `victims`:
    the models it could have evicted that hold memory where it is short, `freed_bytes` what they
    hold there (per device): the reason nothing was evicted."""

    reason: str
    short_bytes: Mapping[str, int]
    victims: tuple[str, ...] = ()
    freed_bytes: Mapping[str, int] = field(default_factory=dict)


Decision = Admit | Evict | Queue | Rejected
