"""The ledger's database as the ledger uses it: the SQLAlchemy engine (None for a ledger in memory),
each write one transaction counted in the database's generation, whether the database answered its
last call (and why not), and closing it within its deadlines whatever it does. The ledger
(daemon/ledger/ledger.py) holds one and serializes the calls under its own lock."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from .database import STORAGE_ERRORS, bounded, deadlines_of, ping, write_counted
from .ledger_errors import LedgerUnavailable
from .statements import Statements

log = logging.getLogger("lessor.ledger")

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (LedgerUnavailable, *STORAGE_ERRORS)


class Store:
    def __init__(self, engine: AsyncEngine | None) -> None:
        self.engine = engine
        self.generation = 0  # the database's, after the last commit
        self.unavailable: str | None = None  # why the database's last call failed (None: it answered)
        self.closing = False  # lessord stops: a database that failed is not waited for again

    async def write(self, doing: str, statements: Callable[[], Statements]) -> int:
        """One transaction, counted in the generation; a storage failure becomes LedgerUnavailable
        and nothing of it is applied. The statements are built only when there is a database to
        write them to. The rows changed, where the driver counts them."""
        if self.engine is None:
            return 0
        if self.closing and self.unavailable:  # each unload of a stopping lessord would wait again
            raise LedgerUnavailable(doing, self.unavailable)
        try:
            changed, self.generation = await write_counted(self.engine, doing, statements())
        except LedgerUnavailable as exc:
            self.unavailable = exc.reason
            raise
        self.unavailable = None
        return changed

    async def answers(self) -> bool:
        if self.engine is None:
            return True
        try:
            await ping(self.engine)
        except LedgerUnavailable as exc:
            self.unavailable = exc.reason
            return False
        self.unavailable = None
        return True

    async def close(self) -> None:
        """Within the deadline whatever the database does: a database that failed its last call,
        or does not let its connections close in time, has them dropped unclosed (a hung server
        sees the sockets go when it resumes)."""
        if self.engine is None:
            return
        if self.unavailable is None:
            try:
                await bounded(self.engine.dispose, deadlines_of(self.engine), "close")
                return
            except _CLOSE_ERRORS as exc:
                log.warning("the ledger's connections did not close (%s); dropped", exc)
        await self.engine.dispose(close=False)
