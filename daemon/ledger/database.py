"""The ledger's database: its tables and their migrations, the SQLAlchemy engine for a URL (SQLite
or PostgreSQL) with its deadlines, and what counts as the database's trouble rather than a bug.
daemon/ledger/ledger.py (leases, engines) and daemon/ledger/fingerprints.py (measured footprints) use it.

Deadlines: a hung server (stopped, or behind a link that drops packets) answers nothing, not even
an error, so every call has one: connecting and a pool checkout (`ledger.connect_timeout`), each
statement (`ledger.statement_timeout`: asyncpg's command timeout and the server's
statement_timeout; SQLite's busy timeout), and a whole transaction (`Deadlines.transaction_s`),
past which the caller gets LedgerUnavailable at once and the transaction is abandoned to the
driver's own timeouts."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .ledger_errors import LedgerUnavailable

log = logging.getLogger("lessor.ledger")

metadata = MetaData()
leases_table = Table(
    "lessor_leases", metadata,
    Column("id", String(36), primary_key=True),
    Column("model", String(128), nullable=False, index=True),
    Column("device", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("state", String(16), nullable=False, index=True),  # granted | released
    Column("attempt", String(36), nullable=False),
    Column("owner_pid", Integer, nullable=True),
    Column("owner_started_at", Float, nullable=True),
    Column("granted_at", Float, nullable=False),
    Column("released_at", Float, nullable=True),
    Column("release_reason", String(256), nullable=True),
)

# The engine process that holds a model's leases: what a restarted lessord needs to adopt it.
engines_table = Table(
    "lessor_engines", metadata,
    Column("model", String(128), primary_key=True),
    Column("attempt", String(36), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("identity", String(96), nullable=False),  # boot id + start ticks: never a recycled pid
    Column("port", Integer, nullable=False),
    Column("phase", String(16), nullable=False),  # loading | ready
    Column("params", Text, nullable=False),  # JSON: the planned engine flags
    Column("kv_tokens", BigInteger, nullable=False),
    Column("started_at", Float, nullable=False),
)


# What lessor measured of a model's engine, per key (daemon/ledger/fingerprints.py): schema version 2.
fingerprints_table = Table(
    "lessor_fingerprints", metadata,
    Column("key", String(64), primary_key=True),  # digest of model, engine, version, devices, flags
    Column("model", String(128), nullable=False, index=True),
    Column("engine", String(32), nullable=False),
    Column("engine_version", String(256), nullable=False),
    Column("devices", Text, nullable=False),  # JSON: the device names of the placement, in order
    Column("flags", Text, nullable=False),  # JSON: every argument that decides the engine's memory
    Column("measured", Text, nullable=False),  # JSON: per device, what the samples said
    Column("outcome", String(16), nullable=False),  # ready | overrun | oom
    Column("loads", Integer, nullable=False),  # measurements merged into this row
    Column("measured_at", Float, nullable=False),  # wall-clock time of the newest
)

schema_table = Table("lessor_schema", metadata, Column("version", Integer, nullable=False))

# One row: how many changes the ledger has committed. Every write of leases or engines adds one in
# its own transaction, and the record beside the ledger (daemon/ledger/record.py) keeps the
# number too: a database behind its record lost commits. Schema version 3.
generation_table = Table("lessor_generation", metadata, Column("generation", BigInteger, nullable=False))

# Version 1: leases and engines (the first release kept no version: its two tables say it).
# Version 2: fingerprints. Version 3: the generation. A step only adds tables, so today's Table objects are its DDL; a step
# that changes an existing table must be written out (ALTER). On PostgreSQL the steps run in the
# transaction that opens the ledger, under a lock; SQLite commits each CREATE on its own.
MIGRATIONS = ((leases_table, engines_table), (fingerprints_table,), (generation_table,))
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    def __init__(self, found: int) -> None:
        super().__init__(f"the ledger database has schema version {found}; this lessord knows up to "
                         f"{SCHEMA_VERSION}: run the newer lessord, or point ledger.url at another database")
        self.found = found


def migrate(connection) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION (synchronous: run through `run_sync`). (from, to)."""
    if connection.dialect.name == "postgresql":  # two lessords (or lessord and the CLI) opening at once
        connection.execute(text("SELECT pg_advisory_xact_lock(7263501)"))
    tables = set(inspect(connection).get_table_names())
    if schema_table.name in tables:
        found = connection.execute(select(schema_table.c.version)).scalar() or 0
    else:
        found = 1 if leases_table.name in tables else 0
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found)
    for step in MIGRATIONS[found:]:
        metadata.create_all(connection, tables=list(step))
    if found != SCHEMA_VERSION or schema_table.name not in tables:
        schema_table.create(connection, checkfirst=True)
        connection.execute(schema_table.delete())
        connection.execute(schema_table.insert().values(version=SCHEMA_VERSION))
    if connection.execute(select(generation_table.c.generation)).first() is None:
        connection.execute(generation_table.insert().values(generation=0))
    return found, SCHEMA_VERSION


def _generation_of(tables: set[str], read) -> int | None:
    """None: no ledger tables at all (a new database, or one that lost them); 0 for a ledger older
    than schema version 3, which counted nothing yet."""
    if generation_table.name in tables:
        return read() or 0
    return 0 if leases_table.name in tables else None


def read_generation(connection) -> int | None:
    """The committed generation (`_generation_of`). Synchronous, before `migrate`: what was there,
    not what migrating adds."""
    return _generation_of(set(inspect(connection).get_table_names()),
                          lambda: connection.execute(select(generation_table.c.generation)).scalar())


def inspect_sqlite(path: Path) -> tuple[str | None, int | None]:
    """(quick_check's findings or None, the generation or None) of a SQLite ledger file, read
    through a read-only connection: a refused file is left exactly as found (a read-write one would
    checkpoint and delete a WAL of garbage on closing). Raises sqlite3.Error where it does not open."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        findings = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        generation = _generation_of(tables, lambda: (connection.execute(
            f"SELECT generation FROM {generation_table.name}").fetchone() or (0,))[0])
    finally:
        connection.close()
    return (None if findings == ["ok"] else "; ".join(findings[:3])[:300]), generation


def _storage_errors() -> tuple[type[BaseException], ...]:
    """A write that fails for these reasons is the database's trouble (disk full, server gone),
    not a bug. asyncpg raises some of its own unwrapped while connecting (server shutting down)."""
    errors: list[type[BaseException]] = [SQLAlchemyError, OSError, sqlite3.Error]
    try:
        import asyncpg
        errors += [asyncpg.PostgresError, asyncpg.InterfaceError]
    except ImportError:
        pass
    return tuple(errors)


STORAGE_ERRORS = _storage_errors()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL + synchronous=NORMAL: a commit survives the daemon's crash (kill -9); only an OS crash
    # or power loss can lose the last commits, and then every engine process is gone too.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@dataclass(frozen=True)
class Deadlines:
    """How long the database may take (the `ledger` section's connect_timeout, statement_timeout)."""

    connect_s: float = 5.0
    statement_s: float = 10.0

    @property
    def transaction_s(self) -> float:
        """One transaction, all told: its checkout may ping a pooled connection (a statement) that
        turns out dead and connect again; its few small statements take milliseconds on a server
        that answers."""
        return self.connect_s + self.statement_s

    def expired(self) -> str:
        return (f"the database did not answer within {self.transaction_s:g} s (ledger.connect_timeout "
                f"{self.connect_s:g} s + ledger.statement_timeout {self.statement_s:g} s)")


# Each engine's deadlines, for `write` and `ping` whoever calls them (the ledger, the fingerprints).
_deadlines: weakref.WeakKeyDictionary[AsyncEngine, Deadlines] = weakref.WeakKeyDictionary()


def deadlines_of(engine: AsyncEngine) -> Deadlines:
    return _deadlines.get(engine, Deadlines())


def engine_for(url: str, deadlines: Deadlines = Deadlines()) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_async_engine(url, pool_pre_ping=True, pool_timeout=deadlines.connect_s, connect_args={
            "timeout": deadlines.connect_s, "command_timeout": deadlines.statement_s,
            # The server ends what runs too long too (a lock wait), so its connection is free again.
            "server_settings": {"statement_timeout": str(max(1, round(deadlines.statement_s * 1000)))}})
        _deadlines[engine] = deadlines
        return engine
    database = parsed.database or ""
    on_disk = database not in ("", ":memory:")
    if on_disk:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # sqlite3's `timeout` is its busy timeout: how long a statement waits on another connection's lock.
    engine = create_async_engine(url, connect_args={"timeout": deadlines.statement_s},
                                 **({"pool_timeout": deadlines.connect_s} if on_disk else {}))
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    _deadlines[engine] = deadlines
    return engine


T = TypeVar("T")


async def bounded(work: Callable[[], Awaitable[T]], deadlines: Deadlines, doing: str) -> T:
    """`work()` in a task of its own, waited for at most `deadlines.transaction_s`. Past it the
    caller gets LedgerUnavailable at once and the task is cancelled and left to end by itself: its
    rollback may wait on the same hung server, and that wait must not be the caller's (a grant, an
    unload, lessord's stop). What a cancelled transaction did not commit is rolled back; one whose
    COMMIT was already sent may still land, as when a connection breaks (callers treat both alike)."""
    task = asyncio.ensure_future(work())
    try:
        await asyncio.wait({task}, timeout=deadlines.transaction_s)
    except asyncio.CancelledError:
        # The caller is stopping (lessord's shutdown cancels its writers): the transaction is rolled
        # back before the caller goes on to close the ledger, or the connection is closed under the
        # rollback and its close never ends; bounded still, for a hung server.
        task.cancel()
        await asyncio.wait({task}, timeout=deadlines.transaction_s)
        if not task.done():
            task.add_done_callback(_abandoned)
        raise
    if task.done():
        return task.result()
    task.cancel()
    task.add_done_callback(_abandoned)
    raise LedgerUnavailable(doing, deadlines.expired())


def _abandoned(task: asyncio.Future) -> None:
    if task.cancelled():
        return
    error = task.exception()  # retrieved: nobody waits for it any more
    if error is not None:
        log.debug("an abandoned ledger call ended: %s", short_error(error))


async def ping(engine: AsyncEngine) -> None:
    """Whether the database answers, within its deadlines; raises LedgerUnavailable where not."""
    async def select_one() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    deadlines = deadlines_of(engine)
    try:
        await bounded(select_one, deadlines, "answer")
    except STORAGE_ERRORS as exc:
        raise LedgerUnavailable("answer", reason_of(exc, deadlines)) from exc


async def write(engine: AsyncEngine, doing: str, statements: Sequence[tuple]) -> int:
    """One transaction of `(statement, *params)`, within the engine's deadlines; a storage failure
    becomes LedgerUnavailable and nothing of it is applied. The rows changed, where the driver
    counts them."""
    async def transaction() -> int:
        changed = 0
        async with engine.begin() as conn:
            for statement, *params in statements:
                changed += max((await conn.execute(statement, *params)).rowcount, 0)
        return changed

    return await _guarded(engine, doing, transaction)


async def write_counted(engine: AsyncEngine, doing: str, statements: Sequence[tuple]) -> tuple[int, int]:
    """`write`, adding one to the generation in the same transaction: (rows changed, the new
    generation as the database has it, so a commit whose answer was lost is counted too)."""
    counted = [*statements, (generation_table.update().values(generation=generation_table.c.generation + 1),)]

    async def transaction() -> tuple[int, int]:
        changed = 0
        async with engine.begin() as conn:
            for statement, *params in counted:
                changed += max((await conn.execute(statement, *params)).rowcount, 0)
            generation = (await conn.execute(select(generation_table.c.generation))).scalar() or 0
        return changed - 1, generation

    return await _guarded(engine, doing, transaction)


async def _guarded(engine: AsyncEngine, doing: str, transaction: Callable[[], Awaitable[T]]) -> T:
    deadlines = deadlines_of(engine)
    try:
        return await bounded(transaction, deadlines, doing)
    except LedgerUnavailable as exc:
        log.error("ledger write failed (%s): %s", doing, exc.reason)
        raise
    except STORAGE_ERRORS as exc:
        log.error("ledger write failed (%s): %s", doing, reason_of(exc, deadlines))
        raise LedgerUnavailable(doing, reason_of(exc, deadlines)) from exc


def reason_of(exc: BaseException, deadlines: Deadlines) -> str:
    """The database's own words; a driver's timeout has none, so its deadline is named instead."""
    if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "orig", None), TimeoutError):
        return (f"the database did not answer within its deadline (ledger.connect_timeout {deadlines.connect_s:g} s, "
                f"ledger.statement_timeout {deadlines.statement_s:g} s)")
    return short_error(exc)


def short_error(exc: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement dump and links."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    if not text and isinstance(getattr(exc, "orig", None) or exc, TimeoutError):  # a driver's deadline says nothing
        return "no answer within the deadline (ledger.connect_timeout, ledger.statement_timeout)"
    return text[0][:300] if text else type(exc).__name__
