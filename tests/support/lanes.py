"""A fake of the lanes' effects (daemon/traffic/lanes.py) for tests that drive `Lanes` alone:
loads, admissions and failures recorded, time and timers under the test's hand."""

import heapq
from dataclasses import dataclass

from lessor.daemon.models.lifecycle import ModelState
from lessor.daemon.traffic.lanes import Lane, LaneRules, Lanes

READY, UNLOADED, LOADING = ModelState.READY, ModelState.UNLOADED, ModelState.LOADING


@dataclass
class Record:
    state: ModelState = UNLOADED


class World:
    """The effects, recorded; time and timers under the test's hand."""

    def __init__(self, **rules) -> None:
        self.now = 0.0
        self.timers: list = []
        self.seq = 0  # ties between timers of one time break by order of arming, never by callable
        self.loads: list[str] = []
        self.admitted: list = []
        self.failed: list = []
        self.records: dict[str, Record] = {}
        self.lanes = Lanes(LaneRules(**rules), lambda: self.now, self, self.lane, lambda r: r.state is READY)

    def lane(self, name: str) -> Lane:
        if name not in self.lanes.lanes:
            self.lanes.add(self.records.setdefault(name, Record()), name, None)
        return self.lanes.lanes[name]

    def load(self, lane: Lane) -> None:
        self.loads.append(lane.name)

    def admit(self, lane: Lane, request) -> bool:
        self.admitted.append(request)
        return True

    def fail(self, request, error) -> None:
        self.failed.append((request, type(error).__name__))

    def call_at(self, when_s, callback) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when_s, self.seq, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self.timers and self.timers[0][0] <= self.now:
            heapq.heappop(self.timers)[2]()

    def set(self, name: str, state: ModelState) -> None:
        self.records[name].state = state
        self.lanes.changed(name)

    def request(self, name: str, request) -> bool:
        """True: it started at once; else it waits."""
        lane = self.lane(name)
        if self.lanes.try_start(lane):
            return True
        self.lanes.wait(lane, request)
        return False
