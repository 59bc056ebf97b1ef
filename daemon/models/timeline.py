"""Where a load's time went: lessor's own steps, the engine's, and the gaps between the engine being
ready and lessor noticing it.

lessord marks the moments it sees (`LoadTimeline.mark`); an engine that stamps its own phases
(the torch engine: `times` in its KV answer) adds those. Both are CLOCK_MONOTONIC, one clock for
every process of the machine, so an engine's stamp and lessord's mark subtract. Each step says
whose time it is: `lessor` (plan, admission, grants, spawn, bookkeeping: what lessor can cut),
`engine` (interpreter, imports, weights, KV allocation: the engine's), `measure` (the samples at
each step that become a fingerprint, and step 5's check against the leases: NVML on a GPU; on a
simulated device the engine reading its own memory), `notice` (from the engine being ready to
lessor knowing it: the readiness probe's lag).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

LESSOR, ENGINE, MEASURE, NOTICE = "lessor", "engine", "measure", "notice"

# (step, from, to, whose): "e:" marks are the engine's own stamps. A step whose ends are not both
# there is left out: an engine that stamps nothing has one step from spawn to its health answering
# (two, split at its ready line, when lessord saw that line in its log),
# a one-phase engine (its KV cache sized at start) no KV steps, its readiness checked at once.
_STEPS = (
    ("admit", "requested", "admitted", LESSOR),
    ("plan and grant weights", "admitted", "granted", LESSOR),
    ("spawn", "granted", "spawned", LESSOR),
    ("interpreter and imports", "spawned", "e:weights_start", ENGINE),
    ("tokenizer, config, modeling imports", "e:weights_start", "e:weights_read_start", ENGINE),
    ("weights read", "e:weights_read_start", "e:weights_loaded", ENGINE),
    ("weights in", "e:weights_start", "e:weights_loaded", ENGINE),
    ("engine start to its ready line", "spawned", "e:ready_line", ENGINE),
    ("health after its ready line", "e:ready_line", "weights_noticed", NOTICE),
    ("engine start and weights, to its health answering", "spawned", "weights_noticed", ENGINE),
    ("weights noticed", "e:weights_loaded", "weights_noticed", NOTICE),
    ("measure at weights", "weights_noticed", "weights_measured", MEASURE),
    ("release peak, plan and grant kv", "weights_measured", "kv_granted", LESSOR),
    ("kv allocated", "kv_granted", "kv_allocated", ENGINE),
    ("measure at kv", "kv_allocated", "kv_measured", MEASURE),
    ("ready noticed", "kv_measured", "ready_noticed", NOTICE),
    ("ready checked", "weights_measured", "ready_noticed", NOTICE),
    ("measure at ready and verify", "ready_noticed", "verified", MEASURE),
    ("record ready", "verified", "done", LESSOR),
)
# The marks that rule a step out: each interval is counted once.
_UNLESS = {"engine start and weights, to its health answering": ("e:weights_loaded", "e:ready_line"),
           "engine start to its ready line": ("e:weights_loaded",), "health after its ready line": ("e:weights_loaded",),
           "ready checked": ("kv_measured",), "weights in": ("e:weights_read_start",)}


@dataclass
class LoadTimeline:
    clock: Callable[[], float] = time.monotonic
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = self.clock()

    def add_engine(self, stamps: Mapping[str, Any]) -> None:
        """The engine's own phase stamps (CLOCK_MONOTONIC seconds); anything else is ignored."""
        for name, value in stamps.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.marks[f"e:{name}"] = float(value)

    def steps(self) -> list[dict[str, Any]]:
        out = []
        for name, start, end, whose in _STEPS:
            if start in self.marks and end in self.marks and not any(m in self.marks for m in _UNLESS.get(name, ())):
                out.append({"step": name, "whose": whose, "seconds": round(self.marks[end] - self.marks[start], 6)})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The steps, each side's total, and the marks themselves (for a client that also stamped
        the request it sent, on the same clock)."""
        steps = self.steps()
        totals = {whose: round(sum(s["seconds"] for s in steps if s["whose"] == whose), 6)
                  for whose in (LESSOR, ENGINE, MEASURE, NOTICE)}
        first, last = self.marks.get("requested"), self.marks.get("done")
        return {"steps": steps, "totals": totals,
                "seconds": round(last - first, 6) if first is not None and last is not None else None,
                "marks": {k: round(v, 6) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}}
