"""The supervisor's bounds on an engine's steps: loading its weights, becoming ready, stopping,
adoption after a restart of lessord, strays, and a stopped engine's memory coming back (runtime.py
builds them from the config's `timeouts` section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    weights_s: float = 600.0
    ready_s: float = 120.0
    stop_grace_s: float = 15.0
    adopt_s: float = 30.0  # an adopted engine must answer its health check within this
    adopt_stopped_s: float = 10.0  # an engine found stopped (SIGSTOP) at adoption may resume within this
    stray_grace_s: float = 5.0  # SIGTERM to SIGKILL for engines found running but never recorded
    unload_verify_s: float = 10.0  # a stopped engine's memory must be back within this
