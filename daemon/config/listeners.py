"""The listeners' config sections: the admin API and the router (its API keys, both listeners'
request-head limits). Part of the one config tree (config.py); here because what a socket takes
is a concept of its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StringConstraints, model_validator

from ..errors import ConfigError, ConfigProblem
from ..planning.profile import Size
from ..units import KiB, MiB
from .fields import Duration, DurationOrNever, Listen, Strict


def _head_limits(listener: str) -> dict[str, Any]:
    """The request-head limits both listeners take (nginx's defaults: large_client_header_buffers
    4 8k), read before a request is parsed on, so a huge head costs at most the limit."""
    return {
        "max_request_line": Field(default=8 * KiB, ge=256, le=1 * MiB, description=f"Longest request line (method, URL, version) {listener} reads; longer gets 414 and the connection is closed."),
        "max_header_line": Field(default=8 * KiB, ge=256, le=1 * MiB, description=f"Longest header line (name and value) {listener} reads; longer gets 431 and the connection is closed."),
        "max_headers": Field(default=100, ge=1, le=10_000, description=f"Most header lines in a request {listener} reads; more get 431 and the connection is closed."),
        "max_head": Field(default=32 * KiB, ge=1 * KiB, le=16 * MiB, description=f"Largest request head (request line and every header) {listener} reads; larger gets 431 and the connection is closed."),
    }


_ADMIN_LIMITS, _ROUTER_LIMITS = _head_limits("the admin API"), _head_limits("the router")

# A Host header's name (a DNS name or an IP address, IPv6 with or without brackets) or "*".
_HOST_NAME = r"^(\*|\[?[A-Za-z0-9.:_-]{1,253}\]?)$"
_ORIGIN = r"^(\*|https?://[A-Za-z0-9.:\[\]_-]{1,253})$"


def _site_fields(listener: str, whose: str = "a request's") -> dict[str, Any]:
    """Which sites may drive a listener from a browser (api/origins.py runs the checks)."""
    return {
        "allowed_hosts": Field(default_factory=list, max_length=64, description=f"Names {whose} Host header may carry at {listener}, besides the listen address's host, localhost, 127.0.0.1 and ::1 (and, when listening on 0.0.0.0 or ::, any IP address and this machine's host name). Any other Host gets 403 before the request does anything: a web page that resolves its own name to this machine (DNS rebinding) cannot drive lessor. \"*\" turns the check off (a reverse proxy in front that checks it)."),
        "allowed_origins": Field(default_factory=list, max_length=64, description=f"Web origins (scheme://host[:port]) besides the page's own site whose requests {listener} serves. A request with any other Origin header (a browser page of another site: a form post, a fetch) gets 403 before it does anything; requests without one (curl, the CLI, SDKs) are served. No CORS preflight is ever granted, so a browser sends another origin's non-simple requests (JSON, a bearer header) nowhere. \"*\" turns the check off."),
    }


# The router checks the Host of a browser's requests only (an Origin or Sec-Fetch-* header): an SDK
# or a container may reach it by any name, and cannot be a rebound page.
_ADMIN_SITES = _site_fields("the admin API")
_ROUTER_SITES = _site_fields("the router", "a browser's request (one with an Origin or Sec-Fetch-* header)")
HostName = Annotated[str, StringConstraints(pattern=_HOST_NAME)]
Origin = Annotated[str, StringConstraints(pattern=_ORIGIN)]


def _check_head_limits(config: Any) -> Any:
    for name in ("max_request_line", "max_header_line"):
        if getattr(config, name) > config.max_head:
            raise ValueError(f"{name} ({getattr(config, name)} bytes) is over max_head ({config.max_head} bytes), "
                             f"so max_head would refuse first: lower {name} or raise max_head")
    return config


class AdminConfig(Strict):
    listen: Listen = Field(default="127.0.0.1:8470", description="HOST:PORT of the admin API (loopback by default).")
    unix_socket: str | None = Field(default=None, description="Also serve the admin API on this unix socket (mode 0660).")
    token_file: str | None = Field(default=None, description="File holding the bearer token for mutating calls; default <state_dir>/admin.token, created when missing. LESSOR_ADMIN_TOKEN overrides.")
    sse_keepalive_s: float = Field(default=15.0, gt=0, le=3600, description="Seconds without an event after which the event stream sends a keep-alive comment, so proxies and clients do not close it as idle.")
    request_timeout: Duration = Field(default=30.0, gt=0, le=3600, description="Longest a client may take to send a whole request (head and body) to the admin API; a slower one gets 408 and is disconnected. A connection idle between requests is closed after twice this.")
    allowed_hosts: list[HostName] = _ADMIN_SITES["allowed_hosts"]
    allowed_origins: list[Origin] = _ADMIN_SITES["allowed_origins"]
    max_request_line: Size = _ADMIN_LIMITS["max_request_line"]
    max_header_line: Size = _ADMIN_LIMITS["max_header_line"]
    max_headers: int = _ADMIN_LIMITS["max_headers"]
    max_head: Size = _ADMIN_LIMITS["max_head"]

    @model_validator(mode="after")
    def _head_fits(self) -> AdminConfig:
        return _check_head_limits(self)


class ApiKey(Strict):
    key: str | None = Field(default=None, min_length=16, description="The key itself (prefer key_file or key_env: a config is often world-readable).")
    key_file: str | None = Field(default=None, description="File holding the key (first line).")
    key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the key.")
    models: list[str] = Field(min_length=1, description="Model names or aliases this key may use; \"*\" for every model.")
    name: str | None = Field(default=None, max_length=64, description="A label for logs and metrics (never the key).")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        given = [n for n in ("key", "key_file", "key_env") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of key, key_file, key_env (got {', '.join(given) or 'none'})")
        return self

    def secret(self) -> str:
        """The key's value; a ConfigError naming the field when its file or variable is missing."""
        if self.key:
            return self.key
        if self.key_env:
            value = os.environ.get(self.key_env, "").strip()
            if len(value) < 16:
                raise ConfigError("router.api_keys", [ConfigProblem("router.api_keys.key_env",
                                  f"${self.key_env} is unset or shorter than 16 characters")])
            return value
        try:
            value = Path(self.key_file or "").read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError("router.api_keys", [ConfigProblem("router.api_keys.key_file",
                              f"cannot read a key from {self.key_file}: {getattr(exc, 'strerror', None) or 'empty file'}")]) from None
        if len(value) < 16:
            raise ConfigError("router.api_keys", [ConfigProblem("router.api_keys.key_file",
                              f"the key in {self.key_file} is shorter than 16 characters")])
        return value


class RouterConfig(Strict):
    listen: Listen = Field(default="127.0.0.1:8471", description="HOST:PORT of the OpenAI-compatible router.")
    max_queue: int = Field(default=64, ge=0, le=100_000, description="Requests per model that may wait (for a load, a swap or a free slot); more get 429 with Retry-After.")
    wait_timeout: Duration = Field(default=300.0, gt=0, description="Longest a request waits for its model (a load, a swap, a slot) before 503 with Retry-After. 5 minutes by default: a cold load of a large model takes a few, and a client's own timeout is longer (the openai client waits 10). A request whose model's load waits for something that changes no sooner than this (the policy weighs it again later, the busy models it waits for are measured to take longer) is answered at once: 503 not_served_in_time, Retry-After when that changes (at most this).")
    request_keep_alive_max: DurationOrNever | None = Field(default=None, description="A request's own keep_alive (Ollama's field: seconds or a duration such as \"5m\"; 0 = unload once idle; -1 = forever) keeps its model loaded that long once idle, until it unloads; the latest request's wins. Bounded by this: unset (the default) = the model's own keep_alive, so a request may shorten it but never lengthen it; a duration = at most that, for every model; -1 = any, forever included. Pinned models are never unloaded.")
    drain_after: Duration = Field(default=30.0, ge=0, le=3600, description="Seconds an on-demand load waits for the busy models it must evict to go idle by themselves; then they are drained (their new requests wait) so it gets its turn. 0 = drain at once: fairest, most swaps.")
    retry_after_loading_s: Duration = Field(default=5.0, gt=0, le=3600, description="Retry-After of the 429 a full queue answers while its model is not ready (loading, or waiting for its turn), until a load of it was measured; then the router predicts the wait: what is left of that load plus the queue ahead at the measured time per request.")
    retry_after_busy_s: Duration = Field(default=1.0, gt=0, le=3600, description="Retry-After of the 429 a full queue answers while its model is ready (the queue waits for free max_concurrency slots), until requests of it were measured; then the queue ahead over its slots at the measured time per request.")
    max_body: Size = Field(default=16 * MiB, ge=1024, description="Largest request body the router accepts; larger gets 413.")
    keep_alive_check: Duration = Field(default=1.0, gt=0, le=60, description="How often idle models are checked against their keep_alive.")
    request_timeout: Duration = Field(default=30.0, gt=0, le=3600, description="Longest a client may take to send a whole request (head and body); a slower one gets 408 and is disconnected.")
    first_byte_timeout: Duration = Field(default=600.0, ge=0.1, le=86400, description="Longest an engine may take to begin its answer (its first byte of body, or the whole answer; a streaming engine's head alone does not count: it comes before the prefill) once the request is sent, connecting included; then the client gets 504 upstream_timeout and the engine's connection is closed, so the engine drops the request and the model is free again. 10 minutes by default: a long prompt's prefill on a large model, behind the requests its engine already runs, may take minutes; only an engine that hangs takes this long.")
    stream_idle_timeout: Duration = Field(default=120.0, ge=0.1, le=86400, description="Longest an answer may stall once it has begun: no byte from the engine for this long cuts it (a stream ends with a final SSE error event, upstream_timeout; another answer is cut short), and so does a client that reads nothing of its answer for this long (its connection is closed); either way the engine's connection is closed and the request stops holding its model. 2 minutes by default: an engine streams a token every few milliseconds to seconds, a batch's prefill steps in between; minutes of silence is a hung engine or a client that left without closing.")
    drain_timeout: Duration = Field(default=120.0, ge=0, le=86400, description="Longest the requests of a drained model (see drain_after) may run on once it is drained: then they are cut (503 drain_timeout, or a final SSE error event in a stream) and the load that waits for their model goes on, so no request holds a model against the others for ever. Keep drain_after + this + a load under wait_timeout, or the requests waiting for the load time out first (the defaults: 30 + 120 s of 300).")
    max_request_line: Size = _ROUTER_LIMITS["max_request_line"]
    max_header_line: Size = _ROUTER_LIMITS["max_header_line"]
    max_headers: int = _ROUTER_LIMITS["max_headers"]
    max_head: Size = _ROUTER_LIMITS["max_head"]
    allowed_hosts: list[HostName] = _ROUTER_SITES["allowed_hosts"]
    allowed_origins: list[Origin] = _ROUTER_SITES["allowed_origins"]
    api_keys: list[ApiKey] = Field(default_factory=list, description="When set, every request needs 'Authorization: Bearer KEY' and may use only that key's models; when empty, the router is open (it listens on loopback by default).")

    @model_validator(mode="after")
    def _head_fits(self) -> RouterConfig:
        return _check_head_limits(self)
