"""A restart with engines that were stopped (SIGSTOP) while no lessord ran: real lessord and
stand-in engine processes. The admin API and the router serve at once; the stopped engines' models
answer 503 with Retry-After while the others are adopted and served beside them; a stopped engine
that resumes is adopted, one that stays stopped past `timeouts.adopt_stopped_s` is killed and its
pinned model loaded again. Nothing here waits on the clock: each step waits for the state it needs
(polled, with a generous deadline as a safety net), and the figures are printed (`-s`), not asserted.
"""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from lessor.engines.process import free_port, process_identity
from lessor.engines.strays import stop_strays

from ..support.clients import Admin, chat, metric
from ..support.configs import config_file, standin_spec
from ..support.lessord import kill_9, running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S

STOPPED, RUNNING = ("a-stopped", "b-stopped"), "c-running"


def small(spec: dict, **extra) -> dict:
    return {**spec, "memory": {**spec["memory"], "weights": "1GiB"}, **extra}


def until(check, what: str):
    """Poll `check` until it returns something true; the deadline only catches a hang."""
    deadline = time.monotonic() + HANG_S
    while not (result := check()):
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)
    return result


def state_of(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]


def get(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of a GET (or, with a body, a POST)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@contextmanager
def serving_lessord(config_path: Path, output: Path):
    """lessord started again, yielded as soon as its admin API answers /healthz (conftest's
    running_lessord waits for /readyz, which stays 503 while engines are being adopted), with the
    moment it was started (time.monotonic). Its stdout and stderr go to `output`."""
    port, router_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}
    started = time.monotonic()
    with open(output, "w") as sink:
        proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config_path), "--sim", "--admin-listen",
                                 f"127.0.0.1:{port}", "--router-listen", f"127.0.0.1:{router_port}"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    try:
        until(lambda: answers(proc, f"{url}/healthz"), "the admin API")
        yield proc, url, f"http://127.0.0.1:{router_port}", started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(HANG_S)


def answers(proc: subprocess.Popen, url: str) -> bool:
    assert proc.poll() is None, "lessord exited"
    try:
        with urllib.request.urlopen(url, timeout=HANG_S) as r:
            return r.status == 200
    except OSError:
        return False


def sigstop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    until(lambda: state_of(pid) == "T", f"pid {pid} to stop")


def test_stopped_engines_do_not_hold_the_restart(tmp_path):
    """Two stopped engines, one running: lessord serves at once; the running engine is adopted and
    served while the stopped ones' adoption is pending (their wait, 10 minutes, is never reached);
    one resumes and is adopted with its pid; lessord stopped meanwhile stops the one still stopped."""
    names = (*STOPPED, RUNNING)
    config = config_file(tmp_path, [small(standin_spec(n, tmp_path)) for n in names],
                         timeouts={"adopt_stopped_s": "10m"})
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        for name in names:
            assert admin.load(name)[0] == 200
        pids = {name: admin.model(name)["pid"] for name in names}
        leases = {name: admin.leases(name) for name in names}
        kill_9(proc)
    try:
        for name in STOPPED:
            sigstop(pids[name])
        output = tmp_path / "lessord.out"
        with serving_lessord(config, output) as (proc, url, router, started):
            admin_s = time.monotonic() - started
            until(lambda: answers(proc, router + "/health"), "the router")
            router_s = time.monotonic() - started
            admin = Admin(url, tmp_path / "state")
            # The admin API answers while the stopped engines' adoption is pending; not ready yet.
            assert [admin.model(n)["state"] for n in STOPPED] == ["adopting", "adopting"]
            assert get(url + "/readyz")[0] == 503
            # The running engine is adopted beside them (in parallel: it comes last in order) and served.
            until(lambda: admin.model(RUNNING)["state"] == "ready", f"{RUNNING} adopted")
            assert admin.model(RUNNING)["pid"] == pids[RUNNING] and admin.leases(RUNNING) == leases[RUNNING]
            assert chat(router, "served?", model=RUNNING)["choices"]
            served_s = time.monotonic() - started
            # A stopped engine's model: 503 with Retry-After, from the router and the admin API, never loaded twice.
            status, headers, body = get(router + "/v1/chat/completions", {"model": STOPPED[0], "messages": []})
            assert status == 503 and body["error"]["code"] == "model_adopting" and int(headers["Retry-After"]) >= 1
            status, error = admin.load(STOPPED[0])
            assert status == 503 and error["error"]["type"] == "model_adopting", error
            assert [admin.model(n)["state"] for n in STOPPED] == ["adopting", "adopting"], "still pending"
            print(f"\nrestart with {len(STOPPED)} stopped engines: admin API answered {admin_s:.2f} s after start, "
                  f"router {router_s:.2f} s, the running engine adopted and served {served_s:.2f} s, while the "
                  "stopped ones' adoption waited (before: nothing answered for 102 s)")
            # One resumes: adopted, the same process and leases; the other still waits.
            os.kill(pids[STOPPED[0]], signal.SIGCONT)
            until(lambda: admin.model(STOPPED[0])["state"] == "ready", f"{STOPPED[0]} adopted once resumed")
            assert admin.model(STOPPED[0])["pid"] == pids[STOPPED[0]] and admin.leases(STOPPED[0]) == leases[STOPPED[0]]
            assert chat(router, "back?", model=STOPPED[0])["choices"]
            assert admin.model(STOPPED[1])["state"] == "adopting" and get(url + "/readyz")[0] == 503
        # lessord stopped (SIGTERM) while one adoption was pending: that engine is stopped too.
        assert proc.returncode == 0 and "Traceback" not in output.read_text(), output.read_text()
        assert process_identity(pids[STOPPED[1]]) is None
        assert all(process_identity(pid) is None for pid in pids.values())
        with running_lessord(config) as (_, url, _):
            admin = Admin(url, tmp_path / "state")
            assert admin.leases() == [] and {admin.model(n)["state"] for n in names} == {"unloaded"}
    finally:
        for pid in pids.values():
            if process_identity(pid) is not None:
                os.kill(pid, signal.SIGKILL)


def test_an_engine_that_stays_stopped_is_killed_and_its_pinned_model_loaded_again(tmp_path):
    """Past timeouts.adopt_stopped_s the stopped engine gets SIGKILL (SIGTERM would wait for a
    SIGCONT), its leases go, and the pinned model loads again before /readyz says ready."""
    spec = small(standin_spec("pinned", tmp_path), pinned=True)
    config = config_file(tmp_path, [spec], timeouts={"adopt_stopped_s": "1s"})
    with running_lessord(config) as (proc, url, _):
        admin = Admin(url, tmp_path / "state")
        before = until(lambda: (m := admin.model("pinned"))["state"] == "ready" and m, "the pinned load")
        old_leases = {lease["id"] for lease in admin.leases()}
        kill_9(proc)
    try:
        sigstop(before["pid"])
        output = tmp_path / "lessord.out"
        started = time.monotonic()
        with running_lessord(config, output=output) as (proc, url, router):
            ready_s = time.monotonic() - started
            admin = Admin(url, tmp_path / "state")
            after = admin.model("pinned")
            assert after["state"] == "ready" and after["pid"] != before["pid"]
            assert process_identity(before["pid"]) is None, "the stopped engine is killed"
            leases = admin.leases()
            assert leases and not old_leases & {lease["id"] for lease in leases}, "its leases released, new ones granted"
            assert metric(url, 'lessor_engine_adoptions_total{outcome="stopped"}') == 1.0
            assert chat(router, "again?", model="pinned")["choices"]
            print(f"\nrestart with a stopped pinned engine (timeouts.adopt_stopped_s 1 s): ready, reloaded, "
                  f"{ready_s:.2f} s after start")
        text = output.read_text()
        assert "is stopped (SIGSTOP or a debugger" in text and "stayed stopped (SIGSTOP) for 1 s" in text, text
    finally:
        if process_identity(before["pid"]) is not None:
            os.kill(before["pid"], signal.SIGKILL)


async def test_a_stopped_stray_acts_on_its_sigterm(tmp_path):
    """A stray that was stopped gets SIGCONT after its SIGTERM, so it ends by the SIGTERM at once
    instead of waiting out the grace (10 minutes here) for SIGKILL."""
    env = {**os.environ, "LESSOR_STATE_DIR": str(tmp_path), "LESSOR_ATTEMPT": "lost"}
    stray = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)
    try:
        until(lambda: b"LESSOR_ATTEMPT=" in Path(f"/proc/{stray.pid}/environ").read_bytes(), "exec")
        sigstop(stray.pid)
        assert await stop_strays(tmp_path, set(), grace_s=HANG_S) == [stray.pid]
        assert stray.wait(HANG_S) == -signal.SIGTERM
    finally:
        stray.kill()
        stray.wait()
