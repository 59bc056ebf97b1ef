"""The supervisor's side in simulated time: what a load does once the router's lanes ask for it.

What is real: every admission is lessord's own, `planning.admission.decide` (the plan put to a
policy over a `policies.Snapshot`: the function the supervisor calls, not a copy); every lease is
granted and released by lessor's `Ledger` (in memory, no database) over a `SimProbe`; lessor's
strategies plan with the `planner` (weights + load peak first, the KV cache sized from what is
left after the weights, or everything at once for a one-phase engine), as the supervisor's
`try_load` does; loads that share a device wait for each other in order of asking, as on the
supervisor's device locks. What is modelled: time (a load takes bytes / bandwidth plus an engine
start) and the card's physical memory, where a load whose real peak does not fit is an
out-of-memory crash.

The ledger's coroutines are driven by `_now`: with no database and an uncontended lock they
finish without ever suspending.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lessor.daemon.config.schema import DevicesConfig, HostPool
from lessor.daemon.devices.probes import SimProbe, gpu_id
from lessor.daemon.errors import LessorError
from lessor.daemon.leases import Granted, LeaseKind
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.models.lifecycle import ModelState
from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.planning.admission import decide
from lessor.daemon.planning.planner import Plan, plan, plan_kv
from lessor.daemon.planning.rejections import PlanRejected
from lessor.policies import DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot

from .strategies import Strategy
from .world import Hardware, Result, SimModel, baseline_leases, lease_sums

READY, LOADING, UNLOADING = ModelState.READY, ModelState.LOADING, ModelState.UNLOADING


PLANS_KEPT = 4096  # plans kept for states of the leases seen before; cleared when full


class SimRecord:
    """One model as the simulated supervisor keeps it (the router's lanes read `state`)."""

    __slots__ = ("model", "spec", "name", "state", "attempt", "loaded_once", "estimate", "steady_need",
                 "estimated", "devices", "memory", "rejected_at", "ready_at_s", "asked", "locking", "refusal", "crash")

    def __init__(self, model: SimModel) -> None:
        self.model, self.spec, self.name = model, model.spec, model.spec.name
        self.state = ModelState.UNLOADED
        self.attempt = ""
        self.loaded_once = False
        self.estimate = baseline_leases(model)
        self.steady_need = lease_sums(self.estimate)  # what a peak-unaware scheduler asks for
        # ... as a plan of everything at once, so its admission is asked as lessor's is (`decide`)
        self.estimated = Plan(self.name, True, model.baseline_kv_tokens, {}, self.estimate, (), one_phase=True)
        self.devices = [gpu_id(i) for i in model.spec.placement.devices]
        self.memory = model.spec.profile()
        self.rejected_at = -1  # the epoch of the last Rejected: unchanged world, same answer
        self.ready_at_s = 0.0
        self.asked = False  # the lanes asked for this load and wait for its outcome
        self.locking = False  # waiting for its devices' loads to end
        self.refusal = PlanRejected(self.name, ["no room (simulated)"])
        self.crash = LoadFailed(self.name, "weights", "out of memory on the card (simulated)")


class Host(Protocol):
    """The simulator: its clock and event heap, the lanes' reads, and where outcomes go."""

    now: float

    def at(self, when_s: float, fn: Callable[[Any], None], arg: Any) -> None: ...

    def changed(self, record: SimRecord) -> None: ...

    def loaded(self, record: SimRecord) -> None: ...

    def must_wait(self, record: SimRecord, blockers: tuple[str, ...], recheck_s: float | None) -> None: ...

    def busy(self, record: SimRecord) -> None: ...

    def load_failed(self, record: SimRecord, error: LessorError) -> None: ...

    def set_slots(self, record: SimRecord, slots: int) -> None: ...

    def in_flight(self, name: str) -> int: ...

    def last_used_s(self, name: str) -> float: ...

    # ModelView's fields by name (rates, shares, counts, a flag): each of ModelView's own type.
    def learned_view(self, name: str, size_bytes: int) -> dict[str, Any]: ...


def _nothing_learned(name: str, size_bytes: int) -> dict[str, Any]:
    return {}


def _now(coro) -> Any:
    """Run a ledger coroutine that cannot suspend (in-memory ledger, uncontended lock)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the simulator's ledger suspended: it must not do I/O")


class SimSupervisor:
    def __init__(self, hardware: Hardware, models: tuple[SimModel, ...], strategy: Strategy, host: Host,
                 result: Result) -> None:
        self.hw, self.strategy, self.host, self.result = hardware, strategy, host, result
        devices = DevicesConfig(probe="sim", headroom=hardware.headroom, simulated=list(hardware.gpus),
                                host=HostPool(headroom=hardware.host_headroom, simulated_total=hardware.host_total))
        self.probe = SimProbe(list(hardware.gpus), hardware.host_total)
        self.ledger = Ledger.in_memory(self.probe, devices, clock=lambda: host.now)
        self.records = [SimRecord(m) for m in models]
        self.by_name = {r.name: r for r in self.records}
        self.gpu_total = {gpu_id(i): g.total for i, g in enumerate(hardware.gpus)}
        self.transient: dict[str, int] = dict.fromkeys(self.gpu_total, 0)  # peaks the ledger never saw
        self.locked: set[str] = set()  # devices with a load in progress (or "*": one load at a time)
        self.locking: list[SimRecord] = []  # loads waiting for their devices, in order of asking
        self.epoch = 0  # bumped whenever memory or a model's state changes
        self.ticks = 0  # bumped by the simulator at every event: in_flight may have changed
        self._area_t, self.area_bytes, self.area_loaded = 0.0, 0.0, 0.0
        self._leased_by_device: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}
        self._leases_version = 0
        # What the two caches below were built at: a _leases_version; an (epoch, leases version, ticks).
        self._budgets_at: int | None = None
        self._snapshot_at: tuple[int, int, int] | None = None
        self._budgets_cache: Mapping[str, DeviceBudget] = {}
        self._base = self.ledger.budgets()  # no leases yet: capacity, headroom and foreign per pool
        self._snapshot_cache: Snapshot | None = None
        self._plans: dict[tuple, Plan] = {}
        self._leased_key: tuple = ()
        self._attempts = itertools.count(1)

    # -- asking ------------------------------------------------------------------------------

    def ask(self, record: SimRecord) -> None:
        """The lanes want this model loaded (the router's try_load)."""
        record.asked = True
        self.preload(record)

    def preload(self, record: SimRecord) -> None:
        """A load nobody waits for (a static deployment's start, like lessord's pinned models)."""
        if not record.locking:
            record.locking = True
            self.locking.append(record)
            self._pump()

    def _pump(self) -> None:
        """Decide the loads whose devices are free, in order of asking."""
        for record in list(self.locking):
            if record.locking and not self._is_locked(record):
                record.locking = False
                self.locking.remove(record)
                self._decide(record)

    def _is_locked(self, record: SimRecord) -> bool:
        return "*" in self.locked or any(d in self.locked for d in record.devices)

    def _lock(self, record: SimRecord, locking: bool) -> None:
        keys = {"device": record.devices, "global": ["*"]}.get(self.strategy.serial or "", [])
        for key in keys:
            (self.locked.add if locking else self.locked.discard)(key)

    def _outcome(self, record: SimRecord, report: Callable, *args) -> None:
        if record.asked:
            record.asked = False
            report(record, *args)

    def _set(self, record: SimRecord, state: ModelState) -> None:
        record.state = state
        self.epoch += 1
        self.host.changed(record)

    # -- the snapshot ------------------------------------------------------------------------

    def budgets(self) -> Mapping[str, DeviceBudget]:
        """The ledger's budgets after its latest grant or release. The simulated cards never
        change under it (foreign usage is fixed), so only the leased bytes move: they are the
        ledger's own leases, summed, over its first reading. `ledger.grant` still reads and
        checks for itself, every time."""
        if self._budgets_at != self._leases_version:
            leased = self._leased_by_device
            self._budgets_cache = {d: DeviceBudget(b.device, b.total_bytes, b.capacity_bytes, b.headroom_bytes,
                                                   b.foreign_bytes, leased.get(d, 0)) for d, b in self._base.items()}
            self._budgets_at = self._leases_version
        return self._budgets_cache

    def _plan(self, record: SimRecord, kv_phase: bool = False) -> Plan:
        """The planner's answer (step 1, or step 4's `plan_kv`) against today's budgets. The
        simulated cards never change but by leases, so the answer is the same whenever the leased
        bytes are: it is kept per model and leased bytes (a run goes through few such states)."""
        key = (record.name, kv_phase, self._leased_key)
        cached = self._plans.get(key)
        if cached is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            cached = self._plans[key] = (plan_kv if kv_phase else plan)(record.spec, self.budgets())
        return cached

    def _snapshot(self) -> Snapshot:
        key = (self.epoch, self._leases_version, self.ticks)
        snapshot = self._snapshot_cache
        if snapshot is None or self._snapshot_at != key:
            host, held = self.host, self._held
            models = {}
            learned = host.learned_view if self.strategy.learns else _nothing_learned
            for r in self.records:
                holds = held.get(r.name, {})
                size = sum(holds.values())
                models[r.name] = ModelView(r.name, r.state.value, r.spec.priority, r.spec.pinned,
                                           host.in_flight(r.name), max(r.ready_at_s, host.last_used_s(r.name)), holds,
                                           size_bytes=size, ready_since_s=r.ready_at_s,
                                           **learned(r.name, size))
            snapshot = self._snapshot_cache = Snapshot(self.budgets(), models, host.now)
            self._snapshot_at = key
        return snapshot

    # -- the load protocol -------------------------------------------------------------------

    def _decide(self, record: SimRecord) -> None:
        """Steps 1-2: plan, and the policy's answer (evictions happen here and only here)."""
        if record.state is READY:
            return self._outcome(record, self.host.loaded)
        if record.state is LOADING or record.state is UNLOADING:
            return self._outcome(record, self.host.busy)
        if record.rejected_at == self.epoch:
            return self._outcome(record, self.host.load_failed, record.refusal)
        # lessor asks for its plan's worst moment, as the supervisor does; the others for their estimate
        planned = self._plan(record) if self.strategy.peak_aware else record.estimated
        decision = decide(record.spec, self._snapshot(), None, self.strategy.policy,
                          plan=lambda spec, budgets, measured: planned).decision
        if isinstance(decision, Rejected):
            record.rejected_at = self.epoch
            return self._outcome(record, self.host.load_failed, record.refusal)
        if isinstance(decision, Queue):
            return self._outcome(record, self.host.must_wait, decision.blockers, decision.recheck_s)
        for victim in decision.victims if isinstance(decision, Evict) else ():
            self.result.evictions += 1
            self.unload(self.by_name[victim])
        self._begin_load(record)

    def _count_avoided(self, record: SimRecord, budgets: Mapping[str, DeviceBudget]) -> None:
        """A peak-unaware scheduler would start this load here too (its steady estimate fits
        what is free) although that estimate plus the load peak does not fit the card: an OOM
        that lessor's plan avoids (weights and peak first, the KV cache from what is left)."""
        memory = record.memory
        for device, need in record.steady_need.items():
            budget = budgets.get(device)
            if budget is None or device == "host":
                continue
            physical_free = budget.free_bytes + budget.headroom_bytes
            if need <= budget.free_bytes and need + memory.load_peak > physical_free:
                self.result.ooms_avoided += 1
                return

    def _begin_load(self, record: SimRecord) -> None:
        """Step 3: the weights (+ load peak) leases, or a peak-unaware scheduler's estimate."""
        record.attempt = f"sim-{next(self._attempts)}"
        if self.strategy.peak_aware:
            self._count_avoided(record, self.budgets())
            first = self._plan(record)
            wants = first.all_leases() if first.one_phase else first.load_leases
            if first.one_phase and not first.fits:
                record.rejected_at = self.epoch
                return self._outcome(record, self.host.load_failed, record.refusal)
            self._slots(record, first.kv_tokens)
        else:
            wants = record.estimate
            self._slots(record, record.model.baseline_kv_tokens)
        granted = self._grant(record, wants)
        self.result.loads += 1
        self._lock(record, True)
        self._set(record, LOADING)
        if not isinstance(granted, Granted):  # a scheduler that did not ask the ledger: the card says no
            self.host.at(self.host.now + self.hw.engine_start_s, self._crash, record)
            return
        memory = record.memory
        if not self.strategy.peak_aware:
            for device in record.devices:
                self.transient[device] += memory.load_peak
        gbps = self.hw.page_cache_gbps if record.loaded_once else self.hw.disk_gbps
        record.loaded_once = True
        seconds = self.hw.engine_start_s + (memory.weights + memory.host_weights) / (gbps * 1e9)
        self.host.at(self.host.now + seconds, self._weights_in, record)

    def _slots(self, record: SimRecord, kv_tokens: int) -> None:
        model = record.model
        self.host.set_slots(record, max(1, min(model.max_batch, kv_tokens // model.context_tokens)))

    def _weights_in(self, record: SimRecord) -> None:
        """The load's worst moment: the weights are in and the load peak is at its height."""
        memory = record.memory
        if not self.strategy.peak_aware:
            over = any(self._physical(d) > self.gpu_total[d] for d in record.devices)
            for device in record.devices:
                self.transient[device] -= memory.load_peak
            if over:
                return self._crash(record)
        else:
            self._release(record, [LeaseKind.LOAD_PEAK])
            if not self._kv_phase(record):
                return
        record.ready_at_s = self.host.now
        self._lock(record, False)
        self._set(record, READY)
        self._outcome(record, self.host.loaded)
        self._pump()

    def _kv_phase(self, record: SimRecord) -> bool:
        """Step 4 for a two-phase engine: size the KV cache from what is free now, then grant it."""
        if not record.spec.engine.two_phase:
            return True
        sized = self._plan(record, kv_phase=True)
        granted = self._grant(record, sized.steady_leases) if sized.fits else None
        if not isinstance(granted, Granted):
            self._crash(record, oom=False)
            return False
        self._slots(record, sized.kv_tokens)
        return True

    def _physical(self, device: str) -> int:
        budget = self.budgets()[device]
        return budget.foreign_bytes + budget.leased_bytes + self.transient[device]

    def _crash(self, record: SimRecord, oom: bool = True) -> None:
        """The load failed: every lease of the attempt goes back; what waited gets an error."""
        if oom:
            self.result.ooms += 1
        self._release(record, None)
        self._lock(record, False)
        self._set(record, ModelState.FAILED)
        self._outcome(record, self.host.load_failed, record.crash if oom else record.refusal)
        self._pump()

    def unload(self, record: SimRecord) -> None:
        self._release(record, None)
        self._set(record, ModelState.UNLOADED)

    # -- the ledger --------------------------------------------------------------------------

    def _grant(self, record: SimRecord, wants) -> Any:
        self._account()
        granted = _now(self.ledger.grant(record.name, wants, record.attempt))
        self._recount()
        return granted

    def _release(self, record: SimRecord, kinds) -> Any:
        self._account()
        released = _now(self.ledger.release_model(record.name, "simulated", kinds=kinds))
        self._recount()
        return released

    def _account(self) -> None:
        """Integrate leased GPU bytes and loaded models over the time since the last change."""
        now = self.host.now
        dt = now - self._area_t
        self.area_bytes += dt * sum(b for d, b in self._leased_by_device.items() if d != "host")
        self.area_loaded += dt * len(self._held)
        self._area_t = now

    def _recount(self) -> None:
        """After a grant or a release: the ledger's leases, summed per device and per model."""
        self._leases_version += 1
        by_device: dict[str, int] = {}
        held: dict[str, dict[str, int]] = {}
        for lease in self.ledger.leases():
            by_device[lease.device] = by_device.get(lease.device, 0) + lease.bytes
            per = held.setdefault(lease.model, {})
            per[lease.device] = per.get(lease.device, 0) + lease.bytes
        self._leased_by_device, self._held = by_device, held
        self._leased_key = tuple(sorted(by_device.items()))
