"""What each change of the ledger writes, as SQL statements over its tables (daemon/ledger/database.py),
and its rows read back as leases and engine records. The ledger (daemon/ledger/ledger.py) decides and
keeps the state in memory; these only say it in SQL, one transaction per change."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..leases import EnginePhase, EngineRecord, Lease, LeaseKind, LeaseState
from .database import engines_table, leases_table, read_generation

Statements = list[tuple]  # what database.write_counted runs in one transaction


def engine_of(row) -> EngineRecord:
    return EngineRecord(row.model, row.attempt, row.pid, row.identity, row.port, EnginePhase(row.phase),
                        json.loads(row.params), row.kv_tokens, row.started_at)


def lease_of(row) -> Lease:
    return Lease(id=row.id, model=row.model, device=row.device, kind=LeaseKind(row.kind), bytes=row.bytes,
                 attempt=row.attempt, granted_at=row.granted_at, owner_pid=row.owner_pid,
                 owner_started_at=row.owner_started_at)


async def read_granted(conn: AsyncConnection) -> tuple[dict[str, Lease], dict[str, EngineRecord], int]:
    """The granted leases by id, the engines by model, and the database's generation."""
    rows = await conn.execute(select(leases_table).where(leases_table.c.state == LeaseState.GRANTED.value))
    leases = {row.id: lease_of(row) for row in rows}
    engines = {row.model: engine_of(row) for row in await conn.execute(select(engines_table))}
    return leases, engines, await conn.run_sync(read_generation) or 0


def _granted(lease_id=None):
    granted = leases_table.c.state == LeaseState.GRANTED.value
    return granted if lease_id is None else (leases_table.c.id == lease_id) & granted


def grant(leases: Sequence[Lease]) -> Statements:
    return [(insert(leases_table), [dict(lease.to_dict(), kind=lease.kind.value, released_at=None, release_reason=None)
                                    for lease in leases])]


def resize(lease_id: str, new_bytes: int) -> Statements:
    return [(update(leases_table).where(_granted(lease_id)).values(bytes=new_bytes),)]


def release(ids: list[str], reason: str, now: float) -> Statements:
    return [(update(leases_table).where(leases_table.c.id.in_(ids))
             .values(state=LeaseState.RELEASED.value, released_at=now, release_reason=reason[:256]),)]


def record_engine(engine: EngineRecord) -> Statements:
    """The engine's row, and its model's granted leases owned by its process."""
    return [(delete(engines_table).where(engines_table.c.model == engine.model),),
            (insert(engines_table), [engine.row()]),
            (update(leases_table).where((leases_table.c.model == engine.model) & _granted())
             .values(owner_pid=engine.pid, owner_started_at=engine.started_at),)]


def restore(engines: Sequence[EngineRecord], leases: Sequence[Lease], reason: str, now: float) -> Statements:
    """The granted leases and engine records become exactly these; whatever else was granted is
    released with `reason`."""
    return [(delete(leases_table).where(leases_table.c.id.in_([lease.id for lease in leases])),),
            (update(leases_table).where(_granted())
             .values(state=LeaseState.RELEASED.value, released_at=now, release_reason=reason[:256]),),
            (delete(engines_table),),
            *([(insert(leases_table), [dict(lease.to_dict(), released_at=None, release_reason=None)
                                       for lease in leases])] if leases else []),
            *([(insert(engines_table), [engine.row() for engine in engines])] if engines else [])]


def forget_engine(model: str) -> Statements:
    return [(delete(engines_table).where(engines_table.c.model == model),)]


def prune(released_before: float) -> Statements:
    return [(delete(leases_table).where((leases_table.c.state == LeaseState.RELEASED.value)
                                        & (leases_table.c.released_at < released_before)),)]
