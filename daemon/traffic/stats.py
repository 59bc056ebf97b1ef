"""What the router has learned about each model's traffic and loads: what a policy that learns
reads in `ModelView.request_rate` and `load_cost_s`. One writer (the router's traffic core in lessord, the simulator's
host in bench/sim), a clock passed in by the caller, plain numbers out.

- The request rate is an exponentially decayed count: each request adds `ln 2 / half_life`, and
  the sum decays by half every `half_life` seconds, so it reads as requests per second over
  about the last half-life, and follows a shift in popularity within one or two half-lives.
- A model *starves* while its requests cannot start: from the first one that had to wait until
  one starts, counting a quiet spell between two of them as at most `STARVING_GAP_S`, so a model
  asked for in bursts starves by its bursts, not by its silences. A policy ages its claim by it
  (the `value` policy), so a rare model is not shut out for good.
- Of the requests that reach a model while it is ready, the share that starts at once (not queued
  behind its full slots), and the share it *keeps up with*: started at once, or queued behind
  less than one full batch (it waits only for a slot of the batch being served). A model that
  fills every slot and keeps up is saturated, not swamped: its requests start within a round.
  One its bursts swamp (a backlog of a batch and more) serves few of them within their goal, and
  is worth that much less a place (moving averages over about the last `1 / STARTED_WEIGHT`).
- A model with no history here (never served: no request of it started, no load measured) is
  `first_time`: a policy gives it an optimistic prior instead of its first few requests' rate.
- A load's cost is what loads of that model took (a moving average of the measured durations,
  spawn to ready); before the first one, a start constant plus its bytes over the disk's
  bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Before a model was ever loaded here: an engine's start (a process, CUDA, a server) and its
# weights read at a local NVMe's speed. Both are replaced by the first measured load.
DEFAULT_START_S = 2.0
DEFAULT_READ_BYTES_PER_S = 2e9
LOAD_AVERAGE_WEIGHT = 0.3  # the newest measured load's share of the moving average
STARTED_WEIGHT = 0.02  # the newest request's share of the started-at-once average
STARVING_GAP_S = 60.0  # the most a quiet spell between two unserved requests adds to starving


@dataclass
class _Rate:
    value: float = 0.0  # requests per second, as of `at`
    at: float = 0.0


class TrafficStats:
    def __init__(self, half_life_s: float = 600.0, start_s: float = DEFAULT_START_S,
                 read_bytes_per_s: float = DEFAULT_READ_BYTES_PER_S) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._decay = math.log(2) / half_life_s
        self._start_s = start_s
        self._read_bytes_per_s = read_bytes_per_s
        self._rates: dict[str, _Rate] = {}
        self._load_s: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._kept_up: dict[str, float] = {}
        self._served: set[str] = set()  # models a request of which has started here
        self._starts: dict[str, _Rate] = {}  # requests started per second, decayed as the request rate
        self._starving: dict[str, list[float]] = {}
        self._loading_since: dict[str, float] = {}  # model -> [seconds starved, as of this time]

    def record_request(self, model: str, now: float) -> None:
        self._bump(self._rates, model, now)

    def _bump(self, rates: dict[str, _Rate], model: str, now: float) -> None:
        rate = rates.get(model)
        if rate is None:
            rate = rates[model] = _Rate(0.0, now)
        rate.value = self._decayed(rate, now) + self._decay
        rate.at = now

    def record_ready_arrival(self, model: str, started: bool, ahead: int | None = None,
                             batch: int | None = None) -> None:
        """A request reached `model` while it was ready: it started at once, or it queued behind
        `ahead` others that wait for a slot of its `batch` (the sequences it serves at once). It
        kept up when it started, or fewer than a batch were ahead of it (unknown: as it started)."""
        share = self._started.get(model, 1.0)
        self._started[model] = share + STARTED_WEIGHT * (float(started) - share)
        kept_up = started or bool(ahead is not None and batch and ahead < batch)
        share = self._kept_up.get(model, 1.0)
        self._kept_up[model] = share + STARTED_WEIGHT * (float(kept_up) - share)

    def started_share(self, model: str) -> float:
        """Of its requests while ready, the share that started at once (1.0 before any)."""
        return self._started.get(model, 1.0)

    def kept_up_share(self, model: str) -> float:
        """Of its requests while ready, the share it kept up with (1.0 before any)."""
        return self._kept_up.get(model, 1.0)

    def first_time(self, model: str) -> bool:
        """Never served here: no request of it started, no load of it measured."""
        return model not in self._served and model not in self._load_s

    def record_wait(self, model: str, now: float) -> None:
        """A request of `model` could not start at once: it starves on."""
        starving = self._starving.get(model)
        if starving is None:
            self._starving[model] = [0.0, now]
        else:
            starving[0], starving[1] = self.starved_s(model, now), now

    def record_start(self, model: str, now: float | None = None) -> None:
        """A request of `model` started (at `now`, where the driver says: its start rate): it
        starves no more."""
        self._starving.pop(model, None)
        self._served.add(model)
        if now is not None:
            self._bump(self._starts, model, now)

    def starved_s(self, model: str, now: float) -> float:
        starving = self._starving.get(model)
        if starving is None:
            return 0.0
        return starving[0] + min(STARVING_GAP_S, max(0.0, now - starving[1]))

    def load_began(self, model: str, now: float) -> None:
        """Its state turned loading: a load is timed from here to ready (spawn, weights, KV, readiness)."""
        self._loading_since[model] = now

    def load_ended(self, model: str, now: float, ready: bool) -> None:
        """Its state left loading: ready, the load's time counts; anything else, it does not."""
        started = self._loading_since.pop(model, None)
        if started is not None and ready:
            self.record_load(model, now - started)

    def record_load(self, model: str, seconds: float) -> None:
        """A load of `model` that became ready took `seconds` (spawn to ready)."""
        if seconds < 0:
            return
        previous = self._load_s.get(model)
        self._load_s[model] = seconds if previous is None else (
            (1 - LOAD_AVERAGE_WEIGHT) * previous + LOAD_AVERAGE_WEIGHT * seconds)

    def rate(self, model: str, now: float) -> float:
        """Requests per second, decayed to `now`."""
        rate = self._rates.get(model)
        return self._decayed(rate, now) if rate is not None else 0.0

    def start_rate(self, model: str, now: float) -> float:
        """Requests started per second, decayed to `now`: what it serves (0 where the driver gives
        no start times)."""
        rate = self._starts.get(model)
        return self._decayed(rate, now) if rate is not None else 0.0

    def load_cost_s(self, model: str, size_bytes: int) -> float:
        """Predicted seconds one load of `model` takes: measured where known."""
        measured = self._load_s.get(model)
        if measured is not None:
            return measured
        return self._start_s + size_bytes / self._read_bytes_per_s

    def view(self, model: str, now: float, size_bytes: int) -> dict[str, float | bool]:
        """What a policy reads of it, as `ModelView` fields."""
        return {"request_rate": self.rate(model, now), "load_cost_s": self.load_cost_s(model, size_bytes),
                "starved_s": self.starved_s(model, now), "started_share": self.started_share(model),
                "kept_up_share": self.kept_up_share(model), "start_rate": self.start_rate(model, now),
                "first_time": self.first_time(model)}

    def measured_load_s(self, model: str) -> float | None:
        return self._load_s.get(model)

    def _decayed(self, rate: _Rate, now: float) -> float:
        return rate.value * math.exp(-self._decay * max(0.0, now - rate.at))

    # -- persistence: plain data, rates as of the moment they are saved ----------------------

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"half_life_s": self.half_life_s,
                "rates": {m: self._decayed(r, now) for m, r in self._rates.items()},
                "load_s": dict(self._load_s), "started": dict(self._started), "kept_up": dict(self._kept_up),
                "served": sorted(self._served)}

    def restore(self, data: Mapping[str, Any], now: float, elapsed_s: float = 0.0) -> None:
        """Take back what `to_dict` saved `elapsed_s` seconds ago (of wall time; a restart's
        downtime decays the rates as if the traffic had stopped)."""
        factor = math.exp(-self._decay * max(0.0, elapsed_s))
        for model, value in dict(data.get("rates", {})).items():
            self._rates[str(model)] = _Rate(float(value) * factor, now)
        for model, seconds in dict(data.get("load_s", {})).items():
            self._load_s[str(model)] = float(seconds)
        for key, shares in (("started", self._started), ("kept_up", self._kept_up)):
            for model, share in dict(data.get(key, {})).items():
                shares[str(model)] = min(1.0, max(0.0, float(share)))
        self._served.update(str(model) for model in data.get("served", ()))
