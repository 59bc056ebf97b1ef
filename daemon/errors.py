"""Typed errors: the base every one of lessor's errors derives from, and the errors of what a client
asked for (a malformed input, a name that does not exist, a config that does not validate) or of
lessor's own state (InvariantBroken). Each carries the numbers a message needs; api/errors.py maps
every typed error to HTTP in one table.

The errors of one room live beside it, each a leaf that imports only this module:
planning/rejections.py (a model that does not fit, or cannot be planned), models/load_errors.py
(a model that cannot be served now, a load that failed), traffic/request_errors.py (a request that
waited, queued or reached its engine in vain), ledger/ledger_errors.py (the ledger's database), and
api/refusals.py (the HTTP servers' own refusals).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LessorError(Exception):
    """Base: `type` names the error in API envelopes, `field` the input it is about (if any)."""

    type = "lessor_error"  # subclasses may also carry `field`, the input the error is about

    def __str__(self) -> str:  # dataclass subclasses render their message here
        return self.message()

    def message(self) -> str:
        return self.__class__.__name__


@dataclass
class InvariantBroken(LessorError):
    """A bug or corrupted state, never a client's mistake (HTTP 500)."""

    what: str
    type = "internal_error"

    def message(self) -> str:
        return self.what


@dataclass
class ConfigProblem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


@dataclass
class ConfigError(LessorError):
    source: str
    problems: list[ConfigProblem] = field(default_factory=list)
    type = "config_error"

    def message(self) -> str:
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"{self.source}: {len(self.problems)} problem(s)\n{lines}"


@dataclass
class InvalidRequest(LessorError):
    """A client's body or parameter is wrong; `field` is its dotted path."""

    field: str | None
    reason: str
    type = "invalid_request"

    def message(self) -> str:
        if not self.field or self.reason.startswith(f"{self.field}: "):
            return self.reason
        return f"{self.field}: {self.reason}"


@dataclass
class Unauthorized(LessorError):
    reason: str
    type = "unauthorized"

    def message(self) -> str:
        return self.reason


@dataclass
class UnknownDevice(LessorError):
    device: str
    known: list[str]
    type = "device_not_found"
    field = "device"

    def message(self) -> str:
        return f"no device '{self.device}'; devices: {', '.join(sorted(self.known)) or 'none'}"


@dataclass
class UnknownModel(LessorError):
    model: str
    known: list[str]
    type = "model_not_found"
    field = "model"

    def message(self) -> str:
        names = ", ".join(sorted(self.known)) or "none configured"
        return f"no model named '{self.model}'; known models: {names}"


@dataclass
class UnknownFingerprint(LessorError):
    key: str
    known: int
    type = "fingerprint_not_found"
    field = "key"

    def message(self) -> str:
        return f"no fingerprint '{self.key}' ({self.known} recorded); GET /admin/v1/fingerprints lists their keys"


@dataclass
class NoEngineLog(LessorError):
    model: str
    type = "log_not_found"
    field = "name"

    def message(self) -> str:
        return f"model '{self.model}' has no engine log yet (it was never started)"
