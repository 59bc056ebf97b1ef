"""The lease vocabulary, a leaf: what a lease is (its kind, what a load wants, what was granted),
what the ledger records of an engine, the snapshot the ledger answers with, and the bytes leases hold
per model (held_by: the one place they are summed). Plain frozen values;
the ledger (daemon/ledger/ledger.py) is their one writer, everyone else reads them from here without
importing the database."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

from ..policies import DeviceBudget

if TYPE_CHECKING:
    from .devices.probes import DeviceReading


class LeaseKind(str, Enum):
    WEIGHTS = "weights"
    KV = "kv"
    LOAD_PEAK = "load_peak"
    RESERVE = "reserve"


class LeaseState(str, Enum):
    GRANTED = "granted"
    RELEASED = "released"


class EnginePhase(str, Enum):
    LOADING = "loading"  # started; the load protocol's step 5 has not passed yet
    READY = "ready"


@dataclass(frozen=True)
class EngineRecord:
    model: str
    attempt: str
    pid: int
    identity: str
    port: int
    phase: EnginePhase
    params: Mapping[str, object]
    kv_tokens: int
    started_at: float

    def row(self) -> dict:
        return {**self.__dict__, "phase": self.phase.value, "params": json.dumps(dict(self.params), sort_keys=True)}


@dataclass(frozen=True)
class LeaseWant:
    device: str
    kind: LeaseKind
    bytes: int


@dataclass(frozen=True)
class Lease:
    id: str
    model: str
    device: str
    kind: LeaseKind
    bytes: int
    attempt: str
    granted_at: float
    owner_pid: int | None = None
    owner_started_at: float | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "device": self.device, "kind": self.kind.value,
                "bytes": self.bytes, "state": LeaseState.GRANTED.value, "attempt": self.attempt, "granted_at": self.granted_at,
                "owner_pid": self.owner_pid, "owner_started_at": self.owner_started_at}


@dataclass(frozen=True)
class Granted:
    leases: tuple[Lease, ...]


@dataclass(frozen=True)
class LedgerSnapshot:
    leases: tuple[Lease, ...]
    budgets: Mapping[str, DeviceBudget]
    probe: str
    readings: Mapping[str, DeviceReading]  # what the budgets were computed from

    def of_model(self, model: str) -> list[Lease]:
        return [lease for lease in self.leases if lease.model == model]

    def held_by(self) -> dict[str, dict[str, int]]:
        """Bytes held per model per device: {model: {device: bytes}}."""
        return held_by(self.leases)


def held_by(leases: Iterable[Lease], per: Literal["device", "kind"] = "device") -> dict[str, dict[str, int]]:
    """Bytes the leases hold per model, per device (or per kind): {model: {device: bytes}}; a
    model that holds nothing is absent."""
    held: dict[str, dict[str, int]] = {}
    for lease in leases:
        key = lease.device if per == "device" else lease.kind.value
        per_model = held.setdefault(lease.model, {})
        per_model[key] = per_model.get(key, 0) + lease.bytes
    return held
