"""Strays: processes started for a state folder that no recorded engine owns. lessord died between
starting an engine and recording it, or a worker outlived its engine (it left the engine's group
with setsid and was orphaned when the engine was stopped or died). Found by the environment marker
every engine process carries (LESSOR_STATE_DIR, LESSOR_ATTEMPT), stopped group and descendants,
each checked by its start time before every signal (never a recycled pid)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from .process import signal_group
from .proctree import Proc, process_table, read_proc, signal_processes, with_descendants
from .proctree import environ as proc_environ

log = logging.getLogger("lessor.reconciler")


def find_strays(state_dir: Path, keep_attempts: set[str]) -> list[int]:
    """Processes started for this state folder (their environment says so) whose attempt is not
    kept: lessord died between starting an engine and recording it, or a worker outlived its engine
    (it left the engine's group with setsid and was orphaned when the engine was stopped or died).
    The top of each: no parent of the same attempt (an engine's own workers go with it). Every
    process of a kept attempt is kept, wherever it is: an adopted engine's workers run on."""
    return tops(state_dir, lambda attempt: attempt not in keep_attempts)


def tops(state_dir: Path, wanted: Callable[[str], bool]) -> list[int]:
    """This state folder's processes of the `wanted` attempts that have no parent of the same attempt."""
    table = process_table()
    attempts = engine_attempts(state_dir, table)
    return sorted(pid for pid, attempt in attempts.items()
                  if wanted(attempt) and attempts.get(table[pid].ppid) != attempt)


def engine_attempts(state_dir: Path, table: dict[int, Proc]) -> dict[int, str]:
    """pid -> load attempt, for every live process that carries this state folder's marker."""
    want = f"LESSOR_STATE_DIR={state_dir}".encode()
    found = {}
    for pid in table:
        environ = proc_environ(pid)
        if environ is not None and want in environ:
            found[pid] = next((v[len(b"LESSOR_ATTEMPT="):].decode() for v in environ
                               if v.startswith(b"LESSOR_ATTEMPT=")), "")
    return found


def identified(pids: list[int]) -> dict[int, Proc]:
    """Each process as it is now: what it is checked against before every signal, later."""
    return {pid: proc for pid in pids if (proc := read_proc(pid)) is not None}


async def stop_strays(state_dir: Path, keep_attempts: set[str], grace_s: float) -> list[int]:
    return await stop_groups(identified(find_strays(state_dir, keep_attempts)), state_dir, grace_s)


async def stop_groups(strays: dict[int, Proc], state_dir: Path, grace_s: float) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, to each stray that is still the process found: to
    its group and to every descendant (a stray's workers may have left its group)."""
    alive = [strays[pid] for pid in strays if _same(strays[pid])]
    for proc in alive:
        log.warning("stopping stray engine process %d and its descendants (started for %s, its engine not "
                    "recorded or gone)", proc.pid, state_dir, extra={"pid": proc.pid, "step": "stray"})
    # SIGCONT after: a stopped stray acts on its SIGTERM only once continued.
    found = _signal_strays(alive, signal.SIGTERM, signal.SIGCONT)
    deadline = asyncio.get_running_loop().time() + grace_s
    while any(_same(proc) for proc in found) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    # Those orphaned since the SIGTERM are no longer below their stray: each found then gets it too.
    found += _signal_strays(alive, signal.SIGKILL)
    signal_processes(found, signal.SIGKILL)  # never reaped here: strays are no descendants of this lessord
    return [proc.pid for proc in alive]


def _signal_strays(strays: list[Proc], *sigs: signal.Signals) -> list[Proc]:
    """`sigs` to the group and the descendants of each stray still alive; the processes signalled."""
    table = process_table()
    roots = [proc.pid for proc in strays if _same(proc)]
    found = [table[pid] for pid in with_descendants(table, roots)]
    for sig in sigs:
        for pid in roots:
            signal_group(pid, sig)
        signal_processes(found, sig)
    return found


def _same(proc: Proc) -> bool:
    """Still that very process, not a new one on its pid."""
    return (now := read_proc(proc.pid)) is not None and now.start == proc.start
