"""Restart and reconcile, with real processes: lessord killed with SIGKILL in steady state and in the
middle of a load, then started again on the same ledger. Running engines are adopted (pid and
process identity checked), half-done loads rolled back, leases of dead engines released."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from lessor.daemon.devices.probes import make_probe
from lessor.daemon.leases import EnginePhase, EngineRecord, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB
from lessor.engines.process import process_identity
from lessor.engines.strays import stop_strays

from ..support.clients import Admin, chat, metric, post
from ..support.configs import config_file, sim_config, standin_spec, torch_model, torch_spec
from ..support.lessord import kill_9, running_lessord
from ..support.waiting import HANG_S


def test_kill_9_in_steady_state_adopts_the_running_engine(tmp_path, tiny_qwen):
    config = config_file(tmp_path, [torch_spec("qa", tiny_qwen, "3GiB"), torch_spec("qb", tiny_qwen, "2GiB")])
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("qa")[0] == 200
        before, leases = admin.model("qa"), admin.leases()
        kill_9(proc)
    assert process_identity(before["pid"]) is not None, "the engine outlives lessord"

    with running_lessord(config) as (proc, url, router):
        admin = Admin(url, tmp_path / "state")
        after = admin.model("qa")
        # The same process, the same leases (same ids: nothing granted twice), the same flags.
        assert after["state"] == "ready" and after["pid"] == before["pid"] and after["params"] == before["params"]
        assert admin.leases() == leases
        assert chat(router, "still serving?", model="qa")["choices"]  # the router reaches the adopted engine
        assert metric(url, 'lessor_engine_adoptions_total{outcome="adopted"}') == 1.0
        # The second model is granted beside it: the adopted leases count against the budget.
        assert admin.load("qb")[0] == 200
        device = admin.call("GET", "/admin/v1/devices")[1][0]
        assert device["leased_bytes"] == sum(lease["bytes"] for lease in admin.leases()) <= device["leasable_bytes"]
        # An adopted engine is stopped like any other, and its exit is watched like a child's.
        assert admin.call("POST", "/admin/v1/models/qa", {"action": "unload"})[0] == 200
        assert process_identity(before["pid"]) is None and admin.leases("qa") == []
        qb = admin.model("qb")
        kill_9(proc)
    assert process_identity(qb["pid"]) is not None
    os.kill(qb["pid"], signal.SIGKILL)  # the engine dies while no lessord runs

    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.model("qb")["state"] == "unloaded" and admin.leases() == []  # its leases released at start


def test_kill_9_mid_load_rolls_the_load_back_at_restart(tmp_path):
    config = config_file(tmp_path, [standin_spec("slow", tmp_path, ready_after_s=600)])
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")

        def load():
            try:
                admin.load("slow")
            except OSError:
                pass  # lessord is killed under it
        threading.Thread(target=load, daemon=True).start()
        deadline = time.monotonic() + HANG_S
        while True:
            leases = admin.leases("slow")
            if leases and all(lease["owner_pid"] for lease in leases):  # the engine is started and recorded
                break
            assert time.monotonic() < deadline, admin.model("slow")
            time.sleep(0.05)
        engine_pid = leases[0]["owner_pid"]
        assert admin.model("slow")["state"] == "loading" and "load_peak" in {lease["kind"] for lease in leases}
        kill_9(proc)
    assert process_identity(engine_pid) is not None

    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.model("slow")["state"] == "unloaded" and admin.leases() == []
        assert process_identity(engine_pid) is None, "the half-loaded engine is stopped"
        assert metric(url, 'lessor_engine_adoptions_total{outcome="stopped"}') == 1.0


def test_an_engine_that_never_becomes_ready_is_stopped_at_the_timeout(tmp_path):
    config = config_file(tmp_path, [standin_spec("stuck", tmp_path, ready_after_s=3600)],
                         timeouts={"weights": "2s", "ready": "2s", "stop_grace": "1s"})
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        status, error = admin.load("stuck")
        assert status == 502 and error["error"]["type"] == "load_failed", error
        assert "after 2 s" in error["error"]["message"]  # stopped at timeouts.ready, not later
        pid = json.loads((tmp_path / "stuck.json").read_text())["pid"]
        assert process_identity(pid) is None and admin.leases() == []
        assert admin.model("stuck")["state"] == "failed"


async def test_a_recycled_pid_is_never_adopted(tmp_path):
    """The recorded pid now belongs to a stranger (another boot's identity): it is left alone and
    the leases it seemed to hold are released."""
    config = sim_config(tmp_path, [torch_model("a")])
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ledger = await Ledger.open(config.ledger_url(), make_probe(config.devices, True), config.devices)
        await ledger.grant("a", [LeaseWant("gpu0", LeaseKind.WEIGHTS, 4 * GiB)], "t1")
        await ledger.record_engine(EngineRecord("a", "t1", stranger.pid, "another-boot:42", 8123, EnginePhase.READY, {}, 0, 1.0))
        await ledger.close()
        async with runtime(config, engines={}) as controller:
            assert controller.model("a")["state"] == "unloaded" and controller.leases() == []
            assert controller.ledger.engines() == {}
        assert stranger.poll() is None, "a process that is not our engine is never signalled"
    finally:
        stranger.kill()
        stranger.wait()


async def test_unrecorded_engines_of_this_state_folder_are_stopped(tmp_path):
    """lessord died between starting an engine and recording it: the engine's environment names the
    state folder and the attempt, so the next start finds and stops it, and nothing else."""
    state, other = tmp_path / "state", tmp_path / "other"

    def sleeper(state_dir, attempt):
        env = {**os.environ, "LESSOR_STATE_DIR": str(state_dir), "LESSOR_ATTEMPT": attempt}
        return subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    stray, kept, foreign = sleeper(state, "lost"), sleeper(state, "adopted"), sleeper(other, "lost")
    try:
        for p in (stray, kept, foreign):  # exec has finished once /proc shows the new environment
            while b"LESSOR_ATTEMPT=" not in Path(f"/proc/{p.pid}/environ").read_bytes():
                time.sleep(0.01)
        assert await stop_strays(state, {"adopted"}, grace_s=2) == [stray.pid]
        assert stray.wait(HANG_S) == -signal.SIGTERM
        assert kept.poll() is None and foreign.poll() is None
    finally:
        for p in (stray, kept, foreign):
            p.kill()
            p.wait()


def test_an_engine_that_dies_at_its_first_request_is_not_loaded_again_by_every_request(tmp_path):
    # vLLM 0.32's CPU build with a head size its attention lacks: /health says ok, then the first
    # request ends the engine with exit code 0.
    starts = tmp_path / "crashy.starts"
    spec = standin_spec("crashy", tmp_path)
    spec["engine"]["env"].update({"LESSOR_STANDIN_CRASH_ON_REQUEST": "0", "LESSOR_STANDIN_STARTS": str(starts)})
    spec["restart"] = {"policy": "never", "max_restarts": 1}
    with running_lessord(config_file(tmp_path, [spec])) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        events = admin.events()
        for _crash in (1, 2):
            status, _ = post(router + "/v1/chat/completions", {"model": "crashy", "messages": []})
            assert status == 502, "the request the engine died under"
            failed = next(e for e in iter(lambda: events.get(timeout=HANG_S), None)
                          if e["type"] == "model_state" and e["model"] == "crashy" and e["state"] == "failed")
            assert "code 0 while serving" in failed["reason"] and "crashing at the first request" in failed["reason"]
        assert "more than restart.max_restarts 1" in failed["reason"]
        for _ in range(3):
            status, raw = post(router + "/v1/chat/completions", {"model": "crashy", "messages": []})
            error = json.loads(raw)["error"]
            assert status == 503 and error["code"] == "model_failed", error
            assert "code 0 while serving" in error["message"] and "lessor load crashy" in error["message"]
        assert len(starts.read_text().split()) == 2, "two loads, then none for the refused requests"
        assert admin.load("crashy")[0] == 200, "the operator's load tries again"
        assert len(starts.read_text().split()) == 3
