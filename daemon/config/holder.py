"""The config in force: one holder that the controller, supervisor and ledger read, swapped in
one step on reload (never copies updated one after another)."""

from __future__ import annotations

from ...engines import enginelog
from .schema import DevicesConfig, LessorConfig


class ConfigHolder:
    def __init__(self, config: LessorConfig) -> None:
        self._config = config
        enginelog.configure(config.engine_logs.limits())  # engine starts read it: no config is passed down there

    @property
    def current(self) -> LessorConfig:
        return self._config

    def devices(self) -> DevicesConfig:
        return self._config.devices

    def swap(self, config: LessorConfig) -> LessorConfig:
        """Put `config` in force; returns the one it replaces."""
        previous, self._config = self._config, config
        enginelog.configure(config.engine_logs.limits())
        return previous
