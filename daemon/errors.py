"""Typed errors. Each carries the numbers a message needs; api/errors.py maps them to HTTP in one table.

A shortfall of memory during admission is a return value (policies' Rejected), not an
exception; NotEnoughMemory is raised only where a caller asked for an action that cannot
proceed (an explicit load that the policy rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .units import format_bytes


class LessorError(Exception):
    """Base: `type` names the error in API envelopes, `field` the input it is about (if any)."""

    type = "lessor_error"  # subclasses may also carry `field`, the input the error is about

    def __str__(self) -> str:  # dataclass subclasses render their message here
        return self.message()

    def message(self) -> str:
        return self.__class__.__name__


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
class NoEngineLog(LessorError):
    model: str
    type = "log_not_found"
    field = "name"

    def message(self) -> str:
        return f"model '{self.model}' has no engine log yet (it was never started)"


@dataclass
class Forbidden(LessorError):
    """A router API key that may not use this model."""

    model: str
    allowed: tuple[str, ...]
    type = "model_not_allowed"
    field = "model"

    def message(self) -> str:
        return (f"this API key may not use model '{self.model}'; it may use: {', '.join(self.allowed) or 'no model'} "
                "(router.api_keys)")


@dataclass
class CrossSiteRequest(LessorError):
    """A request whose Host or Origin header names a site the listener does not serve: a page of
    another site (through DNS rebinding, or a cross-origin form or fetch) may not drive lessor."""

    field: str  # the header: "Host" or "Origin"
    value: str
    setting: str  # the config field that would allow it, e.g. "admin.allowed_hosts"
    type = "cross_site_request"

    def message(self) -> str:
        shown = self.value if len(self.value) <= 100 else f"{self.value[:100]}..."
        if self.field == "Host":
            return (f"Host: '{shown}' is not a name this listener answers to (a web page reaching it through DNS "
                    f"rebinding?); nothing was done. If the name is yours, add it to {self.setting}")
        return (f"Origin: '{shown}' is a page of another site than this listener's; a browser page of another "
                f"origin may not call lessor, nothing was done. If the page is yours, add its origin to {self.setting}")


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
class QueueFull(LessorError):
    """The router's per-model queue is full: the client should back off."""

    model: str
    limit: int
    retry_after_s: float = 1.0
    type = "queue_full"

    def message(self) -> str:
        return (f"model '{self.model}' already has {self.limit} requests waiting (router.max_queue); "
                f"retry after {self.retry_after_s:g} s")


@dataclass
class WaitTimedOut(LessorError):
    model: str
    waited_s: float
    waiting_for: str
    retry_after_s: float = 5.0
    type = "wait_timed_out"

    def message(self) -> str:
        return (f"model '{self.model}' was not available after {self.waited_s:g} s (waiting for {self.waiting_for}); "
                "raise router.wait_timeout or retry later")


@dataclass
class NotServedInTime(WaitTimedOut):
    """Known at once, not waited out: what the model's load waits for changes no sooner than
    `expected_s` from now, past what is left of the request's wait (`left_s` of router.wait_timeout,
    `waited_s` here); or, `missed_s` set, the policy's estimate of that many seconds came due and
    its load still waits, further off: a moving target is no reason to hold the request."""

    expected_s: float = 0.0
    left_s: float | None = None
    missed_s: float | None = None
    type = "not_served_in_time"

    def message(self) -> str:
        retry = f"retry after {math.ceil(self.retry_after_s)} s"
        if self.missed_s is not None:
            return (f"model '{self.model}' is not served: {self.waiting_for}; its load was to be possible in about "
                    f"{math.ceil(self.missed_s)} s, and weighed again then it still waits (about "
                    f"{math.ceil(self.expected_s)} s more, loading included), so the request is answered now "
                    f"instead of waiting out {self._patience()}; {retry}")
        return (f"model '{self.model}' cannot be served within {self._patience()}: {self.waiting_for}; it could be served in "
                f"about {math.ceil(self.expected_s)} s at the soonest; {retry}")

    def _patience(self) -> str:
        within = f"router.wait_timeout ({self.waited_s:g} s)"
        return within if self.left_s is None else f"the {math.floor(self.left_s)} s left of {within}"


@dataclass
class UpstreamFailed(LessorError):
    """The model's engine could not be reached or broke the connection."""

    model: str
    reason: str
    type = "upstream_error"

    def message(self) -> str:
        return f"model '{self.model}': its engine did not answer: {self.reason}"


@dataclass
class UpstreamTimedOut(LessorError):
    """The model's engine sent nothing for too long: before its answer began, or in the middle of
    it. The router cut the request (closing the engine's connection, so the engine drops it) rather
    than let it hold its model against every other model's requests for ever."""

    model: str
    silence: str  # what the engine did not do: "sent no first byte of its answer", "accepted no connection"
    timeout_s: float
    setting: str  # the config field that bounds it
    type = "upstream_timeout"

    def message(self) -> str:
        return (f"model '{self.model}': its engine {self.silence} within {self.setting} "
                f"({self.timeout_s:g} s); the request was cut so it does not hold the model; if the engine is "
                f"only slow (a long prompt on a large model), raise {self.setting}")


@dataclass
class DrainTimedOut(LessorError):
    """A request that ran while its model was drained for another model's load, and did not finish
    within router.drain_timeout: cut, so the load goes on (the model is loaded again later)."""

    model: str
    loading: str  # the model whose load waited for it
    timeout_s: float
    retry_after_s: float = 5.0
    type = "drain_timeout"

    def message(self) -> str:
        return (f"model '{self.model}': the request was cut after router.drain_timeout ({self.timeout_s:g} s): "
                f"'{self.loading}' waits for its turn on the same devices and the requests already running were "
                f"to finish within that; retry (the model is served again after the swap), or raise "
                f"router.drain_timeout for longer requests")


@dataclass
class PlanRejected(LessorError):
    """No engine parameters fit, or the configured ones break an engine rule."""

    model: str
    reasons: list[str]
    field: str | None = None
    type = "plan_rejected"

    def message(self) -> str:
        return f"model '{self.model}' cannot be planned: " + "; ".join(self.reasons)


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
class UnknownFingerprint(LessorError):
    key: str
    known: int
    type = "fingerprint_not_found"
    field = "key"

    def message(self) -> str:
        return f"no fingerprint '{self.key}' ({self.known} recorded); GET /admin/v1/fingerprints lists their keys"


@dataclass
class OutOfMemory(LoadFailed):
    """The load ran out of memory: its engine died of it (`kind` "oom"), or it measured above its
    leases beyond the tolerance ("overrun"). Its measurement is in the fingerprints."""

    kind: str = "oom"
    type = "out_of_memory"


@dataclass
class LedgerUnavailable(LessorError):
    """The ledger's database refused a write (disk full, server restarting). Nothing was granted:
    lessor never hands out memory it could not record."""

    doing: str
    reason: str
    retry_after_s: float = 5.0
    type = "ledger_unavailable"

    def message(self) -> str:
        return (f"the ledger could not {self.doing}: {self.reason}; nothing was granted. "
                "Free disk space for the SQLite file or bring the database back; retry then")


@dataclass
class InvariantBroken(LessorError):
    """A bug or corrupted state, never a client's mistake (HTTP 500)."""

    what: str
    type = "internal_error"

    def message(self) -> str:
        return self.what


# The HTTP servers' own refusals: requests answered before any model is asked. The router and the
# admin API raise the same classes, so api/errors.py's one table gives both their status.


@dataclass
class InvalidApiKey(Unauthorized):
    """The router's Authorization header names none of router.api_keys."""

    type = "invalid_api_key"


@dataclass
class MalformedRequest(LessorError):
    """Bytes that are not an HTTP/1.1 request the server can read on; the connection closes after the answer."""

    reason: str
    type = "bad_request"

    def message(self) -> str:
        return self.reason


@dataclass
class NoRoute(LessorError):
    method: str
    path: str
    server: str = ""  # who answers, for the message ("the router")
    serves: tuple[str, ...] = ()  # the paths that server does serve
    type = "not_found"

    def message(self) -> str:
        text = f"no route for {self.method} {self.path}"
        return f"{text}; {self.server or 'this server'} serves {', '.join(self.serves)}" if self.serves else text


@dataclass
class MethodNotAllowed(LessorError):
    method: str
    path: str
    allowed: tuple[str, ...]
    type = "method_not_allowed"

    def message(self) -> str:
        return f"{self.path} takes {' or '.join(self.allowed)}, not {self.method}"


@dataclass
class BodyTooLarge(LessorError):
    limit_bytes: int
    setting: str  # what sets the limit, so the message says what to raise
    type = "body_too_large"

    def message(self) -> str:
        return f"the body is larger than {self.setting} ({self.limit_bytes} bytes)"


@dataclass
class HeadTooLarge(LessorError):
    """A request head over a listener's limit: read no further than the limit, answered, then the
    connection closes (what follows cannot be framed)."""

    what: str  # "a header line", "the head": what was too long
    limit: int
    setting: str  # the config field that sets the limit
    unit: str = "bytes"
    type = "header_too_large"

    def message(self) -> str:
        return f"{self.what} is over {self.setting} ({self.limit} {self.unit}); send less, or raise {self.setting}"


@dataclass
class UrlTooLong(HeadTooLarge):
    type = "uri_too_long"


@dataclass
class RequestTimedOut(LessorError):
    """A client that did not send a whole request in time (a stalled or slowloris client)."""

    timeout_s: float
    setting: str
    type = "request_timeout"

    def message(self) -> str:
        return f"the request was not received whole within {self.setting} ({self.timeout_s:g} s)"


@dataclass
class LedgerDamaged(InvariantBroken):
    """The ledger's database is damaged or lost state its record says it had (daemon/ledger/record.py).
    Raised when the ledger opens, before anything is changed: lessord refuses to start rather than
    start empty and stop engines it forgot. `what` names the file (or database), `damage` the kind."""

    damage: str = ""
    expected: str = ""  # what the record says was there
    recover: str = ""  # the commands that get past it

    def message(self) -> str:
        expected = f" ({self.expected})" if self.expected else ""
        recover = f"; {self.recover}" if self.recover else ""
        return f"the ledger {self.what} {self.damage}{expected}; nothing was changed and running engines were left alone{recover}"
