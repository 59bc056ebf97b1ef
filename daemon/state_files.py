"""Who may read the state folder: the ledger, its record, the admin token, the engines' logs (which
quote an engine's command line and whatever it prints), the traffic statistics. Owner and group
only: the folder 0750 (the systemd unit's group may read, as `lessor status` run by an operator in
it does), each file at most 0640 (lessord's umask 027, set at start) and the token 0600.

A folder an older lessord (umask 022) left 0755 with files 0644 is tightened at start, said in one
line: others lose what they could read (sockets keep their mode: the admin socket's group connects).
Not here: what goes in the files (their owners write them).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("lessor.service")

UMASK = 0o027  # files 0640, folders 0750 at most
FOLDER_MODE = 0o750
OTHERS = stat.S_IRWXO
GROUP_WRITE = stat.S_IWGRP


def secure(state_dir: Path) -> None:
    """Create the state folder 0750, or take from an existing one, and from everything under it, what
    others (and the group, for writing) may do; one line says what changed."""
    state_dir.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if not mode & (OTHERS | GROUP_WRITE):
        return
    try:
        os.chmod(state_dir, mode & ~(OTHERS | GROUP_WRITE))
    except OSError as exc:
        log.warning("the state_dir %s is mode %04o: others may read the ledger and the engines' logs, and it "
                    "cannot be changed (%s): chmod 0750 it", state_dir, mode, exc.strerror)
        return
    tightened = 0
    for folder, folders, files in os.walk(state_dir):
        for name in (*folders, *files):
            tightened += _tighten(Path(folder, name))
    log.warning("the state_dir %s was mode %04o (others could read the ledger and the engines' logs): now %04o, "
                "and %d file(s) under it no longer open to others", state_dir, mode,
                mode & ~(OTHERS | GROUP_WRITE), tightened)


def _tighten(path: Path) -> int:
    try:
        info = path.lstat()
    except OSError:  # gone meanwhile
        return 0
    if stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode) or not info.st_mode & (OTHERS | GROUP_WRITE):
        return 0
    try:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~(OTHERS | GROUP_WRITE))
    except OSError:  # not ours (an engine's file?): the folder's mode keeps others out anyway
        return 0
    return 1
