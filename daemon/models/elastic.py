"""Elastic KV: a loaded model's KV lease shrunk to let another load through, and grown back when
the memory sits idle. A part of the supervisor, as daemon/models/crashes.py is; the runtime builds it
and hands it to the supervisor (shrinks for an admission) and the reconciler (grows on its tick).

Only engines that resize their cache in place (`handle.resizes_kv`: the built-in torch engine)
take part, and only for the load whose plan sized the KV lease (an adopted engine's plan has no
leases: it keeps its cache as it is until its next load). The bytes per token are the plan's (its
KV lease over its KV tokens); a cache holds a whole number of tokens per sequence, so every size
is a multiple of the plan's batch, never under the plan's `min_kv_tokens` nor over what it planned.

Order, so that the ledger never says less than the engine holds: a shrink resizes the engine
first, then the ledger (an engine that refuses changes nothing); a grow takes the ledger first,
then the engine (the lease goes back if the engine refuses). A grow runs only from the
reconciler's tick, with the model idle, no request waiting for a model, and its devices' load
locks held, so it never takes memory a load is about to be granted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ...engines.base import KvResizeRefused
from ...policies import Snapshot
from ..devices.locks import DeviceLocks
from ..devices.probes import gpu_id
from ..leases import Lease, LeaseKind, held_by
from ..ledger.ledger import Ledger
from ..ledger.ledger_errors import LedgerUnavailable
from ..units import format_bytes
from .lifecycle import ModelRecord, ModelState

log = logging.getLogger("lessor.supervisor")

MIN_CONTEXT = 16  # tokens per sequence the torch engine keeps at least (TorchEngineArgs.context_tokens' bound)


@dataclass(frozen=True)
class KvView:
    """A model's elastic KV cache now: its KV leases (by device), the plan's bytes per token on
    each, and the sizes in tokens it may take."""

    leases: Mapping[str, Lease]
    planned_bytes: Mapping[str, int]  # the plan's KV lease per device
    planned_tokens: int
    batch: int
    tokens: int  # what the engine holds now
    lowest: int
    highest: int

    def bytes_at(self, device: str, tokens: int) -> int:
        return -(-self.planned_bytes[device] * tokens // self.planned_tokens)

    def spare(self) -> dict[str, int]:
        return {d: max(0, lease.bytes - self.bytes_at(d, self.lowest)) for d, lease in self.leases.items()}

    def whole(self, tokens: int) -> int:
        """`tokens` down to whole sequences, within the bounds."""
        return max(self.lowest, min(self.highest, tokens // self.batch * self.batch))


class Elastic:
    def __init__(self, ledger: Ledger, device_locks: DeviceLocks, in_flight: Callable[[str], int]) -> None:
        """`device_locks`: the loads' (a grow waits for none of them); `in_flight`: the router's count per model."""
        self._ledger, self._locks, self._in_flight = ledger, device_locks, in_flight
        self._tokens: dict[str, tuple[str, int]] = {}  # model -> (attempt, KV tokens its engine holds now)

    def view(self, record: ModelRecord) -> KvView | None:
        """None where the model's KV cache cannot change in place now."""
        handle, plan = record.handle, record.plan
        if record.state is not ModelState.READY or handle is None or not getattr(handle, "resizes_kv", False):
            return None
        if plan is None or plan.kv_tokens <= 0:
            return None
        planned = {w.device: w.bytes for w in plan.steady_leases if w.kind == LeaseKind.KV}
        leases = {lease.device: lease for lease in self._ledger.leases()
                  if lease.model == record.spec.name and lease.attempt == record.attempt and lease.kind == LeaseKind.KV}
        if not planned or set(leases) != set(planned):
            return None
        batch = max(1, int(plan.params.get(record.spec.engine.batch_param) or 1))
        highest = plan.kv_tokens // batch * batch
        lowest = min(highest, -(-max(record.spec.plan.min_kv_tokens, MIN_CONTEXT * batch) // batch) * batch)
        attempt, tokens = self._tokens.get(record.spec.name, ("", highest))
        return KvView(leases, planned, plan.kv_tokens, batch, tokens if attempt == record.attempt else highest,
                      lowest, highest)

    def spare(self, record: ModelRecord) -> dict[str, int]:
        """ModelView.kv_spare_bytes: what its KV leases could give back, per device."""
        view = self.view(record)
        return {d: b for d, b in view.spare().items() if b > 0} if view else {}

    # -- shrink: for an admission -----------------------------------------------------------------

    async def shrink_all(self, shrink: Mapping[str, Mapping[str, int]], records: Mapping[str, ModelRecord],
                         reason: str) -> bool:
        """Each model gives back at least these bytes per device (a policy's Evict.shrink); False
        as soon as one cannot (it took a request, its engine refused): the load waits."""
        for model, give in shrink.items():
            record = records.get(model)
            if record is None or not await self.shrink(record, give, reason):
                return False
        return True

    async def shrink(self, record: ModelRecord, give: Mapping[str, int], reason: str) -> bool:
        view = self.view(record)
        name = record.spec.name
        if view is None or self._in_flight(name):
            return False
        drop = max((-(-b * view.planned_tokens // view.planned_bytes[d]) for d, b in give.items() if d in view.leases),
                   default=0)
        tokens = max(view.lowest, (view.tokens - drop) // view.batch * view.batch)  # whole sequences
        new = {d: view.bytes_at(d, tokens) for d in view.leases}
        if any(view.leases[d].bytes - new[d] < b for d, b in give.items() if d in view.leases):
            return False  # even its smallest cache would not give back as much
        if not await self._engine(record, view, tokens, new):
            return False
        for device, lease in view.leases.items():
            try:
                await self._ledger.resize(lease.id, new[device], reason)
            except (KeyError, LedgerUnavailable) as exc:  # the lease says more than the engine holds: safe
                log.warning("%s: KV cache shrunk to %d tokens, its lease on %s not (%s)", name, tokens, device, exc)
        log.info("%s: KV cache shrunk from %d to %d tokens (%s): gives back %s", name, view.tokens, tokens, reason,
                 ", ".join(f"{d} {format_bytes(view.leases[d].bytes - b)}" for d, b in new.items()),
                 extra={"model": name, "step": "kv_shrunk", "kv_tokens": tokens})
        return True

    # -- grow: when memory sits idle ----------------------------------------------------------------

    async def grow_idle(self, records: Iterable[ModelRecord], snapshot: Callable[[], Snapshot]) -> list[str]:
        """From the reconciler's tick: each idle model shrunk earlier grows back towards its planned
        KV size, as far as the free memory goes. Nothing while a request waits for a model (that
        memory is wanted) or a load holds one of its devices. The models grown."""
        shrunk = [r for r in records if (view := self.view(r)) is not None and view.tokens < view.highest]
        if not shrunk or any(m.waiting for m in snapshot().models.values()):
            return []
        grown = []
        for record in shrunk:
            if self._in_flight(record.spec.name):
                continue
            devices = [gpu_id(i) for i in record.spec.placement.devices]
            if self._locks.busy(devices):
                continue  # a load or an admission there: it may be counting on this memory
            async with self._locks.held(devices):
                if await self._grow(record):
                    grown.append(record.spec.name)
        return grown

    async def _grow(self, record: ModelRecord) -> bool:
        view = self.view(record)  # again, under the locks
        if view is None or view.tokens >= view.highest or self._in_flight(record.spec.name):
            return False
        budgets = self._ledger.budgets()
        room = min(((budgets[d].free_bytes + lease.bytes) * view.planned_tokens // view.planned_bytes[d]
                    for d, lease in view.leases.items() if d in budgets), default=0)
        tokens = min(view.highest, room // view.batch * view.batch)
        if tokens <= view.tokens:
            return False
        new = {d: view.bytes_at(d, tokens) for d in view.leases}
        grown: list[Lease] = []
        for device, lease in view.leases.items():
            try:
                resized = await self._ledger.resize(lease.id, new[device], "memory idle: grown back")
            except (KeyError, LedgerUnavailable):
                resized = None
            if not isinstance(resized, Lease):  # taken meanwhile, or not recorded: what was grown goes back
                await self._restore(grown)
                return False
            grown.append(lease)
        if not await self._engine(record, view, tokens, new):
            await self._restore(grown)
            return False
        log.info("%s: KV cache grown back from %d to %d tokens (of %d planned)", record.spec.name, view.tokens,
                 tokens, view.highest, extra={"model": record.spec.name, "step": "kv_grown", "kv_tokens": tokens})
        return True

    async def _restore(self, leases: list[Lease]) -> None:
        """The leases as they were before a grow the engine did not follow (a shrink: it always goes)."""
        for lease in leases:
            try:
                await self._ledger.resize(lease.id, lease.bytes, "the engine kept its KV cache: lease back")
            except (KeyError, LedgerUnavailable) as exc:
                log.warning("%s: lease %s not set back to %s (%s)", lease.model, lease.id, format_bytes(lease.bytes),
                            exc)

    async def _engine(self, record: ModelRecord, view: KvView, tokens: int, new: Mapping[str, int]) -> bool:
        """The engine resized to `tokens`, capped to what the model will hold on each device."""
        held = held_by(self._ledger.leases()).get(record.spec.name, {})
        limits = {d: held.get(d, 0) - view.leases[d].bytes + b for d, b in new.items()}
        assert record.handle is not None  # its view found it ready
        try:
            got = await record.handle.resize_kv(tokens, limits)
        except KvResizeRefused as exc:
            log.warning("%s: KV cache not resized to %d tokens: %s", record.spec.name, tokens, exc,
                        extra={"model": record.spec.name, "step": "kv_resize_refused"})
            return False
        self._tokens[record.spec.name] = (record.attempt, got)
        return True

    def tokens(self, record: ModelRecord) -> int | None:
        """The KV tokens its engine holds now, where a resize changed them (None: as planned)."""
        view = self.view(record)
        return view.tokens if view is not None and view.tokens != view.highest else None
