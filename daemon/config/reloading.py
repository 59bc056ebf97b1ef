"""Config reloads in order: the one path by which a config comes into force after lessord's start
(SIGHUP, POST /admin/v1/reload and `lessor reload` through Controller.reload_file, Controller.reload).

One reload applies at a time, and the latest wins. A reload that cannot apply now (a model it
removes or changes is loading, being admitted, unloading or adopting: Supervisor.reload_blockers)
is pending, not refused: no load of a model it affects starts meanwhile (Supervisor.hold_for_reload,
so on-demand churn cannot starve it), and it applies as soon as the transitions it waits for end,
woken by the supervisor's state changes and admissions' ends, never by polling. A newer reload
supersedes a pending one; the config in force and the digest reported are always the same read
of the file.

Not here: reading and checking the file (the controller), what a new config does to the models
(Supervisor.apply_config).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import LessorError
from ..models.supervisor import Supervisor
from .changes import ConfigChange
from .schema import LessorConfig

log = logging.getLogger("lessor.service")


@dataclass(frozen=True)
class ConfigRead:
    """A config as read for a reload, with the {path, digest} of the very bytes it was parsed from
    (None: not read from a file) and check-config's warnings about it."""

    config: LessorConfig
    source: dict[str, str] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return self.source["digest"] if self.source else ""


@dataclass(frozen=True)
class Applied:
    read: ConfigRead
    change: ConfigChange


@dataclass(frozen=True)
class Pending:
    """A reload that waits: the models it waits for, each with the transition it is in."""

    read: ConfigRead
    waiting_for: dict[str, str]

    def reason(self) -> str:
        return "waiting for " + ", ".join(f"'{name}' to finish {_verb(state)}" for name, state in self.waiting_for.items())


def _verb(state: str) -> str:
    return {"loading": "loading", "unloading": "unloading", "adopting": "being adopted"}.get(state, state)


@dataclass
class _Submission:
    read: ConfigRead
    answered: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())  # Applied | Pending
    settled: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())  # Applied


@dataclass
class Superseded(LessorError):
    """A reload that a newer one replaced before it applied (latest file wins); raised only to an
    in-process `Reloads.apply` caller: an API caller is answered with what the newer one did."""

    digest: str
    by: str
    type = "reload_superseded"

    def message(self) -> str:
        return f"the reload{f' of {self.digest}' if self.digest else ''} was superseded by a newer one ({self.by})"


class Reloads:
    """The reload queue: at most one reload applying and one pending (the latest)."""

    def __init__(self, supervisor: Supervisor, applied: Callable[[Applied], None],
                 pending: Callable[[Pending], None], failed: Callable[[ConfigRead, LessorError], None]) -> None:
        self._supervisor = supervisor
        self._on_applied, self._on_pending, self._on_failed = applied, pending, failed
        self._next: _Submission | None = None  # the latest reload not yet applied
        self._waiting: Pending | None = None  # what the latest one waits for, once it had to
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        supervisor.watch_transitions(self._wake.set)

    def pending(self) -> Pending | None:
        """The reload that waits, and for what (None: none)."""
        return self._waiting if self._next is not None and self._waiting is not None \
            and self._waiting.read is self._next.read else None

    async def submit(self, read: ConfigRead) -> Applied | Pending:
        """Queue `read`, superseding a pending reload; answers once it is applied, or pending and why.
        A refusal when it applies (an unload failed) is raised."""
        return await asyncio.shield(self._submit(read).answered)

    async def apply(self, read: ConfigRead) -> ConfigChange:
        """Queue `read` and wait until it is in force (raises Superseded if a newer reload replaced it)."""
        return (await asyncio.shield(self._submit(read).settled)).change

    def drop_pending(self) -> Pending | None:
        """A newer file was refused: the pending reload it replaces is dropped too (the file no
        longer says it); returns it, or None."""
        dropped, submission = self.pending(), self._next
        if submission is None:
            return None
        self._next = None
        self._end(submission, Superseded(submission.read.digest, "a file lessord refused"))
        self._supervisor.hold_for_reload(None)
        self._wake.set()
        return dropped

    def _submit(self, read: ConfigRead) -> _Submission:
        submission = _Submission(read)
        if self._closed:  # lessord stopping: its config is what it stops with
            self._end(submission, Superseded(read.digest, "lessord's stop"))
            return submission
        if self._next is not None:
            log.info("the pending reload%s is superseded by a newer one%s",
                     f" (digest {self._next.read.digest})" if self._next.read.digest else "",
                     f" (digest {read.digest})" if read.digest else "")
            self._supersede(self._next, submission)
        self._next = submission
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return submission

    async def _run(self) -> None:
        supervisor = self._supervisor
        while (submission := self._next) is not None:
            self._wake.clear()
            blockers = supervisor.reload_blockers(submission.read.config)
            supervisor.hold_for_reload(submission.read.config if blockers else None)
            if blockers:
                if self._waiting is None or self._waiting.read is not submission.read or self._waiting.waiting_for != blockers:
                    self._waiting = Pending(submission.read, blockers)
                    if not submission.answered.done():
                        submission.answered.set_result(self._waiting)
                        self._on_pending(self._waiting)
                await self._wake.wait()
                continue
            self._next = None
            try:
                change = await supervisor.apply_config(submission.read.config)
            except LessorError as exc:
                self._on_failed(submission.read, exc)
                self._end(submission, exc)
            except BaseException:  # lessord stopping (cancelled), or a bug: never leave a caller waiting
                for future in (submission.answered, submission.settled):
                    future.cancel()
                raise
            else:
                applied = Applied(submission.read, change)
                self._on_applied(applied)
                for future in (submission.answered, submission.settled):
                    if not future.done():
                        future.set_result(applied)
            finally:
                if self._next is None:
                    supervisor.hold_for_reload(None)
                    self._waiting = None

    @staticmethod
    def _supersede(old: _Submission, new: _Submission) -> None:
        """`old` will not apply: whoever waits for its answer gets the newer one's (what lessord did
        with the file as it is now); whoever waits for it to be in force is told it never will be."""
        def follow(answer: asyncio.Future) -> None:
            if old.answered.done():
                return
            if answer.cancelled():
                old.answered.cancel()
            elif (error := answer.exception()) is not None:
                old.answered.set_exception(error)
            else:
                old.answered.set_result(answer.result())

        if not old.answered.done():
            new.answered.add_done_callback(follow)
        _fail(old.settled, Superseded(old.read.digest, f"digest {new.read.digest}" if new.read.digest else "a newer config"))

    @staticmethod
    def _end(submission: _Submission, exc: BaseException) -> None:
        for future in (submission.answered, submission.settled):
            _fail(future, exc)

    async def close(self) -> None:
        """lessord stops: no reload applies from here on (a pending one, woken by the stop's own
        unloads, would add and remove models beside them); whoever waits for one is answered."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if (submission := self._next) is not None:
            self._next = None
            self._end(submission, Superseded(submission.read.digest, "lessord's stop"))
        self._supervisor.hold_for_reload(None)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # nobody may wait for it any more (answered pending): not "never retrieved"
