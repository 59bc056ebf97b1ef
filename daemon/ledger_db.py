"""The ledger's database: its tables, the SQLAlchemy engine for a URL (SQLite or PostgreSQL), and
what counts as the database's trouble rather than a bug. Only daemon/ledger.py uses it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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


def engine_for(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def short_error(exc: BaseException) -> str:
    """The database's own words, without SQLAlchemy's statement dump and links."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
