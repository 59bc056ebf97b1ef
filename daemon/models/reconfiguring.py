"""Config changes as the supervisor applies them (`Reconfiguring`, which the runtime builds and the
supervisor holds; daemon/config/reloading.py orders them): models added, removed (unloaded first)
and retuned (a running model keeps running; its new spec applies at its next load), and the holds
that keep a reload from starving: no load of a model it changes starts while it waits or applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config.changes import ConfigChange
from .crashes import Crashes
from .lifecycle import ModelRecord, ModelState
from .load_errors import ModelBusy

if TYPE_CHECKING:
    from ..config.holder import ConfigHolder
    from .loads import Loads

BUSY = (ModelState.LOADING, ModelState.UNLOADING, ModelState.ADOPTING)  # mid-transition: not evicted, unloaded, retuned


class Reconfigurable(Protocol):
    """What a config change asks of the supervisor: its records by name, and an unload."""

    def record_set(self) -> dict[str, ModelRecord]: ...
    async def unload(self, name: str, reason: str = "unload requested") -> ModelRecord: ...


class Reconfiguring:
    """The config changes of the supervisor that `supervisor()` returns (the runtime builds both,
    daemon/runtime.py). Its own state: the holds on loads and the watchers of transitions. It
    writes the supervisor's set of records (a model added or removed) and a record's spec (retuned);
    a model's state changes only through the supervisor (its unload)."""

    def __init__(self, config: ConfigHolder, crashes: Crashes, loads: Loads,
                 supervisor: Callable[[], Reconfigurable]) -> None:
        self._config, self._crashes, self._loads, self._supervisor = config, crashes, loads, supervisor
        self._held_by_pending: frozenset[str] = frozenset()  # loads held for a reload that waits (hold_for_reload)
        self._held_by_apply: frozenset[str] = frozenset()  # loads held while apply_config unloads
        self._transition_watchers: list[Callable[[], None]] = []

    @property
    def _models(self) -> dict[str, ModelRecord]:
        return self._supervisor().record_set()

    def affected_by(self, config) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The models `config` removes and those whose spec it changes."""
        new = {spec.name: spec for spec in config.models}
        removed = tuple(n for n in self._models if n not in new)
        changed = tuple(n for n in self._models if n in new and new[n] != self._models[n].spec)
        return removed, changed

    def reload_blockers(self, config) -> dict[str, str]:
        """The models `config` removes or changes that are mid-transition (loading, being admitted,
        unloading, adopting), with their state: `config` cannot apply before they settle."""
        removed, changed = self.affected_by(config)
        return {n: (self._models[n].state if self._models[n].state in BUSY else ModelState.LOADING).value
                for n in removed + changed if self._models[n].state in BUSY or self._loads.underway(n) is not None}

    def hold_for_reload(self, config) -> None:
        """While a reload waits for `config` (None: none waits), no load of a model it removes or
        changes starts: the loads under way end and none follows, so the reload cannot starve."""
        self._held_by_pending = frozenset(sum(self.affected_by(config), ())) if config is not None else frozenset()

    def watch_transitions(self, callback: Callable[[], None]) -> None:
        """`callback()` after every state change and at the end of every admission (a pending reload's wake-up)."""
        self._transition_watchers.append(callback)

    def transitioned(self) -> None:
        for callback in self._transition_watchers:
            callback()

    def check_not_held(self, record: ModelRecord) -> None:
        name = record.spec.name
        if name in self._held_by_pending or name in self._held_by_apply:
            raise ModelBusy(name, "held for a config reload that changes it")

    async def apply_config(self, config) -> ConfigChange:
        """Add, remove and retune models, then put `config` in force in one step. Running models
        keep running: a changed spec applies at their next load; a removed model is unloaded, and no
        load of an affected model starts meanwhile. Refused (nothing changed) while an affected model
        is mid-transition (reload_blockers: daemon/config/reloading.py waits for them instead)."""
        busy = self.reload_blockers(config)
        if busy:
            name, state = next(iter(busy.items()))
            raise ModelBusy(name, state)
        new = {spec.name: spec for spec in config.models}
        removed, changed = self.affected_by(config)
        self._held_by_apply = frozenset(removed + changed)
        try:
            for name in removed:
                await self._supervisor().unload(name, reason="removed from the config")
                del self._models[name]
        finally:
            self._held_by_apply = frozenset()
        for name in changed:
            self._models[name].spec = new[name]
        added = tuple(n for n in new if n not in self._models)
        for name in added:
            self._models[name] = ModelRecord(new[name])
        self._config.swap(config)
        self._crashes.forget()  # the operator may have fixed what crashed them: every model may be tried again
        return ConfigChange(added, removed, changed)
