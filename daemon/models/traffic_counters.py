"""What the supervisor may read of the router's traffic: the router counts requests in its own lanes
(daemon/traffic/control.py); the supervisor reads them through `Traffic` when it builds a policy
snapshot or checks that a model is idle before evicting it. Read-only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Traffic(Protocol):
    """The router's counters, read-only: requests running or due per model, and last use."""

    def in_flight(self, model: str) -> int: ...

    def last_used_s(self, model: str) -> float: ...

    def learned_view(self, model: str, size_bytes: int) -> Mapping[str, Any]:
        """What the router learned of it, as `ModelView` fields: request_rate, load_cost_s, waiting,
        oldest_wait_s, starved_s, started_share (floats, ints and a bool: each its field's type)."""


class NoTraffic:
    """Where no router serves (the CLI's local plan, tests of the supervisor alone)."""

    def in_flight(self, model: str) -> int:
        return 0

    def last_used_s(self, model: str) -> float:
        return 0.0

    def learned_view(self, model: str, size_bytes: int) -> Mapping[str, Any]:
        return {}
