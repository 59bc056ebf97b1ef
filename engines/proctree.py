"""An engine's processes, wherever they went: its process group, every process that carries its
marker in its environment (a worker that left the group with `setsid()` and was orphaned: Ray-style
daemonised workers), and the descendants of both. What `EngineProcess.stop` signals, and what
lessord's start looks for when it settles strays (engines/strays.py). The one reader of /proc in
lessor: a process's stat and environment, the boot id; what is stopped (adoption) is read here too.

The marker is `LESSOR_STATE_DIR` and `LESSOR_ATTEMPT` (a uuid per load), which the supervisor puts
in every engine's environment and every child inherits. It is read from /proc/PID/environ, the
environment a process was started with: a process that changes its own environment later still
shows the marker; one exec'd with an environment that drops it is found only while a process of
the engine is its ancestor. Good enough for engines that daemonise workers; a cgroup per engine
(the enforce issue) is the complete answer.

lessord is the child subreaper of what it starts (`become_subreaper`): an engine's orphaned
descendants become lessord's children rather than init's, so they stay in its process tree and
lessord reaps the ones it stops. Processes are signalled through a pidfd after their start time is
checked again: never a process that was given a recycled pid meanwhile."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lessor.engines")

MARKER_KEYS = ("LESSOR_STATE_DIR", "LESSOR_ATTEMPT")
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STOPPED_STATES = ("T", "t")  # /proc/PID/stat: stopped by a signal, or by a tracer


@dataclass(frozen=True)
class Proc:
    """A live process as /proc showed it: with `start` (clock ticks after boot), this very process."""

    pid: int
    ppid: int
    pgrp: int
    start: str
    state: str  # R, S, D, T (stopped by a signal), t (by a tracer), Z ...

    @property
    def stopped(self) -> bool:
        """Stopped (SIGSTOP, SIGTSTP, a tracer): it acts on no signal but SIGKILL and SIGCONT."""
        return self.state in STOPPED_STATES


def marker_of(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """The entries of an engine's environment that only its own processes carry (() without them:
    only its group and descendants are its processes then)."""
    if not all(env.get(key) for key in MARKER_KEYS):
        return ()
    return tuple(f"{key}={env[key]}".encode() for key in MARKER_KEYS)


def marker_of_pid(pid: int) -> tuple[bytes, ...]:
    """An adopted engine's marker, read from its leader's environment."""
    entries = environ(pid) or []
    return marker_of(dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e))


def environ(pid: int) -> list[bytes] | None:
    """The environment `pid` was started with; None when it is gone or not ours to read."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def process_table() -> dict[int, Proc]:
    """Every live process (zombies hold no memory and are left out), lessord itself excepted."""
    table = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me and (proc := read_proc(int(entry.name))) is not None:
            table[proc.pid] = proc
    return table


def read_proc(pid: int, zombies: bool = False) -> Proc | None:
    """The process on `pid` (None when gone; a zombie counts as gone unless `zombies`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X") and not zombies:
        return None
    return Proc(pid, int(fields[1]), int(fields[2]), fields[19], fields[0])


def boot_id() -> str:
    """This boot's id: with a start time, a process's identity across pid reuse and reboots."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: every start counts as the same boot, the stricter reading
        return ""


def stopped_members(pgid: int) -> list[int]:
    """Members of the process group that are stopped (SIGSTOP, SIGTSTP, a tracer)."""
    return sorted(pid for pid, proc in process_table().items() if proc.pgrp == pgid and proc.stopped)


def still_stopped(pids: Iterable[int]) -> list[int]:
    """Of these, the ones still stopped: a look at each, not a scan of every process."""
    return [pid for pid in pids if (proc := read_proc(pid)) is not None and proc.stopped]


def marked(table: Mapping[int, Proc], marker: Sequence[bytes]) -> set[int]:
    """The processes whose environment holds every entry of `marker`."""
    if not marker:
        return set()
    return {pid for pid in table if (env := environ(pid)) is not None and all(m in env for m in marker)}


def with_descendants(table: Mapping[int, Proc], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, todo = set(), [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def engine_processes(leader: int, marker: Sequence[bytes], leader_start: str | None = None) -> dict[int, Proc]:
    """The engine's live processes: the leader's group, the processes carrying its marker, and
    the descendants of both. Once the leader is gone its pid may be another process's (started at
    another time than `leader_start`): then neither it nor a group of that number is the engine's."""
    table = process_table()
    roots = marked(table, marker)
    if group_is_ours(table.get(leader), leader_start):
        roots |= {pid for pid, proc in table.items() if proc.pgrp == leader} | {leader}
    return {pid: table[pid] for pid in with_descendants(table, roots)}


def group_is_ours(now: Proc | None, leader_start: str | None) -> bool:
    """Whether the leader's pid and group number are still the engine's: its leader runs (the same
    start time), or is gone and its pid not given again (the kernel does not reuse the number of a
    group with members left, so those are the engine's)."""
    return now is None or leader_start is None or now.start == leader_start


def signal_processes(procs: Iterable[Proc], sig: signal.Signals) -> None:
    """Each of `procs` that is still that very process (its start time unchanged once a pidfd
    holds it, so the pid cannot be given to another meanwhile)."""
    for proc in procs:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            continue
        try:
            if (now := read_proc(proc.pid)) is not None and now.start == proc.start:
                signal.pidfd_send_signal(pidfd, sig)
        except OSError:
            pass
        finally:
            os.close(pidfd)


def reap(procs: Iterable[Proc]) -> None:
    """Reap those of `procs` that have ended as lessord's children: orphans it inherited as
    subreaper (each still that very process: same start time). Never pass a child a
    subprocess.Popen waits on (an engine's leader): its status would be taken from it."""
    me = os.getpid()
    for proc in procs:
        now = read_proc(proc.pid, zombies=True)
        if now is not None and now.ppid == me and now.start == proc.start:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def become_subreaper() -> bool:
    """Make lessord the child subreaper (Linux 3.4 and later): an engine's orphaned descendants
    become its children, not init's. False (and said) where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        reason = str(exc)
    log.warning("lessord could not become the child subreaper (%s): an engine's orphaned workers are found "
                "by their environment only", reason)
    return False
