"""Which version of an engine a command runs, for the key of a memory fingerprint: the package
metadata of the Python that runs it, or a binary's `--version`. Never imports the engine.

Cached per executable, its modification time and the packages asked. A binary rebuilt has a new
modification time; a `pip install -U` inside a venv changes its site-packages folder's (pip adds
and removes the package's dist-info folder there), which the key holds too. So a load's `refresh`
starts a Python (about 40 ms of a cold start) only for an interpreter outside a venv, or a venv
that also sees the system's packages, where no folder of its own tells; in a venv the versions
are read from its dist-info folders (what importlib.metadata reads) without starting one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

_ASK = "import importlib.metadata as m, sys\nfor p in sys.argv[1:]:\n    try: print(p, m.version(p))\n    except m.PackageNotFoundError: print(p, 'not-installed')"


# (the command, its mtime, the packages, the venv's site-packages stamp) -> what was found
_cache: dict[tuple[str, int, tuple[str, ...], tuple[int, ...] | None], str] = {}
_lock = threading.Lock()


def engine_version(launcher: list[str], packages: tuple[str, ...], refresh: bool = False) -> str:
    """`packages`' versions as the command's interpreter sees them ("vllm 0.19.0"), or the first
    line of a binary's `--version` when `packages` is empty. "unknown: why" when it cannot tell.
    From the cache unless `refresh` (or never asked): asking runs a subprocess."""
    executable = shutil.which(launcher[0]) if launcher else None
    if executable is None:
        return f"unknown: {launcher[0] if launcher else 'no command'} not found"
    try:
        stamp = _installed_stamp(executable) if packages else ()
        key = (executable, os.stat(executable).st_mtime_ns, tuple(packages), stamp)
    except OSError as exc:
        return f"unknown: {exc.strerror}"
    with _lock:
        known = _cache.get(key)
    if known is None or (refresh and stamp is None):
        known = (stamp and _venv_versions(executable, tuple(packages))) or _version(executable, tuple(packages))
        with _lock:
            _cache[key] = known
    return known


def _version(executable: str, packages: tuple[str, ...]) -> str:
    interpreter = _interpreter(executable)
    if packages and interpreter:
        argv = [interpreter, "-c", _ASK, *packages]
    elif packages:  # a wrapper script: asking it --version might start the engine itself
        return f"unknown: {Path(executable).name} is not a Python command"
    else:
        argv = [executable, "--version"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown: {type(exc).__name__}"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if packages and interpreter:
        return ", ".join(lines[:len(packages)]) or "unknown"
    return next((line for line in lines if "version" in line.lower()), lines[0] if lines else "unknown")[:200]


def _venv_versions(executable: str, packages: tuple[str, ...]) -> str | None:
    """`packages`' versions read from a venv's own dist-info folders, as importlib.metadata would
    say them, without starting its Python (40-100 ms); None when one is not found there (an
    egg-info install, say), so the caller asks the interpreter."""
    interpreter = _interpreter(executable)
    if interpreter is None:  # a stamp was found, so there is one
        return None
    found: dict[str, Path] = {}
    for folder in Path(interpreter).parent.parent.glob("lib/python3*/site-packages/*.dist-info"):
        found.setdefault(_normalised(folder.name.split("-", 1)[0]), folder)
    out = []
    for package in packages:
        dist = found.get(_normalised(package))
        try:
            metadata = (dist / "METADATA").read_text(errors="replace") if dist else ""
        except OSError:
            return None
        version = next((line[8:].strip() for line in metadata.splitlines() if line.startswith("Version:")), None)
        if version is None:
            return None
        out.append(f"{package} {version}")
    return ", ".join(out)


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()  # PEP 503's rule, as wheel names their folders


def _installed_stamp(executable: str) -> tuple[int, ...] | None:
    """The modification times of a venv's own site-packages folders, for the Python behind
    `executable`; None where they would not tell an upgrade (no venv, or one that includes the
    system's site-packages)."""
    interpreter = _interpreter(executable)
    if interpreter is None:
        return None
    venv = Path(interpreter).parent.parent  # unresolved: a venv's bin/python links to the base Python
    try:
        config = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return None
    if any(line.replace(" ", "").lower() == "include-system-site-packages=true" for line in config.splitlines()):
        return None
    folders = sorted(venv.glob("lib/python3*/site-packages"))
    return tuple(os.stat(folder).st_mtime_ns for folder in folders) or None


def _interpreter(executable: str) -> str | None:
    """The Python behind a command: itself, or the interpreter of a console script's shebang."""
    if Path(executable).name.startswith("python"):
        return executable
    try:
        with open(executable, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not (first.startswith(b"#!") and b"python" in first):
        return None
    words = first[2:].decode(errors="replace").split()
    if Path(words[0]).name == "env" and len(words) > 1:  # #!/usr/bin/env python3
        return shutil.which(words[-1])
    return words[0]
