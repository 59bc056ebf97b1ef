"""Workers that escape their engine's process group (a child calls setsid() and forks again, then
exits: Ray-style daemonised workers) are stopped with their engine: at unload, when lessord stops,
and at a restart where their engine is gone or was never recorded; an adopted engine's workers
run on. Real lessord, real stand-in engines (tests/support/standin_engine.py, LESSOR_STANDIN_ESCAPE)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from lessor.engines.process import EngineProcess, process_identity
from lessor.engines.strays import find_strays, stop_strays

from ..support.clients import Admin
from ..support.configs import config_file, standin_spec
from ..support.lessord import kill_9, running_lessord
from ..support.paths import ROOT, STANDIN
from ..support.waiting import HANG_S, until_sync


def escaping(name: str, tmp_path: Path, **env: str) -> dict:
    spec = standin_spec(name, tmp_path)
    spec["engine"]["env"].update({"LESSOR_STANDIN_ESCAPE": str(tmp_path / f"{name}.worker"), **env})
    return spec


class Worker:
    """The escaped grandchild of `name`'s engine, as it was when its engine became ready."""

    def __init__(self, tmp_path: Path, name: str, engine_pid: int) -> None:
        self.pid = int((tmp_path / f"{name}.worker").read_text())  # written before the engine serves
        self.identity = process_identity(self.pid)
        assert self.identity is not None
        assert os.getpgid(self.pid) != engine_pid, "it left its engine's process group"
        assert os.getsid(self.pid) != os.getsid(engine_pid), "and its session"

    def runs(self) -> bool:
        """That very process still runs (a zombie does not: it holds no memory)."""
        return process_identity(self.pid) == self.identity

    def stat(self) -> tuple[str, int] | None:
        """Its state and parent now (a zombie too); None once it is reaped."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0], int(fields[1])

    def kill(self) -> None:
        if self.runs():  # what a failed test leaves behind
            os.kill(self.pid, signal.SIGKILL)


def load(admin: Admin, tmp_path: Path, name: str) -> tuple[int, Worker]:
    status, body = admin.load(name)
    assert status == 200, body
    pid = admin.model(name)["pid"]
    return pid, Worker(tmp_path, name, pid)


def unload(admin: Admin, name: str) -> None:
    status, body = admin.call("POST", f"/admin/v1/models/{name}", {"action": "unload"})
    assert status == 200, body


def test_unload_stops_the_worker_that_left_the_group(tmp_path):
    config = config_file(tmp_path, [escaping("qa", tmp_path)])
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        engine, worker = load(admin, tmp_path, "qa")
        try:
            # lessord is the child subreaper: the orphaned worker became its child, not init's.
            assert worker.stat()[1] == proc.pid
            unload(admin, "qa")  # answers once the engine's processes are gone
            assert admin.model("qa")["state"] == "unloaded" and admin.leases() == []
            assert process_identity(engine) is None
            assert not worker.runs(), "the escaped worker outlived its engine's unload"
            assert worker.stat() != ("Z", proc.pid), "lessord reaps the orphan it stopped"
        finally:
            worker.kill()


def test_a_worker_that_ignores_sigterm_gets_sigkill_within_the_stop_grace(tmp_path):
    config = config_file(tmp_path, [escaping("qa", tmp_path, LESSOR_STANDIN_ESCAPE_IGNORE_TERM="1")],
                         timeouts={"stop_grace": 0.2})
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        _, worker = load(admin, tmp_path, "qa")
        try:
            unload(admin, "qa")
            assert not worker.runs(), "the escaped worker ignored SIGTERM and was never killed"
        finally:
            worker.kill()


def test_an_engine_that_dies_takes_its_escaped_worker_with_it(tmp_path):
    config = config_file(tmp_path, [escaping("qa", tmp_path)])
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        engine, worker = load(admin, tmp_path, "qa")
        try:
            os.kill(engine, signal.SIGKILL)  # a crash while serving: restart.policy never
            until_sync(lambda: admin.model("qa")["state"] == "failed", "the crash noticed")  # after its processes are stopped
            assert admin.leases() == []
            assert not worker.runs(), "the escaped worker outlived its engine's crash"
        finally:
            worker.kill()


def test_lessord_stopping_stops_the_worker_that_left_the_group(tmp_path):
    config = config_file(tmp_path, [escaping("qa", tmp_path)])
    with running_lessord(config) as (proc, url, _):
        _, worker = load(Admin(url, tmp_path / "state"), tmp_path, "qa")
        try:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(HANG_S) == 0
            assert not worker.runs(), "the escaped worker outlived lessord's stop"
        finally:
            worker.kill()


def test_a_restart_keeps_an_adopted_engines_worker_and_stops_a_gone_engines(tmp_path):
    config = config_file(tmp_path, [escaping("kept", tmp_path), escaping("gone", tmp_path)])
    workers = []
    try:
        with running_lessord(config) as (proc, url, _):
            admin = Admin(url, tmp_path / "state")
            kept_engine, kept = load(admin, tmp_path, "kept")
            gone_engine, orphan = load(admin, tmp_path, "gone")
            workers += [kept, orphan]
            kill_9(proc)
        os.kill(gone_engine, signal.SIGKILL)  # its engine dies while no lessord runs; its worker does not
        until_sync(lambda: process_identity(gone_engine) is None, "the engine's end")
        assert kept.runs() and orphan.runs()

        with running_lessord(config) as (proc, url, _):  # ready once the start's settling is done
            admin = Admin(url, tmp_path / "state")
            assert admin.model("kept")["state"] == "ready" and admin.model("kept")["pid"] == kept_engine
            assert admin.model("gone")["state"] == "unloaded"
            assert kept.runs(), "an adopted engine keeps its worker"
            assert not orphan.runs(), "the worker of an engine gone during the restart outlived it"
            unload(admin, "kept")  # the adopted engine's worker is known by the marker its leader carries
            assert not kept.runs(), "the adopted engine's escaped worker outlived its unload"
    finally:
        for worker in workers:
            worker.kill()


async def test_a_stray_worker_outside_any_group_is_found_and_stopped(tmp_path):
    """A worker whose engine lessord never recorded (it died between the start and the record):
    not the leader of a group, so not found by a look at group leaders."""
    pid_file = tmp_path / "stray.worker"
    env = {**os.environ, "LESSOR_STATE_DIR": str(tmp_path), "LESSOR_ATTEMPT": "lost"}
    script = f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'support')!r}); import standin_engine; " \
             f"standin_engine.escape({str(pid_file)!r})"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=HANG_S)
    worker = int(pid_file.read_text())
    identity = process_identity(worker)
    try:
        assert os.getpgid(worker) != worker, "not a group leader"
        assert find_strays(tmp_path, {"lost"}) == [], "a kept attempt's process is kept"
        assert await stop_strays(tmp_path, set(), grace_s=HANG_S) == [worker]
        assert process_identity(worker) != identity
    finally:
        if process_identity(worker) == identity:
            os.kill(worker, signal.SIGKILL)


async def test_an_engine_process_stop_kills_its_escaped_worker(tmp_path):
    """At the process level: the worker holds the log's pipe and ignores SIGTERM; the stop still
    ends within its grace plus SIGKILL, and the worker is gone."""
    pid_file = tmp_path / "e.worker"
    env = {**os.environ, "LESSOR_STATE_DIR": str(tmp_path), "LESSOR_ATTEMPT": "a1",
           "LESSOR_STANDIN_ESCAPE": str(pid_file), "LESSOR_STANDIN_ESCAPE_IGNORE_TERM": "1"}
    proc = await EngineProcess.spawn([sys.executable, STANDIN, "--port", "0"],
                                     env, tmp_path / "e.log")
    await proc.wait_until(pid_file.exists, "escaping", HANG_S)
    worker = int(pid_file.read_text())
    identity = process_identity(worker)
    try:
        await proc.stop(grace_s=0.1)
        assert process_identity(worker) != identity
    finally:
        await proc.stop(0)  # idempotent: what a failure left
        if process_identity(worker) == identity:
            os.kill(worker, signal.SIGKILL)


def test_a_gone_leaders_pid_given_to_another_process_is_not_the_engines():
    """After the leader is reaped its pid may be another's, even a group leader's of its own: that
    process and its group are never taken for the engine's (they would get its SIGKILL)."""
    from lessor.engines.proctree import engine_processes, read_proc

    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)  # stands for the new owner of the pid
    try:
        start = read_proc(stranger.pid).start
        assert set(engine_processes(stranger.pid, (), leader_start=start)) == {stranger.pid}  # still the leader
        assert engine_processes(stranger.pid, (), leader_start=str(int(start) - 1)) == {}
    finally:
        stranger.kill()
        stranger.wait()
