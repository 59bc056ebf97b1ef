"""Memory fingerprints: what lessor measured of a model's engine, remembered per key.

The key is the model, the engine kind and version (what its package reports), the device names of
the placement and every argument that decides the engine's memory. A plan for the same key takes
max(predicted, measured) per component plus `planner.measured_margin` (daemon/planning/profile.py does the
arithmetic); a measurement under another key is shown beside the plan, never used.

`FingerprintStore` is the one writer of the fingerprints table (in the ledger's database; in
memory for the policy simulator). A load's samples become a `Fingerprint` in daemon/models/sampling.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .database import STORAGE_ERRORS, fingerprints_table, short_error, write
from .ledger_errors import LedgerUnavailable

log = logging.getLogger("lessor.fingerprints")

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10, the floor, has no StrEnum: the same behaviour (str() and f-strings give the value)
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class Outcome(StrEnum):
    READY = "ready"  # the load finished: its steady figures are exact
    OVERRUN = "overrun"  # it ran, above its leases beyond the tolerance: exact, and too much
    OOM = "oom"  # it died of out-of-memory: what it reached is a lower bound of what it needs


@dataclass(frozen=True)
class FingerprintKey:
    model: str
    engine: str
    engine_version: str
    devices: tuple[str, ...]  # device names of the placement, in its order ("NVIDIA H200", "host RAM")
    flags: Mapping[str, Any] = field(default_factory=dict)  # JSON values

    @property
    def digest(self) -> str:
        text = json.dumps([self.model, self.engine, self.engine_version, list(self.devices), dict(self.flags)],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def differences(self, other: FingerprintKey) -> list[str]:
        """Why a measurement under `other` does not apply to this key, in words."""
        out = []
        if other.engine_version != self.engine_version:
            out.append(f"engine version {other.engine_version!r}, now {self.engine_version!r}")
        if tuple(other.devices) != tuple(self.devices):
            out.append(f"devices {', '.join(other.devices)}, now {', '.join(self.devices)}")
        changed = sorted(k for k in set(other.flags) | set(self.flags) if other.flags.get(k) != self.flags.get(k))
        if changed:
            out.append("flags " + ", ".join(f"{k} {other.flags.get(k)!r}, now {self.flags.get(k)!r}" for k in changed))
        return out


@dataclass(frozen=True)
class DeviceMeasurement:
    """One device's samples over a load."""

    device: str  # the placement's device id ("gpu0")
    method: str  # nvml | engine (its own report) | pss (of its process group)
    peak_bytes: int  # the most seen from spawn to ready, or to the failure
    loading_peak_bytes: int  # the most seen before the weights were in
    steady_bytes: int  # at ready (0: it never got there)
    weights_bytes: int | None  # when the weights were in, where the engine tells (two-phase engines)
    kv_bytes: int | None  # what allocating the KV cache added, where the engine tells
    kv_tokens: int  # the KV cache planned for this load
    leased_bytes: int  # what the model held on the device at its worst moment
    two_phase: bool = True  # the engine loads its weights, then allocates the KV cache lessor grants


@dataclass(frozen=True)
class Fingerprint:
    key: FingerprintKey
    devices: tuple[DeviceMeasurement, ...]
    outcome: str
    measured_at_s: float  # wall-clock seconds
    loads: int = 1

    @property
    def digest(self) -> str:
        return self.key.digest

    def merged(self, newer: Fingerprint) -> Fingerprint:
        """The newest load's measurement, counting the loads: a device's figures are kept as one
        load measured them (a steady value from one load beside the KV cache of another would say
        nothing true), and the plan takes the larger of it and the model anyway."""
        return replace(newer, loads=self.loads + newer.loads)

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at_s))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.digest, "model": self.key.model, "engine": self.key.engine,
                "engine_version": self.key.engine_version, "devices": list(self.key.devices),
                "flags": dict(self.key.flags), "outcome": self.outcome, "loads": self.loads,
                "measured_at_s": self.measured_at_s, "measured": [asdict(d) for d in self.devices]}

    def row(self) -> dict[str, Any]:
        return {"key": self.digest, "model": self.key.model, "engine": self.key.engine,
                "engine_version": self.key.engine_version, "devices": json.dumps(list(self.key.devices)),
                "flags": json.dumps(dict(self.key.flags), sort_keys=True, default=str),
                "measured": json.dumps([asdict(d) for d in self.devices]), "outcome": self.outcome,
                "loads": self.loads, "measured_at": self.measured_at_s}

    @classmethod
    def from_row(cls, row) -> Fingerprint:
        key = FingerprintKey(row.model, row.engine, row.engine_version, tuple(json.loads(row.devices)),
                             json.loads(row.flags))
        devices = tuple(DeviceMeasurement(**d) for d in json.loads(row.measured))
        return cls(key, devices, Outcome(row.outcome), row.measured_at, row.loads)


class FingerprintStore:
    """The fingerprints, read at open and kept in memory; every change written through first."""

    def __init__(self, engine: AsyncEngine | None, clock: Callable[[], float] = time.time) -> None:
        self._engine, self._clock = engine, clock
        self._lock = asyncio.Lock()
        self._rows: dict[str, Fingerprint] = {}

    @classmethod
    async def open(cls, engine: AsyncEngine | None, **kwargs) -> FingerprintStore:
        store = cls(engine, **kwargs)
        if engine is not None:
            try:
                async with engine.begin() as conn:
                    rows = (await conn.execute(select(fingerprints_table))).all()
            except STORAGE_ERRORS as exc:
                raise LedgerUnavailable("read the fingerprints", short_error(exc)) from exc
            for row in rows:
                try:
                    store._rows[row.key] = Fingerprint.from_row(row)
                except (TypeError, ValueError, KeyError) as exc:  # a row this lessord cannot read: a measurement lost, not a start
                    log.warning("fingerprint %s unreadable, ignored (the next load of its key replaces it): %s", row.key, exc)
        return store

    def all(self) -> list[Fingerprint]:
        return sorted(self._rows.values(), key=lambda f: (f.key.model, -f.measured_at_s))

    def get(self, key: FingerprintKey) -> Fingerprint | None:
        return self._rows.get(key.digest)

    def others(self, key: FingerprintKey) -> list[Fingerprint]:
        """Measurements of the same model and engine under another key: shown, not used."""
        return [f for f in self.all() if f.key.model == key.model and f.key.engine == key.engine
                and f.digest != key.digest]

    async def record(self, key: FingerprintKey, devices: tuple[DeviceMeasurement, ...], outcome: str) -> Fingerprint:
        """Merge a load's measurement into its key's fingerprint and persist it. Raises LedgerUnavailable."""
        fingerprint = Fingerprint(key, devices, outcome, self._clock())
        async with self._lock:
            old = self._rows.get(fingerprint.digest)
            new = old.merged(fingerprint) if old else fingerprint
            # Replace whatever the table holds under the key (a row this lessord could not read too).
            await self._write("record a fingerprint", (delete(fingerprints_table).where(fingerprints_table.c.key == new.digest),),
                              (insert(fingerprints_table).values(**new.row()),))
            self._rows[new.digest] = new
            return new

    async def delete(self, digest: str) -> Fingerprint | None:
        async with self._lock:
            if digest not in self._rows:
                return None
            await self._write("delete a fingerprint", (delete(fingerprints_table).where(fingerprints_table.c.key == digest),))
            return self._rows.pop(digest)

    async def _write(self, doing: str, *statements: tuple) -> None:
        """One transaction (ledger_db.write); in memory, nothing to write."""
        if self._engine is not None:
            await write(self._engine, doing, statements)
