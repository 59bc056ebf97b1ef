"""PostgreSQL for the tests: a private server from bench/pgcluster.py (the one copy of the starter:
bench/ledger_bench.py runs it too, and bench imports nothing of tests/), or a skip that says how
to install it, a failure where CI requires it (LESSOR_REQUIRE_POSTGRES)."""

import os

import pytest

from bench.pgcluster import pg_bindir


def server_bindir() -> str:
    """The folder of initdb and pg_ctl; skips (or fails, under LESSOR_REQUIRE_POSTGRES) without one."""
    bindir = pg_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does)"
        if os.environ.get("LESSOR_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    return bindir
