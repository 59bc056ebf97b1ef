"""A private PostgreSQL cluster on a free loopback port, for the benchmarks (ledger_bench.py) and the
tests (tests/support/postgres.py and the fixtures of tests/conftest.py wrap it). It lives here, not
in tests/: bench imports nothing of tests/, while tests already import bench (they test it), and
it is no part of the installed package (lessord never starts a database)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lessor.engines.process import free_port


def pg_bindir() -> str | None:
    found = shutil.which("initdb")
    if found:
        return str(Path(os.path.realpath(found)).parent)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(candidates[-1]).parent) if candidates else None


class PgServer:
    """A private PostgreSQL server: its URL, and a restart as an operator's `pg_ctl restart` does it."""

    def __init__(self, bindir: str, run_as: list[str], data: str, log: Path, port: int, sockets: Path) -> None:
        self.bindir, self.run_as, self.data, self.log, self.port, self.sockets = bindir, run_as, data, log, port, sockets
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(self.run_as + [f"{self.bindir}/pg_ctl", "-D", self.data, "-l", str(self.log), "-w", "-o",
                                      f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off",
                                      *args], check=True, capture_output=True)

    def restart(self) -> None:
        self.pg_ctl("-m", "fast", "restart")


@contextmanager
def postgres_server(bindir: str) -> Iterator[PgServer]:
    """initdb refuses root, so as root the cluster runs as `postgres`."""
    user = "postgres" if os.geteuid() == 0 else None
    datadir = Path(tempfile.mkdtemp(prefix="lessor-pg-"))
    if user:
        ent = pwd.getpwnam(user)
        os.chown(datadir, ent.pw_uid, ent.pw_gid)
    run_as = ["runuser", "-u", user, "--"] if user else []
    data = str(datadir / "data")
    subprocess.run(run_as + [f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    server = PgServer(bindir, run_as, data, datadir / "log", free_port(), datadir)
    server.pg_ctl("start")
    try:
        yield server
    finally:
        subprocess.run(run_as + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(datadir, ignore_errors=True)


@contextmanager
def postgres_cluster(bindir: str) -> Iterator[str]:
    """Yields a postgresql+asyncpg URL of a private server."""
    with postgres_server(bindir) as server:
        yield server.url
