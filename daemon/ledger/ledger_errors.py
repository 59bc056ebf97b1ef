"""The ledger's database: one that refused a write (LedgerUnavailable), one that is damaged or lost
state its record says it had (LedgerDamaged)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvariantBroken, LessorError


@dataclass
class LedgerUnavailable(LessorError):
    """The ledger's database refused a write (disk full, server restarting). Nothing was granted:
    lessor never hands out memory it could not record."""

    doing: str
    reason: str
    retry_after_s: float = 5.0
    type = "ledger_unavailable"

    def message(self) -> str:
        return (f"the ledger could not {self.doing}: {self.reason}; nothing was granted. "
                "Free disk space for the SQLite file or bring the database back; retry then")


@dataclass
class LedgerDamaged(InvariantBroken):
    """The ledger's database is damaged or lost state its record says it had (daemon/ledger/record.py).
    Raised when the ledger opens, before anything is changed: lessord refuses to start rather than
    start empty and stop engines it forgot. `what` names the file (or database), `damage` the kind."""

    damage: str = ""
    expected: str = ""  # what the record says was there
    recover: str = ""  # the commands that get past it

    def message(self) -> str:
        expected = f" ({self.expected})" if self.expected else ""
        recover = f"; {self.recover}" if self.recover else ""
        return f"the ledger {self.what} {self.damage}{expected}; nothing was changed and running engines were left alone{recover}"
