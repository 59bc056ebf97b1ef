"""Getting past a damaged ledger, on the operator's word: `lessord --recover-from-engines` or
`lessord --start-fresh`, run once (they exit; the next start serves).

Both set the damaged SQLite files (and the old record) aside in `<state_dir>/ledger-damaged-<time>/`
for a post-mortem, never deleting them; on PostgreSQL the database stays and its granted leases are
released. Recovery then writes back the engines of the ledger's record whose process still runs
(same pid and identity: never a recycled pid) with the leases the record kept for them; the start
that follows adopts them like after any restart (health checked, or stopped). What it cannot
identify it says: engines gone, and processes of this state folder the record does not name (the
start stops those as strays: without the record nothing says which model they serve or on which
port). Starting fresh writes nothing back. On a sound ledger both do nothing.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ...engines.process import process_identity
from ...engines.strays import find_strays
from ..config.schema import LessorConfig
from ..devices.probes import DeviceReading
from ..leases import EnginePhase, EngineRecord, Lease, LeaseKind
from .ledger import Ledger
from .ledger_errors import LedgerDamaged
from .record import LedgerRecord, Record, sqlite_file

RECOVER, FRESH = "recover-from-engines", "start-fresh"


@dataclass
class Recovery:
    mode: str
    damage: str = ""  # the refusal that made it needed; empty: the ledger was sound
    set_aside: Path | None = None
    recovered: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    unidentified: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.damage:
            return [f"--{self.mode}: the ledger is sound, nothing to do; start lessord as usual"]
        said = [f"--{self.mode}: {self.damage}"]
        if self.set_aside is not None:
            said.append(f"the damaged files and the old record are set aside in {self.set_aside}")
        said += [f"recovered {what}; the next start adopts it if it answers" for what in self.recovered]
        said += [f"not recovered: {what}" for what in self.gone]
        said += [f"not identified: {what}; the next start stops it as a stray" for what in self.unidentified]
        if self.mode == RECOVER and not (self.recovered or self.gone):
            said.append("the record names no engine: nothing could be recovered from it")
        said.append("start lessord as usual (without --" + self.mode + "): " +
                    ("it adopts the recovered engines" if self.recovered else "it starts with an empty ledger"))
        return said


class _NoProbe:
    """Recovery reads and writes leases only; no budget is computed, no device read."""

    name = "none"

    def read(self, managed_pids: Collection[int] = ()) -> list[DeviceReading]:
        raise RuntimeError("recovery reads no device")

    def close(self) -> None:
        """Nothing to release: it opened no device."""


async def recover(config: LessorConfig, mode: str) -> Recovery:
    record = LedgerRecord.in_state_dir(config.state_dir)
    url = config.ledger_url()
    try:
        ledger = await Ledger.open(url, _NoProbe(), config.devices, record=record)
    except LedgerDamaged as damage:
        report = Recovery(mode, str(damage))
    else:
        await ledger.close()
        return Recovery(mode)
    found = record.read()
    report.set_aside = _set_aside(Path(config.state_dir).absolute(), sqlite_file(url), record)
    record.write(0, 0, {})  # the ledger starts again from here: nothing is expected of the new one
    ledger = await Ledger.open(url, _NoProbe(), config.devices, record=record)
    try:
        engines, leases, attempts = _still_running(found, report) if mode == RECOVER else ([], [], set())
        await ledger.restore(engines, leases, f"ledger rebuilt by lessord --{mode}")
    finally:
        await ledger.close()
    report.unidentified = [f"pid {pid} runs for {config.state_dir} but is not in the record"
                           for pid in find_strays(Path(config.state_dir).absolute(), attempts)]
    return report


def _set_aside(state_dir: Path, database: Path | None, record: LedgerRecord) -> Path:
    aside = state_dir / time.strftime("ledger-damaged-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir(parents=True, exist_ok=True)
    files = [record.path]
    if database is not None:
        files += [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    for path in files:
        if path.exists() or path.is_symlink():
            path.rename(aside / path.name)
    return aside


def engine_from_record(model: str, row: Mapping) -> EngineRecord:
    """An engine as the ledger's record kept it."""
    return EngineRecord(model, row["attempt"], row["pid"], row["identity"], row["port"], EnginePhase(row["phase"]),
                        dict(row["params"]), row["kv_tokens"], row["started_at"])


def lease_from_record(row: Mapping) -> Lease:
    return Lease(row["id"], row["model"], row["device"], LeaseKind(row["kind"]), row["bytes"], row["attempt"],
                 row["granted_at"], row.get("owner_pid"), row.get("owner_started_at"))


def _still_running(found: Record | None, report: Recovery):
    engines, leases, attempts = [], [], set()
    for model, row in sorted((found.engines if found else {}).items()):
        engine = engine_from_record(model, row)
        if process_identity(engine.pid) != engine.identity:
            report.gone.append(f"{model} (pid {engine.pid}): its process is gone")
            continue
        kept = [lease_from_record(lease) for lease in row.get("leases", [])]
        engines.append(engine)
        leases += kept
        attempts.add(engine.attempt)
        report.recovered.append(f"{model} (pid {engine.pid}, port {engine.port}, {len(kept)} lease(s))")
    return engines, leases, attempts
