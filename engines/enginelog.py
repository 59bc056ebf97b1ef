"""Engine log files with a size limit: each engine's stdout and stderr go through a pipe to a small
pump process that appends them to `logs/<model>.log`, rotates that file by size, keeps the folder
under a total, and drops output rather than take the disk's last megabytes (the ledger's).

Why a process and not lessord itself: an engine outlives lessord (a restart adopts it), and a pipe
whose reader died would make the engine's next write fail (SIGPIPE kills a C engine). The pump is
started in its own session, so it is neither lessord's child group nor the engine's: it ends when
the engine and every process holding its output have closed the pipe, and never before, so the
engine's last lines (an exit's reason quotes them) are in the file. It ignores SIGTERM and SIGINT
for that reason. It is this file, run by path with the standard library only (`python -I`), about
8 MiB of memory.

Files: `<model>.log` is the current one (lessor's `# lessor: starting` line first, repeated at the
head of each file a rotation starts, with a `continued` line after it, so that a tail reads on into
the older file); `<model>.log.1` is the newest rotated one, up to
`.log.<files - 1>`. The start of an engine shifts the previous run's files the same way.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PREFIX = "# lessor: "  # lessor's own lines in an engine log
_CHUNK = 1 << 16
LINE_SLACK = 16 << 10  # how far before per_file a rotation is due: a line under way may end there
_ROTATED = re.compile(r"\.log\.(\d+)$")


@dataclass(frozen=True)
class LogLimits:
    """engine_logs in the config (daemon/config/schema.py documents each field)."""

    per_model: int = 64 << 20
    files_per_model: int = 4
    total: int = 1 << 30
    keep_free: int = 256 << 20
    drop_on_stop: bool = False

    @property
    def per_file(self) -> int:
        return max(1, self.per_model // self.files_per_model)

    def argv(self, path: Path) -> list[str]:
        return [sys.executable, "-I", __file__, str(path), str(self.per_file), str(self.files_per_model),
                str(self.total), str(self.keep_free)]


limits = LogLimits()  # lessord's, set from its config at start (daemon/runtime.py)


def configure(new: LogLimits) -> None:
    global limits
    limits = new


def continued(path: Path) -> str:
    """The second line of a file a rotation started: `tail` reads on into the older file."""
    return f"{PREFIX}continued: the older lines are in {path.name}.1\n"


def tail(path: Path, lines: int = 50) -> list[str]:
    """The last `lines` lines of a log, reading only its end; across the last rotation (the pump's
    `continued` line says there was one), so a tail right after it still shows `lines` lines."""
    found = _tail(path, lines)
    marker = continued(path).rstrip("\n")
    if len(found) < lines and marker in found[:2]:
        own = found[found.index(marker) + 1:]  # the repeated argv line and the marker are not the engine's
        return (_tail(path.with_name(path.name + ".1"), lines - len(own)) + own)[-lines:]
    return found


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            span = max(lines, 1) * 400
            while True:  # from the end, twice as far each time, until `lines` whole lines are in
                f.seek(max(0, size - span))
                data = f.read()
                if span >= size or data.count(b"\n") > lines:
                    break
                span *= 2
    except FileNotFoundError:
        return []
    return list(deque(data.decode(errors="replace").splitlines(), maxlen=lines))


def rotated(path: Path) -> list[Path]:
    """The model's rotated files, newest first."""
    found = []
    for entry in os.scandir(path.parent):
        rest = entry.name[len(path.name) + 1:] if entry.name.startswith(path.name + ".") else ""
        if rest.isdigit():
            found.append((int(rest), Path(entry.path)))
    return [entry for _, entry in sorted(found)]


def shift(path: Path, files: int) -> None:
    """`x.log` becomes `x.log.1`, `.1` becomes `.2`, ...; what would pass `.<files - 1>` goes."""
    for old in rotated(path):
        if int(old.name.rsplit(".", 1)[1]) >= files - 1:
            old.unlink(missing_ok=True)
    for number in range(files - 2, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{number + 1}"))
    if path.exists():
        if files > 1:
            path.replace(path.with_name(path.name + ".1"))
        else:
            path.unlink()


def drop_older(path: Path) -> int:
    """Remove the model's rotated files (its current log stays for `lessor logs`); bytes freed."""
    freed = 0
    for old in rotated(path):
        try:
            freed += old.stat().st_size
            old.unlink()
        except FileNotFoundError:
            pass
    return freed


def trim_total(folder: Path, total: int) -> None:
    """Remove rotated files, the oldest first, of any model, until the folder's logs fit `total`.
    Current files are never removed: each is some engine's (or its last run's) only record."""
    sizes, candidates = 0, []
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False) or ".log" not in entry.name:
            continue
        stat = entry.stat(follow_symlinks=False)
        sizes += stat.st_size
        if _ROTATED.search(entry.name):
            candidates.append((stat.st_mtime, entry.path, stat.st_size))
    for _, old, size in sorted(candidates):
        if sizes <= total:
            return
        try:
            os.unlink(old)
            sizes -= size
        except FileNotFoundError:
            pass


def free_bytes(folder: Path) -> int:
    found = os.statvfs(folder)
    return found.f_bavail * found.f_frsize


class Pump:
    """Copies the pipe into the log, within the limits."""

    def __init__(self, path: Path, per_file: int, files: int, total: int, keep_free: int) -> None:
        self.path, self.per_file, self.files, self.total, self.keep_free = path, per_file, files, total, keep_free
        self.header = _first_line(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.dropped = 0

    def run(self, source: int) -> None:
        while chunk := os.read(source, _CHUNK):
            self.take(chunk)
        self._say_dropped()
        os.close(self.fd)
        # Other models' pumps wrote on after this one's last rotation: whichever pump ends last
        # trims after every write, so the folder is within the total once the engines are gone.
        trim_total(self.path.parent, self.total)

    def take(self, chunk: bytes) -> None:
        if free_bytes(self.path.parent) - len(chunk) < self.keep_free:
            drop_older(self.path)  # this model's rotated files first, then output
            if free_bytes(self.path.parent) - len(chunk) < self.keep_free:
                self.dropped += len(chunk)
                return
        self._say_dropped()
        slack = min(LINE_SLACK, self.per_file // 8)
        while chunk:
            room = self.per_file - slack - self.size  # a new file is due past here
            if len(chunk) <= room:
                self._write(chunk)
                return
            cut = chunk.rfind(b"\n", 0, max(room, 0)) + 1  # up to the last whole line that fits
            if not cut:
                # The pipe cuts lines anywhere: the line under way runs on to per_file, so that a
                # rotation splits no line (`lessor logs` reads on across it); a longer one is split.
                reach = max(self.per_file - self.size, 0)
                end = chunk.find(b"\n", 0, reach)
                if end < 0 and len(chunk) <= reach:
                    self._write(chunk)
                    return
                cut = end + 1 if end >= 0 else reach
            self._write(chunk[:cut])
            chunk = chunk[cut:]
            self._rotate()

    def _say_dropped(self) -> None:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self._write(f"\n{PREFIX}{dropped} bytes of engine output dropped: the disk had less than "
                        f"{self.keep_free >> 20} MiB free (engine_logs.keep_free)\n".encode())

    def _rotate(self) -> None:
        os.close(self.fd)
        shift(self.path, self.files)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = 0
        head = self.header + continued(self.path).encode() if self.header else b""
        if head and len(head) < self.per_file // 2:  # the argv line heads every file; at least half is output
            self._write(head)
        trim_total(self.path.parent, self.total)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError:  # a full disk after all: the rest of this chunk is lost, the engine goes on
                self.dropped += len(view)
                return
            self.size += written
            view = view[written:]


def _first_line(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            line = f.readline(_CHUNK)
    except FileNotFoundError:
        return b""
    return line if line.startswith(PREFIX.encode()) and line.endswith(b"\n") else b""


def main(argv: list[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # ends at the pipe's end: the engine's last lines are kept
    path, per_file, files, total, keep_free = argv
    Pump(Path(path), int(per_file), int(files), int(total), int(keep_free)).run(sys.stdin.fileno())


if __name__ == "__main__":
    main(sys.argv[1:])
