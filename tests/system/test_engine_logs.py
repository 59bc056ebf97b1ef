"""Engine logs with a size limit (issue 39, finding 6): a stand-in wrote 1 GiB in 1.7 s into its
log, the disk filled and every load got 503. The engine's output goes through a pipe to a log pump
(engines/enginelog.py) that rotates by size, keeps the folder under a total and drops output
rather than take the disk's last megabytes. Real processes writing as fast as they can."""

import asyncio
import os
import sys

import pytest

from lessor.engines import enginelog
from lessor.engines.enginelog import LogLimits
from lessor.engines.process import STARTING, EngineProcess

from ..support.clients import Admin
from ..support.configs import config_file, standin_spec
from ..support.lessord import running_lessord
from ..support.paths import STANDIN
from ..support.waiting import HANG_S, NEVER

MiB = 1 << 20


WRITER = """
import sys, time
megabytes, then, sleep = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "sleep"
line = b"x" * 1000 + b"\\n"
for i in range(megabytes * 1048576 // 1010 + 1):
    sys.stdout.buffer.write(b"%08d " % i + line)
sys.stdout.buffer.write(then.encode() + b"\\n" if then else b"")
sys.stdout.flush()
if sleep:
    time.sleep(600)
"""


def writer(megabytes: int, then: str = "", sleep: bool = False) -> list[str]:
    """A child that writes `megabytes` MiB of numbered lines to stdout as fast as it can."""
    return [sys.executable, "-c", f"exec({WRITER!r})", str(megabytes), then, "sleep" if sleep else "-"]


def logs_size(folder) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(folder))


@pytest.fixture
def limits(monkeypatch):
    def set_to(**fields):
        monkeypatch.setattr(enginelog, "limits", LogLimits(**fields))
    return set_to


async def ended(proc: EngineProcess) -> None:
    """The engine exited and its log pump wrote its last byte (an exit waits for the pump only so
    long; a busy machine may take longer)."""
    await asyncio.wait_for(proc.exited.wait(), HANG_S)
    if proc._pump is not None:
        await asyncio.wait_for(asyncio.shield(proc._pump), HANG_S)


async def test_a_fast_writer_stays_under_its_cap_and_its_last_lines_are_kept(tmp_path, limits):
    limits(per_model=MiB, files_per_model=4, total=64 * MiB, keep_free=0)
    log_path = tmp_path / "logs" / "m.log"
    proc = await EngineProcess.spawn(writer(64, then="the last line"), dict(os.environ), log_path)
    await ended(proc)
    assert logs_size(log_path.parent) <= MiB  # 64 MiB written; before, all of it stayed
    assert sorted(os.listdir(log_path.parent)) == ["m.log", "m.log.1", "m.log.2", "m.log.3"]
    assert proc.tail(1) == ["the last line"]  # the pump had written it when the exit was seen
    for name in os.listdir(log_path.parent):  # every file starts with lessor's argv line
        assert (log_path.parent / name).read_text().startswith(STARTING)


async def test_the_next_start_shifts_the_last_runs_logs(tmp_path, limits):
    limits(per_model=MiB, files_per_model=3, total=64 * MiB, keep_free=0)
    log_path = tmp_path / "logs" / "m.log"
    for run in ("first", "second"):
        proc = await EngineProcess.spawn(writer(0, then=f"{run} run"), dict(os.environ), log_path)
        await ended(proc)
    assert log_path.read_text().splitlines()[-1] == "second run"
    assert (tmp_path / "logs" / "m.log.1").read_text().splitlines()[-1] == "first run"


async def test_all_models_logs_stay_under_the_total(tmp_path, limits):
    limits(per_model=4 * MiB, files_per_model=4, total=5 * MiB, keep_free=0)
    folder = tmp_path / "logs"
    procs = [await EngineProcess.spawn(writer(16), dict(os.environ), folder / f"m{n}.log") for n in range(3)]
    for proc in procs:
        await ended(proc)
    # Current files are never removed (each is a model's only record): the total holds up to them.
    current = sum((folder / f"m{n}.log").stat().st_size for n in range(3))
    assert logs_size(folder) <= max(5 * MiB, current)
    assert all((folder / f"m{n}.log").exists() for n in range(3))


async def test_output_is_dropped_rather_than_take_the_disks_last_megabytes(tmp_path, limits):
    free = enginelog.free_bytes(tmp_path)
    limits(per_model=64 * MiB, files_per_model=4, total=1 << 30,
           keep_free=free + (1 << 40))  # more than this disk has free: nothing may be written
    log_path = tmp_path / "logs" / "m.log"
    proc = await EngineProcess.spawn(writer(4, then="the last line"), dict(os.environ), log_path)
    await ended(proc)
    lines = log_path.read_text().splitlines()
    assert lines[0].startswith(STARTING) and lines[-1].startswith("# lessor: ")
    assert "bytes of engine output dropped" in lines[-1] and "engine_logs.keep_free" in lines[-1]
    assert len(lines) <= 3


async def test_a_stop_may_drop_the_models_older_logs(tmp_path, limits):
    limits(per_model=MiB, files_per_model=4, total=64 * MiB, keep_free=0, drop_on_stop=True)
    log_path = tmp_path / "logs" / "m.log"
    proc = await EngineProcess.spawn(writer(4, sleep=True), dict(os.environ), log_path)
    await asyncio.wait_for(proc.wait_until(lambda: (log_path.parent / "m.log.3").exists(), "writing", HANG_S),
                           HANG_S)
    await proc.stop(1)
    assert sorted(os.listdir(log_path.parent)) == ["m.log"]  # the last log stays for `lessor logs`


async def test_a_ready_line_written_after_a_rotation_still_wakes_the_probe(tmp_path, limits):
    limits(per_model=MiB, files_per_model=2, total=64 * MiB, keep_free=0)
    log_path = tmp_path / "logs" / "m.log"
    go = tmp_path / "go"
    os.mkfifo(go)
    # Loading: the engine waits for the test, then writes enough to rotate its log, then its ready line.
    # The marker is put together in the child: the argv line at the head of the log must not hold it.
    proc = await EngineProcess.spawn([sys.executable, "-c", f"import sys; open({str(go)!r}).read(); "
                                      f"sys.argv[2] = 'READY-' + 'MARKER'; exec({WRITER!r})", "2", "-", "sleep"],
                                     dict(os.environ), log_path)
    checks = []

    def check() -> bool:
        checks.append(True)
        return len(checks) == 2  # the first probe finds it loading; only the ready line wakes the second
    try:
        waiting = asyncio.ensure_future(proc.wait_until(check, "loading", HANG_S, ["READY-MARKER"], NEVER))
        await asyncio.wait_for(_until(lambda: len(checks) == 1), HANG_S)
        await asyncio.to_thread(lambda: open(go, "w").close())
        await asyncio.wait_for(waiting, HANG_S)  # hung before: the watch stayed on the rotated file
        assert len(checks) == 2 and proc.ready_line_at is not None  # woken by the line, not a timed probe
        assert (tmp_path / "logs" / "m.log.1").exists()
    finally:
        await proc.stop(1)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def test_a_tail_right_after_a_rotation_reads_on_into_the_older_file(tmp_path, limits):
    """`lessor logs` (and `logs -f`, which compares windows) sees one log across a rotation."""
    limits(per_model=MiB, files_per_model=2, total=64 * MiB, keep_free=0)
    log_path = tmp_path / "logs" / "m.log"
    proc = await EngineProcess.spawn(writer(1, then="the last line"), dict(os.environ), log_path)
    await ended(proc)
    assert log_path.read_text().splitlines()[1] == "# lessor: continued: the older lines are in m.log.1"
    window = proc.tail(50)
    assert len(window) == 50 and window[-1] == "the last line" and not any(line.startswith("# lessor") for line in window)
    numbers = [int(line.split()[0]) for line in window[:-1]]
    assert numbers == list(range(numbers[0], numbers[0] + 49))  # no gap, nothing twice


SPAM_THEN_STANDIN = ("import runpy, sys\nline = b'y' * 1000 + b'\\n'\nfor i in range(64 * 1024):\n"
                     "    sys.stdout.buffer.write(line)\nsys.stdout.flush()\n"
                     "sys.argv[0] = %r\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_lessord_keeps_a_chatty_engines_logs_under_the_cap_and_drops_them_at_unload(tmp_path):
    """As the issue found it, with lessord: an engine writes 64 MiB to its log as fast as it can
    (then serves); the logs folder stays within engine_logs, and an unload drops the older files."""
    spec = standin_spec("m", tmp_path)
    spec["engine"]["command"] = [sys.executable, "-c", SPAM_THEN_STANDIN % STANDIN]
    config = config_file(tmp_path, [spec], engine_logs={"per_model": "2MiB", "files_per_model": 4,
                                                        "on_stop": "drop_older"})
    folder = tmp_path / "state" / "logs"
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("m")[0] == 200
        assert logs_size(folder) <= 2 * MiB  # 64 MiB written
        assert sorted(os.listdir(folder)) == ["m.log", "m.log.1", "m.log.2", "m.log.3"]
        status, text = admin.call("GET", "/admin/v1/models/m/log?lines=5")
        assert status == 200 and len(text.splitlines()) == 5
        assert admin.call("POST", "/admin/v1/models/m", {"action": "unload"})[0] == 200
        assert sorted(os.listdir(folder)) == ["m.log"]  # the last log stays for `lessor logs`


def test_a_rotation_splits_no_line_however_the_pipe_cut_it(tmp_path):
    """The pipe hands the pump chunks cut anywhere in a line; a rotation due mid-line waits for
    the line's end (within per_file), so every file holds whole lines and `lessor logs` reads on
    across it (a busy machine's reads cut a line at a rotation, and a tail showed half of it)."""
    path = tmp_path / "m.log"
    pump = enginelog.Pump(path, per_file=64 << 10, files=50, total=1 << 30, keep_free=0)
    data = b"".join(b"%08d " % i + b"x" * 200 + b"\n" for i in range(2000))
    for at in range(0, len(data), 97):  # chunks ending mid-line, as a busy pipe's reads do
        pump.take(data[at:at + 97])
    os.close(pump.fd)
    files = [path, *sorted(tmp_path.glob("m.log.*"))]
    assert len(files) > 5 and all(f.stat().st_size <= 64 << 10 for f in files)
    lines = [line for f in files for line in f.read_bytes().splitlines() if not line.startswith(b"# lessor")]
    assert len(lines) == 2000 and all(len(line) == 209 and line[:8].isdigit() for line in lines)
