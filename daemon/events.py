"""Events: facts that happened, as frozen dataclasses of plain fields. A leaf module.

The bus fans each event out to bounded subscriber queues; a slow subscriber (an SSE client,
the MQTT publisher) loses its oldest events and a counter says how many, never blocking the
publisher (admission, loads) behind it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, Enum) else v for k, v in items}


class AdmissionResult(str, Enum):
    """What a policy decided (the names of policies.Decision's kinds)."""

    ADMIT = "admit"
    EVICT = "evict"
    QUEUE = "queue"
    REJECTED = "rejected"


class OverrunAction(str, Enum):
    REPORTED = "reported"  # over its leases: an event, a metric, the API
    STOPPED = "stopped"  # over its leases and reconciler.on_overrun is 'stop'
    CLEARED = "cleared"  # back within its leases


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    at_s: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (an enum as its value): what SSE and MQTT send."""
        return {"type": self.type, **dataclasses.asdict(self, dict_factory=_plain)}


@dataclass(frozen=True)
class LeaseGranted(Event):
    type: ClassVar[str] = "lease_granted"
    lease_id: str
    model: str
    device: str
    kind: str
    bytes: int


@dataclass(frozen=True)
class LeaseReleased(Event):
    type: ClassVar[str] = "lease_released"
    lease_id: str
    model: str
    device: str
    kind: str
    bytes: int
    reason: str


@dataclass(frozen=True)
class LeaseResized(Event):
    """A granted lease's size changed in place (elastic KV: shrunk to let a load through, grown
    back when memory sits idle); its id, owner and kind stay."""

    type: ClassVar[str] = "lease_resized"
    lease_id: str
    model: str
    device: str
    kind: str
    from_bytes: int
    bytes: int
    reason: str


@dataclass(frozen=True)
class ModelStateChanged(Event):
    type: ClassVar[str] = "model_state"
    model: str
    state: str
    previous: str
    reason: str = ""


@dataclass(frozen=True)
class EngineExited(Event):
    """An engine ended on its own (not stopped by lessor), or hung: its health check went unanswered
    check after check and lessor stopped it (`hung`); its leases were released."""
    type: ClassVar[str] = "engine_exited"
    model: str
    pid: int
    returncode: int
    reason: str
    restart_in_s: float | None = None  # None: no restart (policy 'never', or given up)
    hung: bool = False


@dataclass(frozen=True)
class AdmissionDecided(Event):
    type: ClassVar[str] = "admission"
    model: str
    result: AdmissionResult
    reason: str = ""
    victims: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForeignUsageChanged(Event):
    type: ClassVar[str] = "foreign_usage"
    device: str
    foreign_bytes: int
    previous_bytes: int


class ReloadResult(str, Enum):
    APPLIED = "applied"  # in force
    PENDING = "pending"  # waits for the models in `waiting_for` to finish their transition; applied then
    REFUSED = "refused"  # not applied; the running config kept


@dataclass(frozen=True)
class ConfigReloaded(Event):
    """A reload applied (`ok`), pending (`waiting_for` the models it waits for), or refused (`reason`);
    `digest`: of the file content it is about, when read from a file."""
    type: ClassVar[str] = "config_reloaded"
    ok: bool
    reason: str = ""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    waiting_for: tuple[str, ...] = ()
    digest: str = ""

    @property
    def result(self) -> ReloadResult:
        return ReloadResult.APPLIED if self.ok else ReloadResult.PENDING if self.waiting_for else ReloadResult.REFUSED


@dataclass(frozen=True)
class EngineAdopted(Event):
    """After a restart: a previous lessord's engine, still running, is served again (or was
    stopped and its leases released, `adopted` false)."""
    type: ClassVar[str] = "engine_adopted"
    model: str
    pid: int
    adopted: bool
    reason: str


@dataclass(frozen=True)
class LeaseOverrun(Event):
    """An engine measured above its leases plus the tolerance (`over` true), or back within them."""
    type: ClassVar[str] = "lease_overrun"
    model: str
    device: str
    used_bytes: int
    leased_bytes: int
    over: bool
    action: OverrunAction


@dataclass(frozen=True)
class FingerprintRecorded(Event):
    """A load's measurement was remembered under its key (merged into what was there)."""
    type: ClassVar[str] = "fingerprint_recorded"
    model: str
    key: str
    outcome: str  # ready | overrun | oom
    loads: int


@dataclass(frozen=True)
class LoadRetried(Event):
    """A load ran out of memory; it is tried again, planned from what it measured."""
    type: ClassVar[str] = "load_retried"
    model: str
    attempt: int  # the attempt that failed (1 = the first)
    outcome: str  # overrun | oom
    reason: str


@dataclass(frozen=True)
class MemoryLingering(Event):
    """An engine stopped but its processes still hold memory on a device past timeouts.unload_verify_s
    (`gone` false: counted as foreign from now on), or that memory is gone (`gone` true)."""
    type: ClassVar[str] = "memory_lingering"
    model: str
    device: str
    bytes: int
    pids: tuple[int, ...]
    gone: bool


@dataclass(frozen=True)
class BudgetOvercommitted(Event):
    """Processes lessor does not manage grew until the leases no longer fit the device; the policy
    chose `victims` (idle models) to evict, or none could be."""
    type: ClassVar[str] = "budget_overcommitted"
    device: str
    short_bytes: int
    victims: tuple[str, ...]
    reason: str = ""


class EventBus:
    def __init__(self, queue_size: int = 1024) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._queue_size = queue_size
        self.dropped = 0
        self.published = 0

    def listen(self, callback: Callable[[Event], None]) -> None:
        """A synchronous subscriber (counters): called in publish, so it must be cheap and never block."""
        self._listeners.append(callback)

    def publish(self, event: Event) -> None:
        self.published += 1
        for callback in self._listeners:
            callback(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
