"""Discrete-event simulation of lessor's router and load protocol over a request trace.

The router's decisions are lessord's own: the simulator drives `daemon.lanes.Lanes`, the object
lessord's router drives on asyncio, here on an event heap in simulated time (its effects: a load
asked for goes to the simulated supervisor, bench/sim/loads.py; an admitted request is served; a
timer is a heap entry). So lanes, first-come-first-served queues, `in_flight`, the drain patience,
drains and wait deadlines are the same code in both. What is modelled here is the serving: a
request takes prompt / prefill rate to its first token, then output / decode rate.

The baselines use the same lanes with their own policies: without a drain (a load waits for its
blockers to go idle by themselves), and the static deployment refuses models it did not load.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lessor.daemon.errors import LessorError
from lessor.daemon.models.lifecycle import ModelState
from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.traffic.lanes import Lane, LaneRules, Lanes, keep_alive_over
from lessor.daemon.traffic.request_errors import WaitTimedOut
from lessor.daemon.traffic.stats import TrafficStats

from .loads import SimRecord, SimSupervisor
from .strategies import Strategy
from .workload import Trace
from .world import Hardware, Result, SimModel

READY = ModelState.READY


def _ready(record: SimRecord) -> bool:
    return record.state is READY


def _call(callback: Callable[[], None]) -> None:
    callback()


class Simulator:
    def __init__(self, hardware: Hardware, models: tuple[SimModel, ...], strategy: Strategy,
                 slo_ttft_s: Mapping[str, float], wait_timeout_s: float = 120.0) -> None:
        self.hw, self.strategy, self.slo = hardware, strategy, slo_ttft_s
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable, Any]] = []
        self._seq = 0
        self.result = Result(strategy.name, 0, np.zeros(0), np.zeros(0))
        rules = LaneRules(max_queue=None, wait_timeout_s=wait_timeout_s,
                          drain_after_s=strategy.drain_after if strategy.drain else None)
        self.stats = TrafficStats()  # what lessord's router learns, learned the same way here
        self.sup = SimSupervisor(hardware, models, strategy, self, self.result)
        self.lanes = Lanes(rules, lambda: self.now, self, self._lane_named, _ready)
        self.lane_of = [self.lanes.add(record, record.name, 1) for record in self.sup.records]

    @property
    def ledger(self):
        return self.sup.ledger

    def _lane_named(self, name: str) -> Lane:
        return self.lanes.lanes[name]

    # -- the loop ----------------------------------------------------------------------------

    def run(self, trace: Trace) -> Result:
        started = time.perf_counter()
        n = len(trace)
        self.arrival = trace.arrival_s.tolist()
        self.models = trace.model
        models = trace.model.tolist()
        prefill_tps = np.array([r.model.prefill_tps for r in self.sup.records])
        decode_tps = np.array([r.model.decode_tps for r in self.sup.records])
        self.prefill = (trace.prompt_tokens / prefill_tps[trace.model]).tolist()
        self.decode = (trace.output_tokens / decode_tps[trace.model]).tolist()
        self.ttft = np.full(n, np.nan)
        goals = np.array([self.slo[r.name] for r in self.sup.records])
        r = self.result
        r.requests, r.slo_ttft_s, r.ttft = n, goals[trace.model], self.ttft
        for name in self.strategy.static or ():
            self.sup.preload(self.sup.by_name[name])
        heap, arrival, lanes, sup = self._heap, self.arrival, self.lane_of, self.sup
        for k in range(n):
            t = arrival[k]
            while heap and heap[0][0] <= t:
                self.now, _, fn, arg = heapq.heappop(heap)
                sup.ticks += 1
                fn(arg)
            self.now = t
            sup.ticks += 1
            self._arrive(k, lanes[models[k]])
        while heap:
            self.now, _, fn, arg = heapq.heappop(heap)
            sup.ticks += 1
            fn(arg)
        self._finish_run(started)
        return self.result

    def _finish_run(self, started: float) -> None:
        r = self.result
        r.timed_out += sum(len(lane.waiting) for lane in self.lane_of)  # never served (none: deadlines end them)
        self.sup._account()
        r.sim_seconds = self.now
        gpu_bytes = sum(self.sup.gpu_total.values())
        r.vram_util = self.sup.area_bytes / (gpu_bytes * self.now) if self.now else 0.0
        r.mean_loaded = self.sup.area_loaded / self.now if self.now else 0.0
        ok = (self.ttft <= r.slo_ttft_s).astype(np.float64)
        count = len(self.lane_of)
        per_model = np.bincount(self.models, weights=ok, minlength=count)
        asked = np.bincount(self.models, minlength=count)
        r.by_model = {lane.name: float(per_model[i] / asked[i]) if asked[i] else math.nan
                      for i, lane in enumerate(self.lane_of)}
        r.wall_s = time.perf_counter() - started

    def at(self, when_s: float, fn: Callable[[Any], None], arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when_s, self._seq, fn, arg))

    # -- requests ----------------------------------------------------------------------------

    def _arrive(self, k: int, lane: Lane) -> None:
        if self.strategy.static is not None and lane.name not in self.strategy.static:
            self.result.refused += 1
            return
        self.stats.record_request(lane.name, self.now)
        started = self.lanes.try_start(lane)
        if lane.record.state is READY:  # queued behind less than a batch: it only waits for a slot
            self.stats.record_ready_arrival(lane.name, started, ahead=len(lane.waiting), batch=lane.slots)
        if started:
            self._start(k, lane)
        else:
            self.stats.record_wait(lane.name, self.now)
            self.lanes.wait(lane, k)

    def _start(self, k: int, lane: Lane) -> None:
        self.stats.record_start(lane.name, self.now)
        prefill = self.prefill[k]
        waited = self.now - self.arrival[k]
        if waited > self.result.longest_wait_s:
            self.result.longest_wait_s = waited
        self.ttft[k] = waited + prefill
        self.at(self.now + prefill + self.decode[k], self._done, lane)

    def _done(self, lane: Lane) -> None:
        self.lanes.finish(lane)
        self._maybe_idle(lane)

    def _maybe_idle(self, lane: Lane) -> None:
        """An unused ready model's keep_alive starts counting (a later request voids the timer)."""
        keep_alive = self.strategy.keep_alive
        if keep_alive is not None and lane.record.state is READY and self.lanes.unused(lane.name):
            since = max(lane.record.ready_at_s, lane.last_used_s)
            self.at(since + keep_alive, self._keep_alive, (lane, since, keep_alive))

    def _keep_alive(self, arg: tuple[Lane, float, float]) -> None:
        lane, since, keep_alive = arg
        record = lane.record
        if (record.state is READY and self.lanes.unused(lane.name) and max(record.ready_at_s, lane.last_used_s) == since
                and keep_alive_over(keep_alive, since, self.now)):
            self.result.keep_alive_unloads += 1
            self.sup.unload(record)

    # -- the lanes' effects (daemon.lanes.Effects) --------------------------------------------

    def load(self, lane: Lane) -> None:
        self.at(self.now, self.sup.ask, lane.record)  # the supervisor takes it up after this event

    def admit(self, lane: Lane, request: int) -> bool:
        self._start(request, lane)
        return True

    def fail(self, request: int, error: LessorError) -> None:
        self.result.longest_wait_s = max(self.result.longest_wait_s, self.now - self.arrival[request])
        if isinstance(error, WaitTimedOut):
            self.result.timed_out += 1
        elif isinstance(error, LoadFailed):
            self.result.failed_loads += 1
        else:
            self.result.refused += 1

    def call_at(self, when_s: float, callback: Callable[[], None]) -> None:
        self.at(when_s, _call, callback)

    def cut(self, lane: Lane, error: LessorError) -> None:
        # The lanes cut only past LaneRules.drain_timeout_s, which the simulator leaves unset.
        raise AssertionError(f"the simulator's lanes have no drain timeout, yet cut {lane.name}: {error}")

    # -- what the simulated supervisor reports (loads.Host) -----------------------------------

    def changed(self, record: SimRecord) -> None:
        if record.state is ModelState.LOADING:  # timed as lessord's router times a load
            self.stats.load_began(record.name, self.now)
        else:
            self.stats.load_ended(record.name, self.now, ready=record.state is READY)
        self.lanes.changed(record.name)
        if record.state is READY:
            self._maybe_idle(self.lanes.lanes[record.name])

    def loaded(self, record: SimRecord) -> None:
        self.lanes.loaded(self.lanes.lanes[record.name])

    def must_wait(self, record: SimRecord, blockers: tuple[str, ...], recheck_s: float | None) -> None:
        self.lanes.must_wait(self.lanes.lanes[record.name], blockers, recheck_s)

    def busy(self, record: SimRecord) -> None:
        self.lanes.busy(self.lanes.lanes[record.name])

    def load_failed(self, record: SimRecord, error: LessorError) -> None:
        self.lanes.load_failed(self.lanes.lanes[record.name], error)

    def set_slots(self, record: SimRecord, slots: int) -> None:
        self.lanes.set_slots(self.lanes.lanes[record.name], slots)

    def in_flight(self, name: str) -> int:
        return self.lanes.in_flight(name)

    def last_used_s(self, name: str) -> float:
        return self.lanes.last_used_s(name)

    def learned_view(self, name: str, size_bytes: int) -> dict[str, Any]:
        return {**self.stats.view(name, self.now, size_bytes), **self.lanes.waiting_of(name)}
