"""Process supervision, in one place for every engine: its own process group, its output in a
per-model log, exit detected the moment it happens, and a stop that sends SIGTERM, then SIGKILL
after a grace period, to all of the engine's processes (its group and the workers that left it:
engines/proctree.py, which reads /proc), and reaps them, so no child is left behind holding VRAM.
Not here: the readiness probes' pacing (engines/readiness.py), the log files (engines/enginelog.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path

from . import enginelog, readiness
from .proctree import (
    Proc,
    boot_id,
    engine_processes,
    group_is_ours,
    marker_of,
    marker_of_pid,
    read_proc,
    reap,
    signal_processes,
)
from .readiness import Backoff
from .redaction import redact_argv

log = logging.getLogger("lessor.engines")

# Never handed to an engine: a crashed or hostile engine must not be able to drive lessor.
SECRET_ENV = ("LESSOR_ADMIN_TOKEN",)


class ProcessEnded(RuntimeError):
    """The engine's process ended while lessor was waiting on it."""

    def __init__(self, pid: int, returncode: int, doing: str, tail: Sequence[str]) -> None:
        self.returncode = returncode
        super().__init__(f"engine (pid {pid}) exited with {describe_exit(returncode)} while {doing}{last_lines(tail)}")


# The first line of each engine log: lessor's own, with the argv (the log and `lessor logs` keep it).
STARTING = "# lessor: starting "


def last_lines(tail: Sequence[str], lines: int = 5) -> str:
    """"; last log lines: a | b" for an exit's message ("" when the log is empty): the engine's own
    lines, not lessor's argv line, which would make each crash's log line and event hundreds of characters."""
    tail = [line for line in tail if not line.startswith(enginelog.PREFIX)]
    return "; last log lines: " + " | ".join(line.strip() for line in tail[-lines:]) if tail else ""


class EngineNotFound(FileNotFoundError):
    """The engine's command is not on the PATH it is started with (or not an executable file)."""

    def __str__(self) -> str:
        return str(self.args[0])


def command_problem(command: str, path: str) -> str | None:
    """Why `command` cannot be executed with `path` as PATH (None: it can). The engine's PATH is
    lessord's own unless the engine's env sets one."""
    if os.sep in command:
        if os.path.isfile(command) and os.access(command, os.X_OK):
            return None
        return f"engine command '{command}' " + ("is not executable" if os.path.isfile(command) else "does not exist")
    if shutil.which(command, path=path):
        return None
    return f"engine command '{command}' not found on PATH ({path})"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_env(extra: Mapping[str, str], withhold: Sequence[str] = ()) -> dict[str, str]:
    """lessord's environment for an engine, less its secrets (the admin token, router keys)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and k not in withhold}
    env.update(extra)
    return env


def owned_env(names: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The variables of `env` that `names` claim (exact, any case, or a prefix ending in "*")."""
    exact = {n.upper() for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1].upper() for n in names if n.endswith("*"))
    return sorted(k for k in env if k.upper() in exact or (prefixes and k.upper().startswith(prefixes)))


# How long an engine's exit waits for its log pump to write the last lines. The pump ends at the
# pipe's end, at once after a plain exit; the bound only matters where a descendant that escaped
# the group holds the pipe open, so it is generous: a busy machine may be slow to run the pump.
PUMP_DRAIN_S = 10.0

UNKNOWN_EXIT = 255 << 8  # an adopted engine is not our child: its exit status cannot be read


def describe_exit(returncode: int) -> str:
    if returncode == UNKNOWN_EXIT:
        return "an unknown status (adopted engine)"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def process_identity(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>`: unique for a process across pid reuse and reboots.
    None when no such process runs (a zombie counts as gone), or where no boot id can be read."""
    proc, boot = read_proc(pid), boot_id()
    return f"{boot}:{proc.start}" if proc is not None and boot else None


class EngineProcess:
    """One engine: its process group, and the processes that carry its `marker` (engines/proctree.py).
    `on_exit(returncode)` is called once if its leader ends without `stop()`; what it leaves behind
    is killed then.

    Either our child (`spawn`) or an engine a previous lessord started and this one adopted
    (`adopt`): its exit is then seen through a pidfd, the same moment a child's would be."""

    def __init__(self, pid: int, identity: str, exit_status: asyncio.Future[int] | asyncio.Task[int],
                 argv: Sequence[str], log_path: Path, on_exit: Callable[[int], None] | None,
                 started_at: float | None = None, pump: asyncio.Future[int] | None = None,
                 marker: Sequence[bytes] = ()) -> None:
        self.pid, self.identity, self.argv, self.log_path = pid, identity, tuple(argv), log_path
        self.marker = tuple(marker)
        self._signalled: dict[int, Proc] = {}  # every process of it signalled: the orphans among them are reaped
        self.started_at = started_at if started_at is not None else time.time()
        self.exited = asyncio.Event()
        self._returncode: int | None = None
        self._on_exit = on_exit
        self._stopping = False
        self.probes = 0  # readiness probes so far (wait_until): what tests count instead of timing
        self.ready_line_at: float | None = None  # when the last wait_until saw its ready line (CLOCK_MONOTONIC)
        self._pump = pump  # the log pump's exit: the engine's output is all in the file then
        self._watcher = asyncio.ensure_future(self._watch(exit_status))

    @classmethod
    async def spawn(cls, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None,
                    on_exit: Callable[[int], None] | None = None) -> EngineProcess:
        missing = command_problem(argv[0], env.get("PATH", os.defpath))
        if missing:  # else exec's bare "[Errno 2] No such file or directory" names neither the command nor PATH
            raise EngineNotFound(missing)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        limits = enginelog.limits
        enginelog.shift(log_path, limits.files_per_model)  # the previous runs' logs, for the post-mortem
        enginelog.trim_total(log_path.parent, limits.total)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with open(fd, "wb", buffering=0) as out:
            out.write(f"{STARTING}{' '.join(argv)}\n".encode())
        # The engine writes into a pipe; the log pump writes the file, rotated by size (engines/enginelog.py).
        readable, writable = os.pipe()
        try:
            pump = subprocess.Popen(limits.argv(log_path), stdin=readable, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env={}, start_new_session=True)
            pumped = asyncio.ensure_future(_child_exit(pump))  # reaped however the engine's start goes
            os.close(readable)
            readable = -1
            # argv, never a shell: nothing in the config is ever parsed by /bin/sh. subprocess.Popen,
            # not asyncio's: in CPython 3.11 asyncio's exec took 5-7 ms of the event loop per start (a
            # watcher thread per child among it), Popen 0.2 ms; the exit is seen through a pidfd.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=writable, stderr=writable,
                                    env=dict(env), cwd=str(cwd) if cwd else None, start_new_session=True)
        finally:
            os.close(writable)  # the pump reads to the pipe's end: the engine's (and its children's) last copy
            if readable >= 0:
                os.close(readable)
        # The supervisor's "loading" line names the pid; the argv is the first line of the engine's log.
        log.debug("engine started: pid %d: %s", proc.pid, " ".join(redact_argv(argv)))
        identity = process_identity(proc.pid) or f"child:{proc.pid}"
        return cls(proc.pid, identity, asyncio.ensure_future(_child_exit(proc)), argv, log_path, on_exit, pump=pumped,
                   marker=marker_of(env))

    @classmethod
    def adopt(cls, pid: int, identity: str, log_path: Path, on_exit: Callable[[int], None] | None,
              started_at: float | None = None) -> EngineProcess | None:
        """Take over an engine a previous lessord started; None unless `pid` is still that very
        process (same identity), never a stranger that was given a recycled pid."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if process_identity(pid) != identity:  # checked after the pidfd is held: it cannot change now
            os.close(pidfd)
            return None
        return cls(pid, identity, asyncio.ensure_future(_pidfd_exit(pidfd)), (), log_path, on_exit, started_at,
                   marker=marker_of_pid(pid))

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def _watch(self, exit_status) -> None:
        returncode = await exit_status
        if not self._stopping:  # an engine ends with its leader: what it left (a worker holding the log's pipe) goes
            self._signal(signal.SIGKILL)
        if self._pump is not None:  # its last lines (an exit's reason quotes them) reach the file first
            try:  # bounded: a descendant that escaped the group may hold the pipe open
                await asyncio.wait_for(asyncio.shield(self._pump), PUMP_DRAIN_S)
            except asyncio.TimeoutError:
                pass
        self._returncode = returncode
        self.exited.set()
        if not self._stopping:
            # Said by the supervisor, with the model: "load failed" or "crashed".
            log.debug("engine pid %d exited with %s", self.pid, describe_exit(returncode))
            if self._on_exit is not None:
                self._on_exit(returncode)

    def tail(self, lines: int = 50) -> list[str]:
        return enginelog.tail(self.log_path, lines)

    def exited_error(self, doing: str) -> ProcessEnded:
        return ProcessEnded(self.pid, self.returncode if self.returncode is not None else -1, doing, self.tail(10))

    async def wait_until(self, check: Callable[[], Awaitable[bool] | bool], doing: str, timeout_s: float,
                         markers: Sequence[str] = (), backoff: Backoff | None = None) -> None:
        """Probe `check` until true; raise ProcessEnded at once if the process ends, TimeoutError
        after `timeout_s` (engines/readiness.py)."""
        await readiness.wait_until(self, check, doing, timeout_s, markers, backoff)

    async def wait_http(self, url: str, timeout_s: float, doing: str, markers: Sequence[str] = ()) -> None:
        """Readiness: the port accepts, then `url` answers 200."""
        await readiness.wait_http(self, url, timeout_s, doing, markers)

    def processes(self) -> dict[int, Proc]:
        """Its live processes: its group, those that carry its marker, and their descendants."""
        return engine_processes(self.pid, self.marker, self._leader_start)

    @property
    def _leader_start(self) -> str | None:
        # `<boot id>:<start>`; "child:<pid>" where /proc could not be read at spawn: unknown.
        return self.identity.rsplit(":", 1)[-1] if self.identity and not self.identity.startswith("child:") else None

    def _signal(self, sig: signal.Signals) -> dict[int, Proc]:
        """`sig` to the group (members forked since the scan too) and to each of its processes."""
        found = self.processes()
        self._signalled.update(found)
        # The group by number too (members forked since the scan), unless the leader's pid is another's now.
        group = group_is_ours(read_proc(self.pid), self._leader_start)
        if group:
            signal_group(self.pid, sig)
        signal_processes(found.values(), sig)
        if sig == signal.SIGTERM:  # a stopped process acts on its SIGTERM only once continued
            if group:
                signal_group(self.pid, signal.SIGCONT)
            signal_processes(found.values(), signal.SIGCONT)
        return found

    async def stop(self, grace_s: float) -> int:
        """SIGTERM to every process of the engine, SIGKILL to whatever is left after `grace_s`, reap. Idempotent."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        if not self.exited.is_set():
            found = self._signal(signal.SIGTERM)
            self._say_escaped(found)
            try:
                await asyncio.wait_for(self.exited.wait(), grace_s)
                await _wait_gone(found.values(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                pass
            if not self.exited.is_set() or _alive(found.values()):
                log.warning("engine pid %d ignored SIGTERM for %g s: SIGKILL (timeouts.stop_grace)", self.pid, grace_s,
                            extra={"pid": self.pid})
        # Children the leader left behind (workers holding VRAM) get SIGKILL too.
        killed = self._signal(signal.SIGKILL)
        await self.exited.wait()
        await self._watcher
        await self._wait_all_gone(killed, timeout_s=5)
        if enginelog.limits.drop_on_stop:  # engine_logs.on_stop: drop_older (the last log stays)
            enginelog.drop_older(self.log_path)
        return self._returncode if self._returncode is not None else -1

    def _say_escaped(self, found: Mapping[int, Proc]) -> None:
        escaped = sorted(pid for pid, proc in found.items() if proc.pgrp != self.pid)
        if escaped:
            # INFO, not WARNING: routine for engines that daemonise their workers (Ray).
            log.info("engine pid %d: stopping %d process(es) of it outside its process group too (pid %s; they "
                     "carry its environment or descend from it)", self.pid, len(escaped),
                     ", ".join(map(str, escaped)), extra={"pid": self.pid})

    async def _wait_all_gone(self, killed: Mapping[int, Proc], timeout_s: float) -> None:
        """Until no process of the engine runs (SIGKILL again to any forked meanwhile); the orphans
        lessord inherited as subreaper are reaped."""
        deadline = time.monotonic() + timeout_s
        left = killed
        while True:
            await _wait_gone(left.values(), deadline - time.monotonic())
            reap(proc for proc in self._signalled.values() if proc.pid != self.pid)  # the leader is Popen's to reap
            left = self._signal(signal.SIGKILL) if time.monotonic() < deadline else self.processes()
            if not left:
                return
            if time.monotonic() >= deadline:
                log.error("engine pid %d: process(es) %s still run %g s after SIGKILL", self.pid,
                          ", ".join(map(str, sorted(left))), timeout_s)
                return


async def _child_exit(proc: subprocess.Popen) -> int:
    """Our child's exit status once it ends: its pidfd (open on a zombie too) says when, then
    reaping it is immediate."""
    await _readable(os.pidfd_open(proc.pid))
    return proc.wait()


async def _readable(pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)
    loop.add_reader(pidfd, wake)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _pidfd_exit(pidfd: int) -> int:
    """Wait for a process that is not our child: its pidfd becomes readable when it ends."""
    await _readable(pidfd)
    return UNKNOWN_EXIT


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(procs: Iterable[Proc]) -> bool:
    return any((now := read_proc(proc.pid)) is not None and now.start == proc.start for proc in procs)


async def _wait_gone(procs: Iterable[Proc], timeout_s: float) -> None:
    """Until none of `procs` runs (a zombie counts as gone), or `timeout_s` has passed."""
    procs = list(procs)
    deadline = time.monotonic() + timeout_s
    interval = 0.005
    while _alive(procs) and time.monotonic() < deadline:
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(0.1, interval * 2)
