"""A model that does not fit (NotEnoughMemory and its kinds) or cannot be planned (PlanRejected).

A shortfall of memory during admission is a return value (policies' Rejected), not an exception;
NotEnoughMemory is raised only where a caller asked for an action that cannot proceed (an explicit
load that the policy rejected).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LessorError
from ..units import format_bytes


@dataclass
class NotEnoughMemory(LessorError):
    """`wanted_bytes` on `device` (the device it is shortest on), where `free_bytes` are free: negative
    when foreign usage grew past the leases (the message never shows a negative figure)."""

    model: str
    device: str
    wanted_bytes: int
    free_bytes: int
    hint: str = ""  # what to change (or why nothing was evicted): said once, after the numbers
    retry_after_s: float = 10.0
    type = "not_enough_memory"

    def message(self) -> str:
        wanted = max(self.wanted_bytes, 0)
        free = (f"{format_bytes(self.free_bytes)} is free" if self.free_bytes >= 0 else
                f"none is free ({format_bytes(-self.free_bytes)} over its budget)")
        text = (f"model '{self.model}' needs {format_bytes(wanted)} on {self.device}, {free}: short by "
                f"{format_bytes(max(wanted - self.free_bytes, 0))}")
        return f"{text}; {self.hint}" if self.hint else text


@dataclass
class ModelTooLarge(NotEnoughMemory):
    """It can never fit this box: on `device` it needs more than lessor could ever lease there
    (`free_bytes` here: capacity − headroom, with every other model evicted and no other process).
    Waiting or retrying never helps, so it is not answered as a 503 (api/errors.py)."""

    capacity_bytes: int = 0
    headroom_bytes: int = 0
    type = "model_too_large"

    def message(self) -> str:
        text = (f"model '{self.model}' can never fit on {self.device}: it needs {format_bytes(max(self.wanted_bytes, 0))} "
                f"there, at most {format_bytes(max(self.free_bytes, 0))} can ever be leased "
                f"({format_bytes(self.capacity_bytes)} capacity − {format_bytes(self.headroom_bytes)} headroom, "
                "with every other model evicted and no other process)")
        return f"{text}; {self.hint}" if self.hint else text


@dataclass
class ModelsBusy(NotEnoughMemory):
    """It would fit once the models holding the memory finish their requests (the policy queued it);
    `blockers` are the models whose eviction would make room."""

    blockers: tuple[str, ...] = ()
    retry_after_s: float = 2.0
    type = "models_busy"


@dataclass
class PlanRejected(LessorError):
    """No engine parameters fit, or the configured ones break an engine rule."""

    model: str
    reasons: list[str]
    field: str | None = None
    type = "plan_rejected"

    def message(self) -> str:
        return f"model '{self.model}' cannot be planned: " + "; ".join(self.reasons)
