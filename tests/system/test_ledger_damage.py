"""A damaged ledger is never opened silently empty. lessord (a real process) loads a stand-in engine,
is killed with SIGKILL, and its ledger is damaged as a disk, an operator or a bad restore would:
truncated to 0 bytes (its WAL kept or deleted), its WAL overwritten with garbage, its files deleted,
pages overwritten after a checkpoint, the file cut in half, a directory in its place. Each start
refuses in one line that names the file and the damage, exits non-zero without a traceback, and
leaves the engine running; `--recover-from-engines` then rebuilds its leases and the start adopts
it (same pid, same lease ids)."""

import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.leases import EnginePhase, EngineRecord, Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.ledger.ledger_errors import LedgerDamaged
from lessor.daemon.ledger.record import RECORD_FILE, LedgerRecord
from lessor.daemon.ledger.recovery import RECOVER, recover
from lessor.daemon.units import GiB
from lessor.engines.process import free_port, process_identity

from ..support.clients import Admin
from ..support.configs import config_file, sim_config, standin_spec, torch_model
from ..support.ledger import drop_ledger_tables
from ..support.lessord import kill_9, running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S


def files(state: Path) -> tuple[Path, Path, Path]:
    db = state / "ledger.db"
    return db, db.with_name("ledger.db-wal"), db.with_name("ledger.db-shm")


def contents(state: Path) -> list[bytes]:
    """The file and its WAL (the -shm file is an index SQLite rebuilds from them)."""
    return [path.read_bytes() if path.is_file() else b"" for path in files(state)[:2]]


def checkpoint(state: Path) -> None:
    """Everything of the WAL into the main file (lessord is down: nobody else has it open)."""
    connection = sqlite3.connect(files(state)[0])
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def truncate_wal_kept(state):
    os.truncate(files(state)[0], 0)


def truncate_wal_deleted(state):
    db, wal, shm = files(state)
    os.truncate(db, 0)
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)


def wal_garbage(state):
    wal = files(state)[1]
    assert wal.stat().st_size > 0, "the commits are in the WAL (nothing checkpointed them)"
    wal.write_bytes(random.Random(1).randbytes(wal.stat().st_size))


def deleted(state):
    for path in files(state):
        path.unlink(missing_ok=True)


def pages_overwritten(state):
    checkpoint(state)
    db = files(state)[0]
    pages = db.stat().st_size // 4096
    with open(db, "r+b") as f:  # the second half: rows and indexes; the schema on page 1 still reads
        f.seek(pages // 2 * 4096)
        f.write(random.Random(2).randbytes((pages - pages // 2) * 4096))


def half_truncated(state):
    checkpoint(state)
    db = files(state)[0]
    os.truncate(db, db.stat().st_size // 2)


def a_directory(state):
    deleted(state)
    files(state)[0].mkdir()


DAMAGE = {truncate_wal_kept: r"is empty \(0 bytes\)", truncate_wal_deleted: r"is empty \(0 bytes\)",
          wal_garbage: "commits were lost", deleted: "is missing", pages_overwritten: "integrity check|malformed",
          half_truncated: "malformed|integrity check", a_directory: "is a directory"}


def lessord_once(config: Path, *args: str) -> tuple[int, str]:
    """lessord run to its exit (a refused start, or a recovery): its status and what it said."""
    proc = subprocess.run([str(BIN / "lessord"), "--config", str(config), "--sim", "--admin-listen",
                           f"127.0.0.1:{free_port()}", "--router-listen", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=HANG_S)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def recovered(config: Path, flag: str) -> str:
    status, said = lessord_once(config, flag)
    assert status == 0 and "Traceback" not in said, said
    return said


def start_refused(config: Path) -> str:
    """lessord started on the damaged ledger: what it said, once it exited."""
    status, said = lessord_once(config)
    assert status == 3, said
    return said


def loaded_and_killed(tmp_path) -> tuple[Path, dict, list]:
    config = config_file(tmp_path, [standin_spec("m", tmp_path)])
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("m")[0] == 200
        engine, leases = admin.model("m"), admin.leases()
        kill_9(proc)
    return config, engine, leases


@pytest.mark.parametrize("damage", list(DAMAGE), ids=lambda d: d.__name__)
def test_a_damaged_ledger_is_refused_in_one_line_and_recovered_from_the_running_engine(tmp_path, damage):
    config, engine, leases = loaded_and_killed(tmp_path)
    damage(tmp_path / "state")
    before = contents(tmp_path / "state")

    said = start_refused(config)
    assert len(said.splitlines()) == 1 and "Traceback" not in said, said
    db = str(files(tmp_path / "state")[0])
    assert said.startswith(f"lessord: the ledger {db} ") and re.search(DAMAGE[damage], said), said
    assert "--recover-from-engines" in said and "--start-fresh" in said
    assert process_identity(engine["pid"]) is not None, "the engine is left running"
    assert start_refused(config) == said, "refused again, the same way"
    assert contents(tmp_path / "state") == before, "a refused ledger is left as found"

    log = recovered(config, "--recover-from-engines")
    assert "recovered m (pid" in log and "set aside in" in log and "it adopts the recovered engines" in log, log
    assert process_identity(engine["pid"]) is not None
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        after = admin.model("m")
        assert after["state"] == "ready" and after["pid"] == engine["pid"], after
        assert admin.leases() == leases, "the same leases, same ids: nothing granted twice"
    aside = next((tmp_path / "state").glob("ledger-damaged-*"))
    assert (aside / RECORD_FILE).exists(), "the evidence is kept"


def test_start_fresh_empties_the_ledger_and_stops_the_engines_it_forgot(tmp_path):
    config, engine, _ = loaded_and_killed(tmp_path)
    deleted(tmp_path / "state")
    start_refused(config)
    log = recovered(config, "--start-fresh")
    assert "is not in the record; the next start stops it as a stray" in log, log
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.model("m")["state"] == "unloaded" and admin.leases() == []
        assert process_identity(engine["pid"]) is None, "stopped as a stray"


def test_a_ledger_lost_with_its_record_is_refused_while_its_engines_run(tmp_path):
    config, engine, _ = loaded_and_killed(tmp_path)
    deleted(tmp_path / "state")
    (tmp_path / "state" / RECORD_FILE).unlink()
    said = start_refused(config)
    assert len(said.splitlines()) == 1 and "is missing and its record" in said, said
    assert f"1 engine process(es) of this state folder run: pid {engine['pid']}" in said
    log = recovered(config, "--recover-from-engines")
    assert "the record names no engine: nothing could be recovered" in log
    assert f"not identified: pid {engine['pid']} runs for" in log, log
    with running_lessord(config) as (_, url, _):
        assert Admin(url, tmp_path / "state").leases() == []
        assert process_identity(engine["pid"]) is None


def test_recovery_on_a_sound_ledger_changes_nothing(tmp_path):
    config, engine, leases = loaded_and_killed(tmp_path)
    assert "the ledger is sound, nothing to do" in recovered(config, "--recover-from-engines")
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.model("m")["pid"] == engine["pid"] and admin.leases() == leases
    assert not list((tmp_path / "state").glob("ledger-damaged-*"))
    os.kill(engine["pid"], signal.SIGKILL)


def _ledger(url, config, record):
    return Ledger.open(url, SimProbe(config.devices.simulated, 0), config.devices, record=record)


async def test_a_record_one_commit_behind_is_sound_and_a_lag_after_a_reboot_only_warned(tmp_path, caplog):
    config = sim_config(tmp_path, [torch_model("a")])
    record = LedgerRecord.in_state_dir(config.state_dir)
    ledger = await _ledger(config.ledger_url(), config, record)
    assert isinstance(await ledger.grant("a", [LeaseWant("gpu0", LeaseKind.WEIGHTS, GiB)], "t1"), Granted)
    generation = ledger.generation
    assert record.read().generation == generation and record.read().leases == 1
    await ledger.release_attempt("t1", "done")
    stale = record.read()
    record.path.write_text(record.path.read_text().replace(f'"generation": {generation + 1}',
                                                             f'"generation": {generation}'))
    await ledger.close()
    # lessord killed between the commit and the record: the database is ahead, which is sound.
    ledger = await _ledger(config.ledger_url(), config, record)
    assert record.read().generation == generation + 1 == stale.generation
    await ledger.grant("a", [LeaseWant("gpu0", LeaseKind.WEIGHTS, GiB)], "t2")
    await ledger.close()

    ahead = record.path.read_text().replace(f'"generation": {generation + 2}', f'"generation": {generation + 9}')
    record.path.write_text(ahead)
    with pytest.raises(LedgerDamaged, match=f"is at generation {generation + 2}: commits were lost"):
        await _ledger(config.ledger_url(), config, record)
    record.path.write_text(ahead.replace(record.read().boot_id, "another-boot"))
    ledger = await _ledger(config.ledger_url(), config, record)  # the WAL's lazy sync, by design
    assert "before the machine restarted were lost" in caplog.text and len(ledger.leases()) == 1
    await ledger.close()


def test_quick_check_runs_at_open(tmp_path):
    config = sim_config(tmp_path, [torch_model("a")])
    asyncio.run(_open_close(config))
    pages_overwritten(Path(config.state_dir))
    with pytest.raises(LedgerDamaged, match="fails SQLite's integrity check"):
        asyncio.run(_open_close(config))


async def _open_close(config):
    ledger = await _ledger(config.ledger_url(), config, LedgerRecord.in_state_dir(config.state_dir))
    await ledger.close()


async def test_no_ledger_and_no_record_is_a_first_start_unless_engines_of_the_state_folder_run(tmp_path, engine_of):
    config = sim_config(tmp_path, [torch_model("a")])
    await _open_close(config)  # a first start
    deleted(Path(config.state_dir))
    LedgerRecord.in_state_dir(config.state_dir).remove()
    engine = engine_of()
    with pytest.raises(LedgerDamaged, match=f"is missing and its record .* is missing too .*pid {engine.pid}"):
        await _open_close(config)


async def test_a_ledger_from_before_the_record_opens_while_its_engines_run(tmp_path, engine_of):
    """An upgrade: schema version 2, no generation, no record, engines running: adopted as usual."""
    config = sim_config(tmp_path, [torch_model("a")])
    await _open_close(config)
    LedgerRecord.in_state_dir(config.state_dir).remove()
    connection = sqlite3.connect(files(Path(config.state_dir))[0])
    connection.execute("DROP TABLE lessor_generation")
    connection.execute("UPDATE lessor_schema SET version = 2")
    connection.commit()
    connection.close()
    engine_of()
    ledger = await _ledger(config.ledger_url(), config, LedgerRecord.in_state_dir(config.state_dir))
    assert ledger.generation == 0 and LedgerRecord.in_state_dir(config.state_dir).read().generation == 0
    await ledger.close()


async def test_rows_that_do_not_read_are_damage_not_a_type_error(tmp_path):
    config = sim_config(tmp_path, [torch_model("a")])
    await _open_close(config)
    connection = sqlite3.connect(files(Path(config.state_dir))[0])
    connection.execute("INSERT INTO lessor_engines VALUES ('a', 't1', 1, 'x', 1, 'half-loaded', '{}', 0, 0)")
    connection.commit()
    connection.close()
    with pytest.raises(LedgerDamaged, match=r"ledger\.db holds rows that do not read \('half-loaded' is not a valid"):
        await _open_close(config)


@pytest.fixture
def engine_of(tmp_path):
    """Starts a process that passes for an engine of this state folder (its environment says so)."""
    started = []

    def start() -> subprocess.Popen:
        state = (tmp_path / "state").absolute()
        proc = subprocess.Popen(["sleep", "600"], start_new_session=True,
                                env={**os.environ, "LESSOR_STATE_DIR": str(state), "LESSOR_ATTEMPT": "t1"})
        started.append(proc)
        deadline = time.monotonic() + HANG_S
        while b"LESSOR_ATTEMPT=" not in Path(f"/proc/{proc.pid}/environ").read_bytes():  # until exec has finished
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


async def test_a_database_behind_its_record_is_refused_and_rebuilt_from_the_engine_that_runs(tmp_path, ledger_url,
                                                                                             engine_of):
    """SQLite at a URL of its own, and PostgreSQL: a database recreated (or restored from before)
    under the engines is behind its record; recovery writes back the engine and its lease."""
    config = sim_config(tmp_path, [torch_model("a")], ledger={"url": ledger_url})
    record = LedgerRecord.in_state_dir(config.state_dir)
    ledger = await _ledger(ledger_url, config, record)
    granted = await ledger.grant("a", [LeaseWant("gpu0", LeaseKind.WEIGHTS, GiB)], "t1")
    engine = engine_of()
    pid = engine.pid
    await ledger.record_engine(EngineRecord("a", "t1", pid, process_identity(pid), 8123, EnginePhase.READY,
                                            {"kv": 1}, 64, 1.0))
    await ledger.close()
    await drop_ledger_tables(ledger_url)

    with pytest.raises(LedgerDamaged, match="holds no ledger tables: commits were lost .* engines a \\(pid"):
        await _ledger(ledger_url, config, record)
    report = await recover(config, RECOVER)
    assert report.recovered == [f"a (pid {pid}, port 8123, 1 lease(s))"] and report.unidentified == [], report
    ledger = await _ledger(ledger_url, config, record)
    try:
        assert ledger.engines()["a"].params == {"kv": 1} and ledger.engines()["a"].pid == pid
        assert [lease.id for lease in ledger.leases()] == [granted.leases[0].id]
    finally:
        await ledger.close()
    assert engine.poll() is None
