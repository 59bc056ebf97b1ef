"""The ledger: the one owner of lease state.

Every grant checks the budget and records the leases in one step under a lock the ledger keeps
to itself, so concurrent grants can never together exceed a device's budget. Leases persist
through SQLAlchemy (SQLite file by default, PostgreSQL by URL) before the grant returns, so a
restart loses nothing. Everyone else reads frozen snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import replace

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ...policies import DeviceBudget, Rejected
from ..config.schema import DevicesConfig
from ..devices.budget import budgets as compute_budgets
from ..devices.probes import DeviceReading, Probe, group_members
from ..events import Event, LeaseGranted, LeaseReleased, LeaseResized
from ..leases import EngineRecord, Granted, Lease, LeaseKind, LeaseWant, LedgerSnapshot
from ..units import format_bytes
from . import statements
from .database import STORAGE_ERRORS, Deadlines, bounded, deadlines_of, engine_for, migrate, short_error
from .ledger_errors import LedgerDamaged, LedgerUnavailable
from .record import LedgerRecord, check_database, expectation, recover_hint, sqlite_file
from .statements import Statements
from .store import Store

log = logging.getLogger("lessor.ledger")

DEFAULT_DEADLINES = Deadlines()  # frozen: one default for every open
# A row that does not read: the database's trouble, or a NULL or a word where a row cannot have one.
_UNREADABLE: tuple[type[BaseException], ...] = (*STORAGE_ERRORS, ValueError, TypeError)

# Released rows outlive ledger.history by at most this long (run_pruning's default round).
PRUNE_EVERY_S = 3600.0


class Ledger:
    def __init__(self, engine: AsyncEngine | None, probe: Probe, devices: DevicesConfig | Callable[[], DevicesConfig],
                 publish: Callable[[Event], None] = lambda e: None, clock: Callable[[], float] = time.time) -> None:
        """`devices`: the settings (headroom, caps), or where to read the ones in force (a reload
        swaps them in the config holder, and the next budget uses them)."""
        self._db = Store(engine)
        self._probe = probe
        self._devices = devices if callable(devices) else (lambda: devices)
        self._publish = publish
        self._clock = clock
        self._lock = asyncio.Lock()
        self._leases: dict[str, Lease] = {}
        self._engines: dict[str, EngineRecord] = {}
        # Released in memory (the memory really is free) but not yet on disk: retried by flush().
        self._unpersisted: dict[str, str] = {}
        self._record: LedgerRecord | None = None
        self._noted_holding = False  # whether the last record said leases were granted

    @classmethod
    async def open(cls, url: str, probe: Probe, devices: DevicesConfig | Callable[[], DevicesConfig],
                   record: LedgerRecord | None = None,
                   deadlines: Deadlines = DEFAULT_DEADLINES, **kwargs) -> Ledger:
        """`record`: the state folder's record of what the ledger last committed (lessord's); the
        database is compared with it before anything is written, and it is kept after each change.
        Raises LedgerDamaged (the file and the kind of damage) rather than open an empty ledger
        where the record says leases existed; LedgerUnavailable where the database does not answer
        within `deadlines` (each step)."""
        engine = engine_for(url, deadlines)
        ledger = cls(engine, probe, devices, **kwargs)
        ledger._record = record
        path = sqlite_file(url)
        where = str(path) if path is not None else make_url(url).render_as_string(hide_password=True)
        try:
            await bounded(lambda: check_database(engine, path, where, record), deadlines, "open")
            await bounded(lambda: ledger._migrate(engine), deadlines, "migrate its schema")
            await bounded(lambda: ledger._load(engine, where), deadlines, "read the leases")
        except BaseException as exc:
            ledger._db.unavailable = exc.reason if isinstance(exc, LedgerUnavailable) else None
            await ledger.close()
            raise
        return ledger

    async def _migrate(self, engine: AsyncEngine) -> None:
        try:
            async with engine.begin() as conn:
                found, now = await conn.run_sync(migrate)
        except STORAGE_ERRORS:
            # SQLite commits each CREATE alone: another process (the CLI's plan) creating the same
            # table first makes ours fail; the second look finds it there. PostgreSQL holds a lock.
            async with engine.begin() as conn:
                found, now = await conn.run_sync(migrate)
        if found and found != now:
            log.info("ledger schema migrated from version %d to %d", found, now)

    async def _load(self, engine: AsyncEngine, where: str) -> None:
        try:
            async with engine.begin() as conn:
                self._leases, self._engines, self._db.generation = await statements.read_granted(conn)
        except _UNREADABLE as exc:
            raise LedgerDamaged(where, f"holds rows that do not read ({short_error(exc)})",
                                expectation(self._record, self._record.read() if self._record else None),
                                recover_hint(self._record)) from None
        if self._record is not None:
            found = self._record.read()
            if found is None or found.generation != self._db.generation:
                self._note(engines_changed=True)

    @classmethod
    def in_memory(cls, probe: Probe, devices: DevicesConfig, **kwargs) -> Ledger:
        """The same grants, checks and releases without a database: the policy simulator replays
        millions of requests through it. Nothing survives the process; lessord never uses it."""
        return cls(None, probe, devices, **kwargs)

    async def _write(self, doing: str, statements: Callable[[], Statements]) -> int:
        """One transaction (Store.write); the caller applies the change in memory, then `_note`s it."""
        return await self._db.write(doing, statements)

    def _note(self, engines_changed: bool = False) -> None:
        """The record of what is committed now (after the change is applied in memory too): when
        the engines change (what recovery rebuilds from) or the ledger goes from no lease to some or
        back (what an empty database is checked against), a few times per load. Not at every lease:
        replacing a file on ext4 flushes its data (about a millisecond). A record behind its
        database is sound. Written in the loop, not a thread: a cancelled grant must not stop
        between its commit and its return."""
        holding = bool(self._leases)
        if self._record is None or not (engines_changed or holding != self._noted_holding):
            return
        self._noted_holding = holding
        engines = {model: {**{k: v for k, v in engine.row().items() if k != "model"}, "params": dict(engine.params),
                           "leases": [lease.to_dict() for lease in self._leases.values()
                                      if lease.model == model and lease.attempt == engine.attempt]}
                   for model, engine in self._engines.items()}
        self._record.write(self._db.generation, len(self._leases), engines)

    @property
    def generation(self) -> int:
        return self._db.generation

    @property
    def unavailable(self) -> str | None:
        """Why the database failed its last call (a deadline passed, the server gone, the disk
        full), until a call succeeds again; None while it answers. /readyz reports it."""
        return self._db.unavailable

    def closing(self) -> None:
        """lessord stops: from here on, once the database has failed a call, the writes of the
        engines' stops fail at once instead of each waiting out the deadline again (the next start
        reconciles what they could not record)."""
        self._db.closing = True

    async def close(self) -> None:
        """Within the deadline (at most twice) whatever the database does (Store.close)."""
        if self._db.engine is None:
            return
        try:
            await asyncio.wait_for(self._lock.acquire(), deadlines_of(self._db.engine).transaction_s)
        except asyncio.TimeoutError:  # a call holds it past its own bound: not worth waiting for
            locked = False
        else:
            locked = True
        if self._unpersisted:
            log.warning("ledger closed with %d release(s) not recorded (%s); the next start releases them, their "
                        "engines being gone", len(self._unpersisted), self._db.unavailable or "the database refused them")
        try:
            await self._db.close()
        finally:
            if locked:
                self._lock.release()

    @property
    def database(self) -> AsyncEngine | None:
        """The SQLAlchemy engine under the ledger (None in memory): for maintenance and the fault
        tests that fill its disk or drop its connections. Leases are read and written through the
        ledger only."""
        return self._db.engine

    # -- reads -------------------------------------------------------------------------------

    def leases(self) -> tuple[Lease, ...]:
        """The granted leases, without reading any device (snapshot() adds the budgets)."""
        return tuple(self._leases.values())

    def managed_pids(self) -> set[int]:
        pids = {lease.owner_pid for lease in self._leases.values() if lease.owner_pid}
        return pids | {engine.pid for engine in self._engines.values()}

    def engines(self) -> dict[str, EngineRecord]:
        return dict(self._engines)

    def unpersisted(self) -> int:
        """Releases not yet on disk (the database refused them); flush() retries."""
        return len(self._unpersisted)

    def budgets(self) -> dict[str, DeviceBudget]:
        return self._read()[1]

    def _read(self) -> tuple[list[DeviceReading], dict[str, DeviceBudget]]:
        leased: dict[str, int] = defaultdict(int)
        for lease in self._leases.values():
            leased[lease.device] += lease.bytes
        pids = self.managed_pids()
        readings = self._probe.read(pids)
        return readings, compute_budgets(readings, self._devices(), leased, pids | group_members(readings, pids))

    def snapshot(self) -> LedgerSnapshot:
        readings, budgets = self._read()
        return LedgerSnapshot(self.leases(), budgets, self._probe.name,
                              {r.device: r for r in readings})

    # -- writes: each checks and commits in one step -------------------------------------------

    async def grant(self, model: str, wants: Sequence[LeaseWant], attempt: str,
                    owner_pid: int | None = None, owner_started_at: float | None = None) -> Granted | Rejected:
        """All of `wants` or none: granted only if every device's budget covers its part."""
        async with self._lock:
            rejected = self._check(wants)
            if rejected:
                return rejected
            now = self._clock()
            leases = [Lease(str(uuid.uuid4()), model, w.device, LeaseKind(w.kind), w.bytes, attempt, now,
                            owner_pid, owner_started_at) for w in wants]
            try:
                await self._write("record the grant", lambda: statements.grant(leases))
            except LedgerUnavailable:
                # The commit may have reached the database before the connection broke: flush()
                # marks these ids released there too, so disk and memory agree again.
                self._unpersisted.update(dict.fromkeys((lease.id for lease in leases), "grant not confirmed"))
                raise
            for lease in leases:
                self._leases[lease.id] = lease
            self._note()
        for lease in leases:
            self._publish(LeaseGranted(lease.id, model, lease.device, lease.kind.value, lease.bytes))
        return Granted(tuple(leases))

    def _check(self, wants: Sequence[LeaseWant]) -> Rejected | None:
        need: dict[str, int] = defaultdict(int)
        for want in wants:
            if want.bytes < 0:
                raise ValueError(f"a lease cannot be negative ({want})")
            need[want.device] += want.bytes
        budgets = self.budgets()
        short, reasons = {}, []
        for device, wanted in need.items():
            if device not in budgets:
                short[device] = wanted
                reasons.append(f"no device '{device}' (devices: {', '.join(sorted(budgets))})")
            elif wanted > budgets[device].free_bytes:
                free = budgets[device].free_bytes
                short[device] = wanted - free
                reasons.append(f"{device}: wanted {format_bytes(wanted)}, free {format_bytes(max(free, 0))}")
        return Rejected("; ".join(reasons), short) if short else None

    async def release(self, lease_ids: Iterable[str], reason: str) -> list[Lease]:
        """Released in memory even when the database refuses the write: the engine is stopped and
        the memory free, so holding it would only block others. flush() records it later, and a
        restart before that releases it too (its owner process is gone)."""
        async with self._lock:
            released = [self._leases[i] for i in lease_ids if i in self._leases]
            if released:
                ids = [lease.id for lease in released]
                try:
                    await self._mark_released(ids, reason)
                except LedgerUnavailable:
                    self._unpersisted.update(dict.fromkeys(ids, reason))
                for lease in released:
                    del self._leases[lease.id]
                self._note()
        for lease in released:
            self._publish(LeaseReleased(lease.id, lease.model, lease.device, lease.kind.value, lease.bytes, reason))
        return released

    async def resize(self, lease_id: str, new_bytes: int, reason: str) -> Lease | Rejected:
        """A granted lease's size changed in place, in one step: shrinking always succeeds; growing
        is checked against the device's budget like a grant of the difference (the same Rejected,
        nothing changed). The lease as it now is. Raises KeyError for a lease not granted (released
        meanwhile), LedgerUnavailable where the database refuses (then nothing changed either)."""
        if new_bytes < 0:
            raise ValueError(f"a lease cannot be negative (lease {lease_id}: {new_bytes} bytes)")
        async with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise KeyError(f"lease {lease_id} is not granted (released meanwhile?)")
            if new_bytes == lease.bytes:
                return lease
            if new_bytes > lease.bytes:
                rejected = self._check([LeaseWant(lease.device, lease.kind, new_bytes - lease.bytes)])
                if rejected:
                    return rejected
            await self._write("record the resize", lambda: statements.resize(lease_id, new_bytes))
            resized = self._leases[lease_id] = replace(lease, bytes=new_bytes)
            # The record keeps each engine's leases with their bytes (recovery rebuilds from them):
            # a resize is rare (a few per load), so it is written each time.
            self._note(engines_changed=True)
        self._publish(LeaseResized(lease_id, lease.model, lease.device, lease.kind.value, lease.bytes, new_bytes,
                                   reason))
        return resized

    async def _mark_released(self, ids: list[str], reason: str) -> None:
        await self._write("record the release", lambda: statements.release(ids, reason, self._clock()))

    async def answers(self) -> bool:
        """Whether the database answers now, within its deadlines (a stopping lessord asks before
        it stops engines whose stops it could not record); `unavailable` says why not."""
        return await self._db.answers()

    async def flush(self) -> int:
        """Record the releases the database refused earlier; how many are still pending. With
        none pending after a failed call, asks the database whether it answers again (so
        `unavailable` clears without waiting for a load)."""
        if not self._unpersisted and self._db.unavailable and self._db.engine is not None:
            if await self.answers():
                log.info("the ledger's database answers again")
            return 0
        async with self._lock:
            by_reason: dict[str, list[str]] = defaultdict(list)
            for lease_id, reason in self._unpersisted.items():
                by_reason[reason].append(lease_id)
            for reason, ids in by_reason.items():
                try:
                    await self._mark_released(ids, reason)
                except LedgerUnavailable:
                    break
                for lease_id in ids:
                    del self._unpersisted[lease_id]
                self._note()
            return len(self._unpersisted)

    async def release_model(self, model: str, reason: str, kinds: Collection[LeaseKind] | None = None) -> list[Lease]:
        ids = [lease.id for lease in self._leases.values()
               if lease.model == model and (kinds is None or lease.kind in kinds)]
        return await self.release(ids, reason)

    async def release_attempt(self, attempt: str, reason: str) -> list[Lease]:
        return await self.release([lease.id for lease in self._leases.values() if lease.attempt == attempt], reason)

    async def record_engine(self, engine: EngineRecord) -> None:
        """The engine process that holds a model's leases, in the same transaction as the leases'
        owner: a restarted lessord adopts it by pid and identity. Raises LedgerUnavailable (the load
        must not go on with an engine lessor could not find again)."""
        async with self._lock:
            await self._write("record the engine", lambda: statements.record_engine(engine))
            self._engines[engine.model] = engine
            for lease_id, lease in list(self._leases.items()):
                if lease.model == engine.model:
                    self._leases[lease_id] = replace(lease, owner_pid=engine.pid, owner_started_at=engine.started_at)
            self._note(engines_changed=True)

    async def restore(self, engines: Sequence[EngineRecord], leases: Sequence[Lease], reason: str) -> None:
        """Recovery only (daemon/ledger/recovery.py): the granted leases and engine records become exactly
        these, in one transaction; whatever else was granted is released with `reason`."""
        async with self._lock:
            await self._write("restore the ledger", lambda: statements.restore(engines, leases, reason, self._clock()))
            self._leases = {lease.id: lease for lease in leases}
            self._engines = {engine.model: engine for engine in engines}
            self._note(engines_changed=True)

    async def forget_engine(self, model: str) -> None:
        """The engine is stopped. A refused write is only logged: a restart finds the process gone."""
        async with self._lock:
            if self._engines.pop(model, None) is None:
                return
            try:
                await self._write("forget the engine", lambda: statements.forget_engine(model))
            except LedgerUnavailable:
                pass
            self._note(engines_changed=True)

    async def prune_released(self, older_than_s: float) -> int:
        """Drop released rows older than this (they are history; events carried them already); how
        many. Raises LedgerUnavailable when the database refuses."""
        async with self._lock:
            pruned = await self._write("prune released leases", lambda: statements.prune(self._clock() - older_than_s))
            self._note()
            return pruned

    async def run_pruning(self, history_s: float, interval_s: float | None = None,
                          sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """lessord's background task: keeps released rows for `history_s`, pruning at start and then
        every `interval_s` (an hour, or the history when shorter), so the table stays bounded. A
        database that refuses is tried again next round: old rows waiting a while harm nobody."""
        if self._db.engine is None:
            return  # in memory a released lease is gone at once: there is no history to prune
        interval_s = min(history_s, PRUNE_EVERY_S) if interval_s is None else interval_s
        while True:
            try:
                pruned = await self.prune_released(history_s)
            except LedgerUnavailable:
                log.warning("released leases not pruned (see the error above); trying again in %.0f s", interval_s)
            else:
                if pruned:
                    log.info("pruned %d released lease(s) older than %.0f s", pruned, history_s)
            await sleep(interval_s)
