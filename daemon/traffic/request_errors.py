"""A request the router could not serve after taking it: the model's queue was full, the model was
not available in time, its engine failed or fell silent, a drain cut it, or its API key may not use
the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LessorError


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
