"""Discrete-event simulation of lessor's load protocol and router over a request trace.

What is real: every admission is decided by a policy over a `policies.Snapshot`; every lease is
granted and released by lessor's `Ledger` (in memory, no database) over a `SimProbe`; lessor's
strategies plan with the `planner` (weights + load peak first, the KV cache sized from what is
left after the weights, or everything at once for a one-phase engine), exactly as the
supervisor's `_load_locked` does. What is modelled: time (loads take bytes / bandwidth plus an
engine start; a request takes prompt / prefill rate, then output / decode rate), and the card's
physical memory, where a load whose real peak does not fit is an out-of-memory crash.

The simulator is one synchronous loop. The ledger's coroutines are driven by `_now`: with no
database and an uncontended lock they finish without ever suspending.

Requests follow the router's rules: a lane per model, `in_flight` = running + waiting, a model
with work is never idle, and (for lessor) the models a load waits for are drained: their new
requests are held until the load has its turn.
"""

from __future__ import annotations

import heapq
import math
import time
import uuid
from collections import deque
from typing import Any, Callable, Mapping

import numpy as np

from lessor.daemon.config import DevicesConfig, HostPool
from lessor.daemon.devices import SimProbe, gpu_id
from lessor.daemon.ledger import Granted, LeaseKind, Ledger
from lessor.daemon.planner import Plan, plan, plan_kv
from lessor.policies import AdmissionRequest, DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot

from .strategies import Strategy
from .world import Hardware, Result, SimModel, baseline_leases, lease_sums
from .workload import Trace


class Lane:
    """One model's state in the simulation (the router's lane and the supervisor's record)."""

    __slots__ = ("model", "spec", "name", "state", "active", "waiting", "held", "drained_by", "slots",
                 "last_used", "attempt", "loaded_once", "pending", "estimate", "steady_need", "rejected_at", "queued_at", "blockers",
                 "retry", "devices", "memory", "asked_at", "patience_timer")

    def __init__(self, model: SimModel) -> None:
        self.model, self.spec, self.name = model, model.spec, model.spec.name
        self.state = "unloaded"
        self.active = 0
        self.waiting: deque[int] = deque()  # request indices due to run, in arrival order
        self.held: deque[int] = deque()  # arrived while drained for another model's load
        self.drained_by: set[str] = set()
        self.slots = 1
        self.last_used = 0.0
        self.attempt = ""
        self.loaded_once = False
        self.pending = False
        self.rejected_at = -1  # the epoch of the last Rejected: unchanged world, same answer
        self.queued_at = -1  # the epoch of the last Queue: asked again when the world or a blocker changes
        self.blockers: frozenset[str] = frozenset()
        self.retry = False
        self.asked_at = 0.0  # when the current load was first asked for
        self.patience_timer = False  # a retry is due when router.drain_after runs out
        self.estimate = baseline_leases(model)
        self.steady_need = lease_sums(self.estimate)  # what a peak-unaware scheduler asks for
        self.devices = [gpu_id(i) for i in model.spec.placement.devices]
        self.memory = model.spec.profile()

    @property
    def in_flight(self) -> int:
        return self.active + len(self.waiting)

    def view(self, held: dict[str, int]) -> ModelView:
        return ModelView(self.name, self.state, self.spec.priority, self.spec.pinned, self.in_flight,
                         self.last_used, held)


def _now(coro) -> Any:
    """Run a ledger coroutine that cannot suspend (in-memory ledger, uncontended lock)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the simulator's ledger suspended: it must not do I/O")


class Simulator:
    def __init__(self, hardware: Hardware, models: tuple[SimModel, ...], strategy: Strategy,
                 slo_ttft_s: Mapping[str, float], wait_timeout_s: float = 120.0) -> None:
        self.hw, self.strategy, self.slo, self.wait_timeout = hardware, strategy, slo_ttft_s, wait_timeout_s
        self.now = 0.0
        devices = DevicesConfig(probe="sim", headroom=hardware.headroom, simulated=list(hardware.gpus),
                                host=HostPool(headroom=hardware.host_headroom, simulated_total=hardware.host_total))
        self.probe = SimProbe(list(hardware.gpus), hardware.host_total)
        self.ledger = Ledger.in_memory(self.probe, devices, clock=lambda: self.now)
        self.lanes = [Lane(m) for m in models]
        self.by_name = {lane.name: lane for lane in self.lanes}
        self.gpu_total = {gpu_id(i): g.total for i, g in enumerate(hardware.gpus)}
        self.transient: dict[str, int] = dict.fromkeys(self.gpu_total, 0)  # peaks the ledger never saw
        self.locked: set[str] = set()  # devices with a load in progress (or "*": one load at a time)
        self.pending: list[Lane] = []  # lanes that want to load, in order of asking
        self.epoch = 0  # bumped whenever memory or a model's state changes
        self._heap: list[tuple[float, int, Callable, Any]] = []
        self._seq = 0
        self._pumping = self._again = False
        self._area_t, self._area_bytes, self._area_loaded = 0.0, 0.0, 0.0
        self._leased_by_device: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}
        self._leases_version, self._clock_ticks = 0, 0  # what the cached budgets and snapshot were read at
        self._budgets_at = self._snapshot_at = None
        self._budgets_cache: Mapping[str, DeviceBudget] = {}
        self._base = self.ledger.budgets()  # no leases yet: capacity, headroom and foreign per pool
        self._snapshot_cache: Snapshot | None = None
        self._plans: dict[str, tuple[int, Plan]] = {}

    # -- the loop ----------------------------------------------------------------------------

    def run(self, trace: Trace) -> Result:
        started = time.perf_counter()
        n = len(trace)
        self.arrival = trace.arrival_s.tolist()
        self.models = trace.model
        models = trace.model.tolist()
        self.prefill = (trace.prompt_tokens / np.array([l.model.prefill_tps for l in self.lanes])[trace.model]).tolist()
        self.decode = (trace.output_tokens / np.array([l.model.decode_tps for l in self.lanes])[trace.model]).tolist()
        self.ttft = np.full(n, np.nan)
        goals = np.array([self.slo[lane.name] for lane in self.lanes])
        self.result = Result(self.strategy.name, n, goals[trace.model], self.ttft)
        for name in self.strategy.static or ():
            self._want_load(self.by_name[name])
        heap, arrival = self._heap, self.arrival
        for k in range(n):
            t = arrival[k]
            while heap and heap[0][0] <= t:
                self.now, _, fn, arg = heapq.heappop(heap)
                self._clock_ticks += 1
                fn(arg)
            self.now = t
            self._clock_ticks += 1
            self._arrive(k, self.lanes[models[k]])
        while heap:
            self.now, _, fn, arg = heapq.heappop(heap)
            self._clock_ticks += 1
            fn(arg)
        self._finish_run(started)
        return self.result

    def _finish_run(self, started: float) -> None:
        for lane in self.lanes:  # what still waits at the end was never served
            self._fail(lane.waiting, "timed_out")
            self._fail(lane.held, "timed_out")
        self._account()
        r = self.result
        r.sim_seconds = self.now
        gpu_bytes = sum(self.gpu_total.values())
        r.vram_util = self._area_bytes / (gpu_bytes * self.now) if self.now else 0.0
        r.mean_loaded = self._area_loaded / self.now if self.now else 0.0
        ok = (self.ttft <= r.slo_ttft_s).astype(np.float64)
        per_model = np.bincount(self.models, weights=ok, minlength=len(self.lanes))
        asked = np.bincount(self.models, minlength=len(self.lanes))
        r.by_model = {lane.name: float(per_model[i] / asked[i]) if asked[i] else math.nan
                      for i, lane in enumerate(self.lanes)}
        r.wall_s = time.perf_counter() - started

    def _at(self, t: float, fn: Callable, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    # -- requests ----------------------------------------------------------------------------

    def _arrive(self, k: int, lane: Lane) -> None:
        if self.strategy.static is not None and lane.name not in self.strategy.static:
            self.result.refused += 1
            return
        if lane.drained_by:
            lane.held.append(k)
            return
        if lane.state == "ready" and not lane.waiting and lane.active < lane.slots:
            self._start(k, lane)
            return
        lane.waiting.append(k)
        if lane.state in ("unloaded", "failed"):
            self._want_load(lane)

    def _start(self, k: int, lane: Lane) -> None:
        waited = self.now - self.arrival[k]
        if waited > self.wait_timeout:
            self.result.timed_out += 1
            return
        lane.active += 1
        prefill = self.prefill[k]
        self.ttft[k] = waited + prefill
        self._at(self.now + prefill + self.decode[k], self._done, lane)

    def _done(self, lane: Lane) -> None:
        lane.active -= 1
        lane.last_used = self.now
        self._start_waiting(lane)
        if lane.in_flight == 0:
            if self.strategy.keep_alive is not None and lane.state == "ready":
                self._at(self.now + self.strategy.keep_alive, self._keep_alive, (lane, self.now))
            woken = False
            for waiting in self.pending:  # the router's _until_idle: asked again once all its blockers idle
                if lane.name in waiting.blockers and all(self.by_name[b].in_flight == 0 for b in waiting.blockers):
                    waiting.retry = woken = True
            if woken:
                self._pump()

    def _start_waiting(self, lane: Lane) -> None:
        while lane.waiting and lane.active < lane.slots and lane.state == "ready":
            self._start(lane.waiting.popleft(), lane)

    def _fail(self, requests: deque[int], why: str) -> None:
        count = len(requests)
        requests.clear()
        if why == "timed_out":
            self.result.timed_out += count
        elif why == "oom":
            self.result.failed_loads += count
        else:
            self.result.refused += count

    def _keep_alive(self, arg: tuple[Lane, float]) -> None:
        lane, stamp = arg
        if lane.state == "ready" and lane.in_flight == 0 and lane.last_used == stamp:
            self.result.keep_alive_unloads += 1
            self._unload(lane)
            self._pump()

    # -- loading -----------------------------------------------------------------------------

    def _want_load(self, lane: Lane) -> None:
        if not lane.pending:  # already asking: its answer changes when the world does, not per request
            lane.pending = True
            lane.asked_at = self.now
            lane.queued_at, lane.blockers, lane.retry = -1, frozenset(), False
            self.pending.append(lane)
            self._pump()

    def _pump(self) -> None:
        """Try every load that waits, in order, until none can move."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for lane in list(self.pending):
                    if lane.pending and not self._is_locked(lane):
                        self._try_load(lane)
        finally:
            self._pumping = False

    def _is_locked(self, lane: Lane) -> bool:
        return "*" in self.locked or any(d in self.locked for d in lane.devices)

    def _lock(self, lane: Lane, locking: bool) -> None:
        keys = {"device": lane.devices, "global": ["*"]}.get(self.strategy.serial or "", [])
        for key in keys:
            (self.locked.add if locking else self.locked.discard)(key)

    def _budgets(self) -> Mapping[str, DeviceBudget]:
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

    def _plan(self, lane: Lane) -> Plan:
        """The planner's answer against today's budgets (the same until a lease changes)."""
        cached = self._plans.get(lane.name)
        if cached is None or cached[0] != self._leases_version:
            cached = self._plans[lane.name] = (self._leases_version, plan(lane.spec, self._budgets()))
        return cached[1]

    def _snapshot(self) -> Snapshot:
        key = (self.epoch, self._leases_version, self._clock_ticks)
        if self._snapshot_at != key:
            self._snapshot_cache, self._snapshot_at = self._build_snapshot(), key
        return self._snapshot_cache

    def _build_snapshot(self) -> Snapshot:
        held = self._held
        models = {l.name: l.view(held.get(l.name, {})) for l in self.lanes}
        return Snapshot(self._budgets(), models, self.now)

    def _try_load(self, lane: Lane) -> None:
        if lane.rejected_at == self.epoch:
            return self._refuse(lane)
        if not lane.retry and lane.queued_at >= 0 and (lane.blockers or lane.queued_at == self.epoch):
            return  # waits for its blockers to idle (or, with none named, for any change)
        snapshot = self._snapshot()
        # lessor asks for the plan's worst moment, as the supervisor's _decide; the others for their estimate
        need = self._plan(lane).peak_need() if self.strategy.peak_aware else lane.steady_need
        request = AdmissionRequest(lane.name, need, lane.spec.priority)
        decision = self.strategy.policy(request, snapshot)
        if isinstance(decision, Rejected):
            lane.rejected_at = self.epoch
            return self._refuse(lane)
        if isinstance(decision, Queue):
            self._queue(lane, request, snapshot)
            return
        victims = decision.victims if isinstance(decision, Evict) else ()
        for victim in victims:
            self.result.evictions += 1
            self._unload(self.by_name[victim])
        self._begin_load(lane)

    def _refuse(self, lane: Lane) -> None:
        lane.pending = False
        self.pending.remove(lane)
        self._undrain(lane)
        self._fail(lane.waiting, "refused")

    def _queue(self, loading: Lane, request: AdmissionRequest, snapshot: Snapshot) -> None:
        """The load waits for the models it would evict were they idle (asked again when one of
        them goes idle, or memory changes). lessor's router also drains them: no new work."""
        decision = self.strategy.policy(request, snapshot.all_idle())
        loading.blockers = frozenset(decision.victims) if isinstance(decision, Evict) else frozenset()
        loading.queued_at, loading.retry = self.epoch, False
        if not self.strategy.drain:
            return
        drain_at = loading.asked_at + self.strategy.drain_after
        if drain_at > self.now:  # let the blockers go idle by themselves first; drain when patience runs out
            if not loading.patience_timer:
                loading.patience_timer = True
                self._at(drain_at, self._patience_over, loading)
            return
        for name in loading.blockers:
            self.by_name[name].drained_by.add(loading.name)

    def _patience_over(self, lane: Lane) -> None:
        lane.patience_timer = False
        if lane.pending:
            lane.retry = True
            self._pump()

    def _undrain(self, loading: Lane) -> None:
        for lane in self.lanes:
            if loading.name in lane.drained_by:
                lane.drained_by.discard(loading.name)
                if not lane.drained_by and lane.held:
                    lane.waiting.extend(lane.held)
                    lane.held.clear()
                    if lane.state in ("unloaded", "failed"):
                        self._want_load(lane)
                    else:
                        self._start_waiting(lane)

    def _count_avoided(self, lane: Lane, budgets: Mapping[str, DeviceBudget]) -> None:
        """A peak-unaware scheduler would start this load here too (its steady estimate fits
        what is free) although that estimate plus the load peak does not fit the card: an OOM
        that lessor's plan avoids (weights and peak first, the KV cache from what is left)."""
        memory = lane.memory
        for device, need in lane.steady_need.items():
            budget = budgets.get(device)
            if budget is None or device == "host":
                continue
            physical_free = budget.free_bytes + budget.headroom_bytes
            if need <= budget.free_bytes and need + memory.load_peak > physical_free:
                self.result.ooms_avoided += 1
                return

    def _begin_load(self, lane: Lane) -> None:
        lane.pending = False
        self.pending.remove(lane)
        self._undrain(lane)
        lane.attempt = str(uuid.uuid4())
        if self.strategy.peak_aware:
            self._count_avoided(lane, self._budgets())
            first = self._plan(lane)
            wants = first.all_leases() if first.one_phase else first.load_leases
            if first.one_phase and not first.fits:
                lane.rejected_at = self.epoch
                return self._refuse(lane)
            lane.slots = self._slots(lane, first.kv_tokens)
        else:
            wants = lane.estimate
            lane.slots = self._slots(lane, lane.model.baseline_kv_tokens)
        granted = self._grant(lane, wants)
        lane.state = "loading"
        self.epoch += 1
        self.result.loads += 1
        self._lock(lane, True)
        if not isinstance(granted, Granted):  # a scheduler that did not ask the ledger: the card says no
            self._at(self.now + self.hw.engine_start_s, self._crash, lane)
            return
        memory = lane.memory
        if not self.strategy.peak_aware:
            for device in lane.devices:
                self.transient[device] += memory.load_peak
        gbps = self.hw.page_cache_gbps if lane.loaded_once else self.hw.disk_gbps
        lane.loaded_once = True
        seconds = self.hw.engine_start_s + (memory.weights + memory.host_weights) / (gbps * 1e9)
        self._at(self.now + seconds, self._weights_in, lane)

    def _slots(self, lane: Lane, kv_tokens: int) -> int:
        return max(1, min(lane.model.max_batch, kv_tokens // lane.model.context_tokens))

    def _weights_in(self, lane: Lane) -> None:
        """The load's worst moment: the weights are in and the load peak is at its height."""
        memory = lane.memory
        if not self.strategy.peak_aware:
            over = any(self._physical(d) > self.gpu_total[d] for d in lane.devices)
            for device in lane.devices:
                self.transient[device] -= memory.load_peak
            if over:
                return self._crash(lane)
        else:
            self._release(lane, [LeaseKind.LOAD_PEAK])
            if not self._kv_phase(lane):
                return
        lane.state = "ready"
        lane.last_used = self.now
        self.epoch += 1
        self._lock(lane, False)
        self._start_waiting(lane)
        if lane.in_flight == 0 and self.strategy.keep_alive is not None:
            self._at(self.now + self.strategy.keep_alive, self._keep_alive, (lane, self.now))
        self._pump()

    def _kv_phase(self, lane: Lane) -> bool:
        """Step 4 for a two-phase engine: size the KV cache from what is free now, then grant it."""
        if not lane.spec.engine.two_phase:
            return True
        sized = plan_kv(lane.spec, self._budgets())
        granted = self._grant(lane, sized.steady_leases) if sized.fits else None
        if not isinstance(granted, Granted):
            self._crash(lane, oom=False)
            return False
        lane.slots = self._slots(lane, sized.kv_tokens)
        return True

    def _physical(self, device: str) -> int:
        budget = self._budgets()[device]
        return budget.foreign_bytes + budget.leased_bytes + self.transient[device]

    def _crash(self, lane: Lane, oom: bool = True) -> None:
        """The load failed: every lease of the attempt goes back; what waited gets an error."""
        if oom:
            self.result.ooms += 1
        self._release(lane, None)
        lane.state = "failed"
        self.epoch += 1
        self._lock(lane, False)
        self._fail(lane.waiting, "oom" if oom else "refused")
        self._pump()

    def _unload(self, lane: Lane) -> None:
        self._release(lane, None)
        lane.state = "unloaded"
        self.epoch += 1
        if lane.waiting:
            self._want_load(lane)

    # -- the ledger --------------------------------------------------------------------------

    def _grant(self, lane: Lane, wants) -> Any:
        self._account()
        granted = _now(self.ledger.grant(lane.name, wants, lane.attempt))
        self._recount()
        return granted

    def _release(self, lane: Lane, kinds) -> Any:
        self._account()
        released = _now(self.ledger.release_model(lane.name, "simulated", kinds=kinds))
        self._recount()
        return released

    def _account(self) -> None:
        """Integrate leased GPU bytes and loaded models over the time since the last change."""
        dt = self.now - self._area_t
        self._area_bytes += dt * sum(b for d, b in self._leased_by_device.items() if d != "host")
        self._area_loaded += dt * len(self._held)
        self._area_t = self.now

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
