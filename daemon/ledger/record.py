"""The ledger's record: a small file in the state folder saying what the ledger last committed (its
generation, how many leases were granted, the engines it recorded with their leases), and the
checks that compare the database with it when the ledger opens.

Why a second file: a damaged SQLite file often opens as an empty ledger without a word (SQLite
drops the WAL of a database truncated to 0 bytes; a WAL of garbage is ignored), and lessord would
then stop every engine it forgot as a stray. The database holds the same generation (ledger_db's
`lessor_generation`, raised in each write's own transaction), so a database behind its record lost
commits. With neither a ledger nor a record it is a first start, unless engines of this state
folder run (both were lost): refused too. The record applies to PostgreSQL too (a database restored or recreated under a running
lessor is behind it as well); only the file checks and quick_check are SQLite's.

The record is written, after the commit, whenever the engines change (recorded, ready, forgotten:
what recovery rebuilds from) and whenever the ledger goes from no granted lease to some or back
(what an empty database is checked against); a write replaces the file (tmp + rename), so a reader
sees the old record or the new one. Not at every lease: a rename over a file costs about a
millisecond on ext4 (it flushes the data first). Commits lost since the last record are then
grants and releases between two engine changes, which the start settles as after any crash: a
load not recorded yet (its engine stopped as a stray), leases nobody holds (released). A record behind its database (lessord killed between the two) is sound.

It is not fsynced, on purpose: the database's commits are not either (WAL with synchronous=NORMAL:
they survive lessord's crash, not the machine's; an fsync costs 3 ms on the development machine).
After a reboot either may have lost its last writes and no engine survived: a lag is then only a
warning, a record that does not parse is not compared; a database gone or empty where the record
says leases existed is refused whatever the boot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ...engines.proctree import boot_id
from ...engines.strays import find_strays
from .database import STORAGE_ERRORS, inspect_sqlite, read_generation, short_error
from .ledger_errors import LedgerDamaged, LedgerUnavailable

log = logging.getLogger("lessor.ledger")

RECORD_FILE = "ledger-record.json"


@dataclass(frozen=True)
class Record:
    generation: int
    leases: int  # granted when it was written
    engines: Mapping[str, dict] = field(default_factory=dict)  # model -> engine row, with "leases"
    boot_id: str = ""
    written_at: float = 0.0

    @property
    def holds_state(self) -> bool:
        """Something runs or is leased that an empty ledger would forget."""
        return bool(self.leases or self.engines)

    def describe(self) -> str:
        engines = ", ".join(f"{model} (pid {row.get('pid')})" for model, row in sorted(self.engines.items()))
        return (f"generation {self.generation}, {self.leases} granted lease(s), "
                f"{'engines ' + engines if engines else 'no engine'}")


class LedgerRecord:
    """The record file of one state folder. Writes never raise: a record that could not be written
    lags the database, which the checks accept; the failure is logged once until a write works."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> LedgerRecord:
        return cls(Path(state_dir).absolute() / RECORD_FILE)

    def read(self) -> Record | None:
        """None when there is none (a first start, or after --start-fresh). A record that does not
        parse is the record's damage, not the ledger's: said, and not compared."""
        try:
            raw = json.loads(self.path.read_text())
            return Record(int(raw["generation"]), int(raw["leases"]), dict(raw.get("engines") or {}),
                          str(raw.get("boot_id", "")), float(raw.get("written_at", 0.0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the ledger's record %s is unreadable (%s): not compared; it is written again at the "
                        "next change", self.path, exc)
            return None

    def write(self, generation: int, leases: int, engines: Mapping[str, dict]) -> None:
        body = json.dumps({"generation": generation, "leases": leases, "engines": engines, "boot_id": boot_id(),
                           "written_at": time.time()}, sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body)
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._failing:
                log.warning("the ledger's record %s could not be written (%s); the ledger itself is "
                            "unaffected", self.path, exc)
            self._failing = True
            return
        self._failing = False

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def sqlite_file(url: str) -> Path | None:
    """The ledger's file for a SQLite URL; None for PostgreSQL or an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def recover_hint(record: LedgerRecord | None) -> str:
    source = f" from {record.path}" if record is not None else ""
    return ("run lessord once with this --config and --recover-from-engines to rebuild the leases of the engines "
            f"that still run{source}, or --start-fresh to set the damaged files aside and start empty (engines "
            "that still run are then stopped as strays); then start it as usual")


def expectation(record: LedgerRecord | None, found: Record | None) -> str:
    return f"its record {record.path} says {found.describe()}" if record is not None and found is not None else ""


def check_file(path: Path, record: LedgerRecord | None, found: Record | None) -> None:
    """Before SQLite touches it (opening a 0-byte file drops its WAL); `found`: what `record`
    holds. Raises LedgerDamaged."""
    expected = expectation(record, found)
    hint = recover_hint(record)
    if path.is_dir():
        raise LedgerDamaged(str(path), "is a directory, not a SQLite file", expected, hint)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise LedgerDamaged(str(path), "cannot be read and written by this user", expected,
                            f"give lessord's user access to it; {hint}")
    if found is None or not found.holds_state:
        return
    if not path.exists():
        raise LedgerDamaged(str(path), "is missing", expected, hint)
    if path.stat().st_size == 0:
        raise LedgerDamaged(str(path), "is empty (0 bytes)", expected, hint)


def check_generation(where: str, generation: int | None, record: LedgerRecord | None, found: Record | None) -> None:
    """The database's generation (None: it has no ledger tables) against the record's (`found`).
    Raises LedgerDamaged where commits were lost and something depended on them."""
    if found is None or (generation or 0) >= found.generation:
        return
    state = "holds no ledger tables" if generation is None else f"is at generation {generation}"
    said = expectation(record, found)
    if not found.holds_state:
        log.warning("the ledger %s %s, %s: the last commits were lost; nothing was leased then, so lessord "
                    "starts from what the database holds", where, state, said)
    elif found.boot_id and found.boot_id != boot_id() and generation:
        log.warning("the ledger %s %s, %s: the last commits before the machine restarted were lost (the "
                    "SQLite WAL is synced lazily, by design); no engine survived the restart, lessord goes on",
                    where, state, said)
    else:
        raise LedgerDamaged(where, f"{state}: commits were lost (the file truncated, its WAL lost or "
                            "replaced, or the database restored)", said, recover_hint(record))


async def check_database(engine: AsyncEngine, path: Path | None, where: str, record: LedgerRecord | None) -> None:
    """Every check before the ledger is migrated or read (`path`: the SQLite file; None for
    PostgreSQL). Raises LedgerDamaged, or LedgerUnavailable for a database that does not answer."""
    found = record.read() if record is not None else None
    problem, generation = None, None
    try:
        if path is None:
            async with engine.begin() as conn:
                generation = await conn.run_sync(read_generation)
        else:
            check_file(path, record, found)
            if path.exists():  # a new ledger is created by migrate
                problem, generation = await asyncio.to_thread(inspect_sqlite, path)
    except STORAGE_ERRORS as exc:
        raise _open_failure(path, where, exc, record, found) from None
    if problem:
        raise LedgerDamaged(where, f"fails SQLite's integrity check ({problem})", expectation(record, found),
                            recover_hint(record))
    check_generation(where, generation, record, found)
    if generation is None and found is None and record is not None:
        _check_no_engines(path, where, record)


def _check_no_engines(path: Path | None, where: str, record: LedgerRecord) -> None:
    """No ledger and no record: a first start, unless engines of this state folder run (the record
    was lost with the ledger); then it is refused too, rather than stop them all as strays."""
    running = find_strays(record.path.parent, set())
    if running:
        state = "is missing" if path is not None and not path.exists() else "holds no ledger tables"
        raise LedgerDamaged(where, f"{state} and its record {record.path} is missing too",
                            f"but {len(running)} engine process(es) of this state folder run: pid "
                            f"{', '.join(map(str, sorted(running)))}", recover_hint(record))


def _open_failure(path, where: str, exc: BaseException, record: LedgerRecord | None, found: Record | None) -> Exception:
    """SQLite's refusal to open its file is damage; a busy file or a PostgreSQL server that does
    not answer is the database being unavailable, to be tried again."""
    reason = short_error(exc)
    if path is None or any(word in reason for word in ("locked", "busy")):
        return LedgerUnavailable("open its database", f"{where}: {reason}")
    damage = (f"fails SQLite's integrity check ({reason})" if "malformed" in reason else
              f"is not a SQLite database ({reason})" if "not a database" in reason else f"does not open ({reason})")
    return LedgerDamaged(where, damage, expectation(record, found), recover_hint(record))
