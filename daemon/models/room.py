"""Carrying out a policy's `Evict`: the KV caches it shrinks give their memory back first (the
lighter lever: those models stay), then the victims are unloaded, each only while it is idle. The
one place room is made, for a load's admission and for the reconciler's give-back to foreign growth."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ...policies import Evict
from ..errors import LessorError
from .elastic import Elastic
from .lifecycle import ModelRecord

log = logging.getLogger("lessor.supervisor")


@dataclass(frozen=True)
class NoRoom:
    """Room was not made: a model took a request while it was being made (`blockers`: what the
    load waits for now)."""

    reason: str
    blockers: tuple[str, ...]


async def make_room(decision: Evict, elastic: Elastic, records: Mapping[str, ModelRecord],
                    evict: Callable[[str, str], Awaitable[bool]], shrunk_for: str, evicted_for: str,
                    best_effort: bool = False) -> NoRoom | None:
    """Shrink, then evict (`evict(name, reason)`: False where the model is busy), stopping at the
    first that cannot (None: every step was taken). `best_effort`: the give-back's way, whose next
    check looks again: a victim that cannot go now, or is gone, is passed over and the rest still go
    (shrinks stop at the first model that cannot shrink, in either way, as elastic.shrink_all does)."""
    if not await elastic.shrink_all(decision.shrink, records, shrunk_for) and not best_effort:
        return NoRoom("a model to shrink took a request while room was being made", tuple(decision.shrink))
    for victim in decision.victims:
        try:
            if not await evict(victim, evicted_for) and not best_effort:
                # A request started on it while an earlier victim unloaded.
                return NoRoom(f"'{victim}' took a request while room was being made", decision.victims)
        except LessorError as exc:
            if not best_effort:
                raise
            log.info("could not evict %s: %s", victim, exc)  # gone in a reload meanwhile
    return None
