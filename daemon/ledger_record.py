"""The ledger's record: a small file in the state folder saying what the ledger last committed (its
generation, how many leases were granted, the engines it recorded with their leases), and the
checks that compare the database with it when the ledger opens.

Why a second file: a damaged SQLite file often opens as an empty ledger without a word (SQLite
drops the WAL of a database truncated to 0 bytes; a WAL of garbage is ignored), and lessord would
then stop every engine it forgot as a stray. The database holds the same generation (ledger_db's
`lessor_generation`, raised in each write's own transaction), so a database behind its record lost
commits. The record applies to PostgreSQL too (a database restored or recreated under a running
lessor is behind it as well); only the file checks and quick_check are SQLite's.

The record is written after each committed change, as tmp + fsync + rename: a reader sees the
old record or the new one, never half of one. It may lag the database by the last commit (lessord
killed between the two): a database ahead of its record is sound. After a reboot the database may
have lost its last commits by design (WAL with synchronous=NORMAL) and no engine survived: a lag
is then only a warning; a database gone or empty is refused whatever the boot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from sqlalchemy.engine import make_url

from .errors import LedgerDamaged

log = logging.getLogger("lessor.ledger")

RECORD_FILE = "ledger-record.json"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: every start counts as the same boot, the stricter reading
        return ""


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
    def in_state_dir(cls, state_dir: str | Path) -> "LedgerRecord":
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
            with open(tmp, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
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
    return ("start lessord once with --recover-from-engines to rebuild the leases of the engines that still run"
            f"{source}, or with --start-fresh to set the damaged files aside and start empty (engines that "
            "still run are then stopped as strays)")


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
