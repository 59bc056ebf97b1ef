"""Wake a readiness probe the moment an engine writes its ready line to its log.

An engine says it is ready in its log before anyone asks it (vLLM's uvicorn "Application startup
complete.", the torch engine's "weights loaded:"). Polling its health URL every 100-200 ms puts
half that, on average, between the engine being ready and lessor noticing; an inotify watch on
the log file (the engine's stdout, which lessor redirects there) turns the line into an event, so
the HTTP probe, which stays the truth, runs within a millisecond or two of it.

Linux's inotify through ctypes (the standard library has no binding). Where it is missing or
refused (no libc symbol, out of watches), `LogWatch.start` says False and the caller's backoff
polling alone notices readiness.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("lessor.engines")

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100  # on the folder: the log pump started a new file (a rotation)
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_READ_CHUNK = 1 << 16


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 (AttributeError where the symbols are missing)
    except (OSError, AttributeError):
        return None
    return libc


class LogWatch:
    """Sets `seen` when one of `markers` appears in what is appended to `path` after `start()`.

    The whole file is searched, once at start and then what each write appends: the log holds
    this start only (its previous run's is kept as `.1`), so a marker written before the watch
    began counts too. The last few bytes are kept so a marker split across two writes is found.
    When the file is rotated (engines/enginelog.py), the rest of the old one is read and the
    watch goes on in the new one."""

    def __init__(self, path: Path, markers: Sequence[str]) -> None:
        self.path = Path(path)
        self.markers = tuple(m.encode() for m in markers if m)
        self.seen = asyncio.Event()
        self.wakes = 0  # inotify events handled: what a test counts instead of timing anything
        self.seen_at: float | None = None  # CLOCK_MONOTONIC when a marker was first found: the engine's line, give or take the wake
        self._fd: int | None = None
        self._file: BinaryIO | None = None
        self._offset = 0
        self._carry = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Watch the log. False where inotify is unavailable (then nothing is set)."""
        libc = _libc()
        if not self.markers or libc is None:
            return False
        try:
            self._file = open(self.path, "rb")
        except OSError:  # an adopted engine's log may be gone: polling alone, then
            return False
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify_init1 failed (%s): readiness by polling only", os.strerror(ctypes.get_errno()))
            self.close()
            return False
        if not self._add_watch(libc, fd):
            os.close(fd)
            self.close()
            return False
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_event)
        self._scan()
        return True

    def _add_watch(self, libc, fd: int) -> bool:
        for target, mask in ((self.path, IN_MODIFY), (self.path.parent, IN_CREATE)):
            if libc.inotify_add_watch(fd, os.fsencode(target), mask) < 0:
                log.debug("inotify_add_watch %s failed (%s): readiness by polling only", target,
                          os.strerror(ctypes.get_errno()))
                return False
        return True

    def _on_event(self) -> None:
        if self._fd is None:  # closed
            return
        self.wakes += 1
        try:
            while os.read(self._fd, 4096):  # drain: one wake per batch of writes is enough
                pass
        except BlockingIOError:
            pass
        self._scan()

    def _scan(self) -> None:
        self._read_on()
        rotated = self._rotated()
        if rotated is not None and self._file is not None and self._fd is not None:  # the old file's last lines are read above; the new one from its start
            self._file.close()
            self._file, self._offset = rotated, 0
            libc = _libc()
            if libc.inotify_add_watch(self._fd, os.fsencode(self.path), IN_MODIFY) < 0:
                log.debug("inotify_add_watch %s failed after a rotation: polling only", self.path)
            self._read_on()

    def _rotated(self) -> BinaryIO | None:
        """The new file at the log's path, open, when it is not the one read so far."""
        if self._file is None:  # closed
            return None
        try:
            if os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino:
                return None
            return open(self.path, "rb")
        except OSError:
            return None

    def _read_on(self) -> None:
        if self._file is None:  # closed
            return
        self._file.seek(self._offset)
        while chunk := self._file.read(_READ_CHUNK):
            self._offset += len(chunk)
            text = self._carry + chunk
            if any(marker in text for marker in self.markers):
                if self.seen_at is None:
                    self.seen_at = time.monotonic()
                self.seen.set()
            self._carry = text[-max(map(len, self.markers)):]

    def close(self) -> None:
        if self._fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LogWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
