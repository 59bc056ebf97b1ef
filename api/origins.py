"""Which sites may drive lessord: the Host and Origin checks both listeners run on every request
before it does anything (no load, no eviction, no read of state).

A web page the user opens can send requests to the loopback ports: with a name of its own that
resolves to 127.0.0.1 (DNS rebinding: the request's Host is that name), or as a cross-origin simple
request (a form post, a text/plain fetch: its Origin is the page's site). So:
- Host (TCP listeners): its name must be one the listener answers to: the listen address's host,
  localhost, 127.0.0.1, ::1, and `allowed_hosts`; when listening on every address (0.0.0.0, ::),
  any IP address and the machine's own host name too (a page cannot rebind an address, only a
  name, and cannot be served from this machine's name). "*" in `allowed_hosts` turns
  the check off (a reverse proxy in front that checks it). A request with no Host (HTTP/1.0, not
  a browser) passes. The admin unix socket has no Host check: no browser reaches it.
- Origin (every listener): a request without one (curl, the CLI, SDKs) passes; one with an Origin
  must come from the page's own site (the Origin's host and port are the request's Host: the
  dashboard) or one listed in `allowed_origins`. "null" (a sandboxed page, a file) never passes.
lessor answers no CORS preflight with Access-Control-Allow-*, so a browser never sends another
origin's non-simple request (JSON, a bearer header); the Origin check refuses the simple ones.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..daemon.config.fields import parse_listen
from .refusals import CrossSiteRequest

LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
EVERY_ADDRESS = frozenset(("", "0.0.0.0", "::", "*"))
DEFAULT_PORTS = {"http": 80, "https": 443}
_RULES: dict[tuple[int, str], tuple[object, SiteRules]] = {}  # SiteRules.cached; holds the config: its id stays its own


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header's name (lower case, IPv6 without brackets) and port (None when not given)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:  # a name, or a bare IPv6 address
        name, port = value, ""
    return name.rstrip("."), int(port) if port.isdigit() else None


@dataclass(frozen=True)
class SiteRules:
    hosts: frozenset[str]
    any_host: bool  # allowed_hosts has "*"
    any_ip: bool  # listening on every address
    origins: frozenset[str]  # scheme://host:port, normalized
    any_origin: bool
    section: str  # "admin" or "router": names the config fields in refusals

    @classmethod
    def cached(cls, config, section: str) -> SiteRules:
        """`of`, built once per config object (a reload swaps the object): every request asks."""
        key = (id(config), section)
        held = _RULES.get(key)
        if held is None or held[0] is not config:
            if len(_RULES) > 8:
                _RULES.clear()
            held = _RULES[key] = (config, cls.of(config, section))
        return held[1]

    @classmethod
    def of(cls, config, section: str) -> SiteRules:
        """The rules of a listener's config section (admin or router: listen, allowed_hosts, allowed_origins)."""
        host, _ = parse_listen(config.listen)
        named = frozenset(split_host(h)[0] if not _is_ip(h) else h.lower() for h in config.allowed_hosts if h != "*")
        origins = frozenset(o for o in (normal_origin(o) for o in config.allowed_origins if o != "*") if o)
        every = host in EVERY_ADDRESS
        return cls(hosts=LOOPBACK_NAMES | {host.lower()} | named | (own_names() if every else frozenset()),
                   any_host="*" in config.allowed_hosts, any_ip=every, origins=origins, any_origin="*" in config.allowed_origins,
                   section=section)

    def host_allowed(self, host: str) -> bool:
        name, _ = split_host(host)
        return self.any_host or name in self.hosts or (self.any_ip and _is_ip(name))

    def check(self, host: str | None, origin: str | None, tcp: bool = True) -> None:
        """Raise CrossSiteRequest naming the header unless the request may go on."""
        if tcp and host is not None and not self.host_allowed(host):
            raise CrossSiteRequest("Host", host, f"{self.section}.allowed_hosts")
        if origin is None or self.any_origin:
            return
        normal = normal_origin(origin)
        if normal is not None and (normal in self.origins or (host is not None and same_site(normal, host))):
            return
        raise CrossSiteRequest("Origin", origin, f"{self.section}.allowed_origins")


def own_names() -> frozenset[str]:
    """This machine's host name and its first label (`gpu-box.lab`, `gpu-box`): what an operator
    types on the LAN. A page elsewhere cannot take them (it would have to be served from them)."""
    name = socket.gethostname().lower().rstrip(".")
    return frozenset(n for n in (name, name.split(".")[0]) if n)


def normal_origin(origin: str) -> str | None:
    """scheme://host:port (lower case, the default port written out); None for "null" or garbage."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{name}:{port}"


def same_site(normal: str, host: str) -> bool:
    """Whether an Origin (normalized) is the request's own site: its host and port are the Host's."""
    scheme, _, netloc = normal.partition("://")
    name, port = split_host(host)
    origin_name, origin_port = split_host(netloc)
    return origin_name == name and origin_port == (port or DEFAULT_PORTS[scheme])
