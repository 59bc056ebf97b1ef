"""A model that cannot be served now (busy, adopting, failed) and a load that failed (its engine
could not start, it broke a step, it ran out of memory)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LessorError


@dataclass
class ModelBusy(LessorError):
    """The model is mid-transition (loading/unloading); the caller may retry."""

    model: str
    state: str
    retry_after_s: float = 2.0
    type = "model_busy"

    def message(self) -> str:
        return f"model '{self.model}' is {self.state}; retry when that finishes"


@dataclass
class ModelAdopting(LessorError):
    """lessord just started and is still taking over the model's running engine from the previous
    lessord (its adoption check, bounded by timeouts.adopt_s and timeouts.adopt_stopped_s)."""

    model: str
    retry_after_s: float = 5.0
    type = "model_adopting"

    def message(self) -> str:
        return (f"model '{self.model}' is not served yet: lessord just restarted and is still checking the engine "
                f"the previous lessord left running (adoption); retry after {self.retry_after_s:g} s")


@dataclass
class ModelFailed(LessorError):
    """lessor gave up on the model after its crashes: requests do not load it again."""

    model: str
    reason: str
    type = "model_failed"

    def message(self) -> str:
        return (f"model '{self.model}' is failed and not loaded on demand: {self.reason}; an operator's load "
                f"(lessor load {self.model}) or a config reload tries it again")


@dataclass
class EngineUnavailable(LessorError):
    model: str
    engine: str
    reason: str
    type = "engine_unavailable"

    def message(self) -> str:
        return f"model '{self.model}': engine '{self.engine}' cannot start: {self.reason}"


@dataclass
class LoadFailed(LessorError):
    model: str
    step: str
    reason: str
    type = "load_failed"

    def message(self) -> str:
        return f"model '{self.model}' failed to load at step '{self.step}': {self.reason}; every lease of the attempt was released"


@dataclass
class OutOfMemory(LoadFailed):
    """The load ran out of memory: its engine died of it (`kind` "oom"), or it measured above its
    leases beyond the tolerance ("overrun"). Its measurement is in the fingerprints."""

    kind: str = "oom"
    type = "out_of_memory"
