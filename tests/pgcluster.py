"""A private PostgreSQL cluster on a free loopback port, for the tests and the benchmarks."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def pg_bindir() -> str | None:
    found = shutil.which("initdb")
    if found:
        return str(Path(os.path.realpath(found)).parent)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(candidates[-1]).parent) if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_cluster(bindir: str) -> Iterator[str]:
    """Yields a postgresql+asyncpg URL; initdb refuses root, so as root the cluster runs as `postgres`."""
    user = "postgres" if os.geteuid() == 0 else None
    datadir = Path(tempfile.mkdtemp(prefix="lessor-pg-"))
    if user:
        ent = pwd.getpwnam(user)
        os.chown(datadir, ent.pw_uid, ent.pw_gid)
    port = free_port()
    run_as = ["runuser", "-u", user, "--"] if user else []
    data = str(datadir / "data")
    subprocess.run(run_as + [f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", data, "-l", str(datadir / "log"), "-w", "-o",
                             f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(datadir, ignore_errors=True)
