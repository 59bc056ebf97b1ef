"""Every ledger call has a deadline (issue 39 finding 4): a database that answers nothing, as a
PostgreSQL server whose processes are stopped (SIGSTOP) does, makes a load answer 503
`ledger_unavailable` with Retry-After, /readyz name the ledger, and SIGTERM stop lessord, instead
of each waiting for the server without limit; a SQLite file locked by another connection fails
within the configured busy timeout. The waits below only turn a hang into a failure: they are
multiples of the configured deadlines that a lessord honouring them meets by far, and one
waiting on the server never does."""

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from lessor.daemon.config.schema import DevicesConfig, LedgerConfig
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.leases import Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.ledger.ledger_errors import LedgerUnavailable
from lessor.daemon.units import GiB
from lessor.engines.process import free_port

from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S

LEDGER = {"connect_timeout": 1.0, "statement_timeout": 1.0}
DEADLINES = LedgerConfig(**LEDGER).deadlines()
STOP_GRACE_S = 1.0
# Generous: lessord needs at most the deadline for a refused load, and stop_grace per engine plus
# three deadlines to stop.
ANSWER_WITHIN_S = 10 * DEADLINES.transaction_s
EXIT_WITHIN_S = 10 * (STOP_GRACE_S + 3 * DEADLINES.transaction_s)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def paused(server):
    """Every process of the test's PostgreSQL stopped, the postmaster first (then it forks no new
    backend): the kernel still accepts connections, and nothing answers. Resumed whatever happens."""
    postmaster = int((Path(server.data) / "postmaster.pid").read_text().split()[0])
    stopped = []
    try:
        os.kill(postmaster, signal.SIGSTOP)
        stopped.append(postmaster)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _parent(int(entry)) == postmaster:
                os.kill(int(entry), signal.SIGSTOP)
                stopped.append(int(entry))
        yield
    finally:
        for pid in reversed(stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def call(url: str, path: str, token: str, method: str = "GET", body=None, timeout: float = HANG_S):
    """(status, headers, JSON body) of one admin API call."""
    request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def until_ready(url: str, token: str) -> None:
    """Polls /readyz (each answer is quick) until 200: lessord notices on its reconciler's tick."""
    give_up = time.monotonic() + HANG_S
    while call(url, "/readyz", token)[0] != 200:
        assert time.monotonic() < give_up, "lessord never became ready again"
        time.sleep(0.1)


def lessord_config(tmp_path: Path, url: str) -> Path:
    return config_file(tmp_path, [standin_spec("m", tmp_path)], ledger={"url": url, **LEDGER},
                       reconciler={"interval": 0.2}, timeouts={"stop_grace": STOP_GRACE_S})


def test_a_hung_postgresql_refuses_a_load_with_503_and_readyz_names_the_ledger(tmp_path, pg_server):
    with running_lessord(lessord_config(tmp_path, pg_server.url)) as (_, url, _):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        assert call(url, "/admin/v1/models/m", token, "POST", {"action": "load"})[0] == 200
        with paused(pg_server):
            # The engine stops and its memory is free; the release is written once the server is back.
            status, _, model = call(url, "/admin/v1/models/m", token, "POST", {"action": "unload"},
                                    timeout=ANSWER_WITHIN_S)
            assert status == 200 and model["state"] == "unloaded", model
            status, headers, body = call(url, "/admin/v1/models/m", token, "POST", {"action": "load"},
                                         timeout=ANSWER_WITHIN_S)
            assert status == 503 and body["error"]["type"] == "ledger_unavailable", body
            assert int(headers["Retry-After"]) >= 1
            assert "did not answer within" in body["error"]["message"]
            status, _, ready = call(url, "/readyz", token, timeout=ANSWER_WITHIN_S)
            assert status == 503 and ready["reason"].startswith("the ledger is unavailable"), ready
            assert call(url, "/admin/v1/models/m", token, timeout=ANSWER_WITHIN_S)[2]["state"] == "unloaded"
        until_ready(url, token)
        status, _, model = call(url, "/admin/v1/models/m", token, "POST", {"action": "load"})
        assert status == 200 and model["state"] == "ready", model


def test_sigterm_stops_lessord_while_postgresql_is_hung_and_leaves_its_engine_to_adopt(tmp_path, pg_server):
    """The engine's record and leases are in the database; a stop lessord could not record would
    cost the model a load, so the engine runs on and the next lessord adopts it."""
    config = lessord_config(tmp_path, pg_server.url)
    with running_lessord(config) as (proc, url, _):
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        status, _, model = call(url, "/admin/v1/models/m", token, "POST", {"action": "load"})
        assert status == 200, model
        with paused(pg_server):
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(EXIT_WITHIN_S) == 0
            except subprocess.TimeoutExpired:
                raise AssertionError(f"lessord still runs {EXIT_WITHIN_S:g} s after SIGTERM with PostgreSQL "
                                     "stopped") from None
    try:
        os.kill(model["pid"], 0)  # still running, after lessord's exit
        with running_lessord(config) as (_, url, _):
            token = (tmp_path / "state" / "admin.token").read_text().strip()
            until_ready(url, token)
            adopted = call(url, "/admin/v1/models/m", token)[2]
            assert adopted["state"] == "ready" and adopted["pid"] == model["pid"], adopted
    finally:
        try:
            os.killpg(model["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_lessord_started_against_a_hung_postgresql_exits_for_systemd_to_try_again(tmp_path, pg_server):
    """Exit 3 means a damaged ledger, which systemd does not restart (RestartPreventExitStatus);
    a database that does not answer yet is 1: tried again."""
    config = lessord_config(tmp_path, pg_server.url)
    with paused(pg_server):
        proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config), "--sim", "--admin-listen",
                                 f"127.0.0.1:{free_port()}", "--router-listen", f"127.0.0.1:{free_port()}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            said, _ = proc.communicate(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"lessord neither started nor gave up within {EXIT_WITHIN_S:g} s") from None
    assert proc.returncode == 1 and "no answer within" in said and "Traceback" not in said, said


async def test_a_sqlite_ledger_locked_by_another_connection_fails_within_its_busy_timeout(tmp_path):
    devices = DevicesConfig.model_validate({"probe": "sim", "headroom": 0, "simulated": [{"name": "sim16", "total": "16GiB"}]})
    path = tmp_path / "ledger.db"
    deadlines = LedgerConfig(connect_timeout=0.2, statement_timeout=0.2).deadlines()
    ledger = await Ledger.open(f"sqlite+aiosqlite:///{path}", SimProbe(devices.simulated, 0), devices,
                               deadlines=deadlines)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        async with ledger.database.connect() as conn:  # the configured wait, not sqlite3's 5 s
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 200
        other.execute("BEGIN IMMEDIATE")  # another process's write, held until the grant has its answer
        with pytest.raises(LedgerUnavailable, match="locked"):
            await ledger.grant("m", [LeaseWant("gpu0", LeaseKind.KV, GiB)], "a1")
        assert ledger.leases() == () and "locked" in ledger.unavailable
        other.execute("ROLLBACK")
        assert await ledger.flush() == 0 and ledger.unavailable is None  # the unconfirmed grant marked released
        assert isinstance(await ledger.grant("m", [LeaseWant("gpu0", LeaseKind.KV, GiB)], "a2"), Granted)
    finally:
        other.close()
        await ledger.close()
