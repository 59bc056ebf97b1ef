"""What a config reload changed among the models: the names added, removed and changed (the
supervisor applies it; the controller and the reload's answer say it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
