"""lessord under systemd: notify messages on a real socket, SIGHUP reload, the unit file verified."""

import functools
import grp
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lessor.daemon.notify import Notifier
from lessor.engines.process import free_port

from ..support.paths import BIN, ROOT
from ..support.waiting import HANG_S


def test_notify_reaches_an_abstract_socket():
    name = f"lessor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert Notifier("@" + name).ready("up")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
    assert Notifier("").send("READY=1") is False


# Only guards against a hang: every wait below ends on an event (a message, an answer, an exit),
# whatever the machine's load.


class NotifySocket:
    """The notify socket as systemd serves it: read all the time, so a sender never finds its
    queue full (net.unix.max_dgram_qlen is 10 by default: 1.5 s of watchdog pings)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: queue.Queue[list[str]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:  # shut down: the test is over (lessord never sends an empty message)
                return
            self.messages.put(data.decode().split("\n"))

    def wait_for(self, field: str, proc: subprocess.Popen, log: Path) -> list[list[str]]:
        """Messages until one carries `field`; the watchdog pings in between are kept too. Fails at
        once, with the daemon's output, if lessord exits before sending it."""
        seen, deadline = [], time.monotonic() + HANG_S
        while True:
            try:
                message = self.messages.get(timeout=0.1)
            except queue.Empty:
                assert proc.poll() is None, f"lessord exited ({proc.returncode}) before {field}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no {field} from lessord; seen: {seen}\n{log.read_text()}"
                continue
            seen.append(message)
            if field in message:
                return seen

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join()


def models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/admin/v1/models", timeout=HANG_S) as r:
        return [m["name"] for m in json.loads(r.read())]


def test_a_watchdog_ping_never_blocks_when_nobody_reads(tmp_path):
    """A full queue drops the ping instead of stalling lessord's event loop until systemd reads."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify.sock"))
        notifier, sent = Notifier(str(tmp_path / "notify.sock")), []
        pinging = threading.Thread(target=lambda: sent.extend(notifier.ping() for _ in range(10_000)), daemon=True)
        pinging.start()
        pinging.join(HANG_S)
        assert not pinging.is_alive(), "a ping blocked on the full queue"
        assert sent[0] and not sent[-1]
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_ready_watchdog_reload_and_stopping_on_a_real_notify_socket(tmp_path):
    config = tmp_path / "lessor.yaml"
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    config.write_text(yaml.safe_dump(data))
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "300000"}
    output = tmp_path / "lessord.log"
    with open(output, "w") as sink:  # a file, not a pipe nobody reads while the test waits
        proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config), "--admin-listen", f"127.0.0.1:{port}",
                                 "--router-listen", f"127.0.0.1:{free_port()}"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    wait_for = functools.partial(notify.wait_for, proc=proc, log=output)
    try:
        assert wait_for("READY=1")
        pings = wait_for("WATCHDOG=1") + wait_for("WATCHDOG=1")
        assert sum(["WATCHDOG=1"] == m for m in pings) >= 2

        # Add a model and SIGHUP: RELOADING=1, then READY=1; the new model is there, the old one too.
        extra = {**data["models"][0], "name": "r1-small", "aliases": [], "priority": 10}
        config.write_text(yaml.safe_dump({**data, "models": data["models"] + [extra]}))
        proc.send_signal(signal.SIGHUP)
        seen = wait_for("READY=1")
        assert any(m[0] == "RELOADING=1" and m[1].startswith("MONOTONIC_USEC=") for m in seen)
        assert models(url) == ["deepseek-r1", "r1-small"]

        # A bad config is refused whole: the running one stays.
        config.write_text("policy: {name: fifo}\n")
        proc.send_signal(signal.SIGHUP)
        assert "STATUS=reload refused: running config kept" in wait_for("READY=1")[-1]
        assert models(url) == ["deepseek-r1", "r1-small"]

        proc.send_signal(signal.SIGTERM)
        assert wait_for("STOPPING=1")
        assert proc.wait(HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert "reload refused" in output.read_text()


def test_a_listen_change_needs_a_restart(tmp_path):
    import asyncio

    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.errors import InvalidRequest
    from lessor.daemon.runtime import runtime

    base = {"state_dir": str(tmp_path), "devices": {"probe": "sim"}}

    async def run():
        async with runtime(parse_config(base), engines={}) as controller:
            with pytest.raises(InvalidRequest, match="admin.*need a restart"):
                await controller.reload(parse_config({**base, "admin": {"listen": "127.0.0.1:9999"}}))
            change = await controller.reload(parse_config({**base, "policy": {"name": "fit"}}))
            assert change.added == () and controller.config.policy.name == "fit"
    asyncio.run(run())


def systemd_analyze() -> str:
    """systemd-analyze (tests/support/install-system-deps.sh installs it); required under CI."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true" or os.environ.get("LESSOR_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is not installed (make system-deps installs it)")
        pytest.skip("systemd-analyze is not installed (make system-deps installs it)")
    return analyze


def verify(unit: Path) -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=HANG_S)
    problems = [line for line in result.stderr.splitlines() if "lessord.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    unit = (ROOT / "systemd" / "lessord.service").read_text()
    assert "ExecStart=/opt/lessor/venv/bin/lessord " in unit  # where `make install` puts it
    unit = unit.replace("/opt/lessor/venv/bin/lessord", str(BIN / "lessord"))  # verify checks the binary exists
    path = tmp_path / "lessord.service"
    path.write_text(unit)
    verify(path)
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                   "StateDirectory=", "ConfigurationDirectory=", "LogsDirectory=", "SupplementaryGroups=video render",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert needed in unit
    assert "\nPrivateDevices=" not in unit and "\nDevicePolicy=" not in unit  # would hide /dev/nvidia* from NVML


# -- make install ------------------------------------------------------------------------------

def make_install(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    me, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    env = {**os.environ, "UNIT_DIR": str(tmp_path / "systemd"), "CONFIG_DIR": str(tmp_path / "etc" / "lessor"),
           "STATE_DIR": str(tmp_path / "state"), "LESSOR_USER": me, **settings}
    assert group  # the unit's Group= is the user's group
    return subprocess.run(["make", "-s", "install", f"PREFIX={settings.get('PREFIX', tmp_path / 'opt')}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=HANG_S)


@pytest.fixture(scope="module")
def lessor_wheel(tmp_path_factory) -> Path:
    """lessor as a wheel, built offline from a copy of this tree, for make install to put in its venv."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "var", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=HANG_S)
    return next(out.glob("lessor-*.whl"))


# systemd/torch.sh's pip step as a dry run (-v undoes its -q, so pip names the wheel it chose): no
# torch is installed by these tests.
TORCH_DRY_RUN = "--dry-run --no-deps --ignore-installed -v"


def path_without_nvidia_smi() -> str:
    """This PATH less the folders that hold nvidia-smi: a CPU machine's, wherever the test runs."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "nvidia-smi")))


def test_make_install_takes_the_cpu_torch_where_there_is_no_nvidia_smi(tmp_path, lessor_wheel):
    """It installed torch 2.14.1 with 16 nvidia-* CUDA packages (5.7 GB) on a CPU-only box, where
    `make demo` takes the CPU torch 2.13.0: both now run systemd/torch.sh, before lessor."""
    settings = {"LESSOR_ANY_PREFIX": "1", "LESSOR_SOURCE": str(lessor_wheel), "PIP_ARGS": "--no-deps",
                "TORCH_PIP_ARGS": TORCH_DRY_RUN, "PATH": path_without_nvidia_smi()}
    done = make_install(tmp_path, **settings)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "==> [1/5] torch 2.13.0 (CPU build: no nvidia-smi on this machine)" in done.stdout
    assert "Would install torch-2.13.0+cpu" in done.stdout, done.stdout
    makefile = (ROOT / "Makefile").read_text()
    assert 'sh systemd/torch.sh "[2/4]" $(PY)' in makefile and "torch==" not in makefile  # the one rule


def test_with_nvidia_smi_the_cuda_torch_comes_with_lessors_dependencies(tmp_path):
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    pip_log = tmp_path / "pip.log"
    python = tmp_path / "bin" / "python"  # records what it is asked, installs nothing
    python.write_text(f'#!/bin/sh\necho "$@" >> {pip_log}\n')
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{path_without_nvidia_smi()}"}
    done = subprocess.run(["sh", str(ROOT / "systemd" / "torch.sh"), "[2/4]", str(python)], env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 and "nvidia-smi found, the CUDA build comes with" in done.stdout
    assert not pip_log.exists()
    env["PATH"] = f"{tmp_path / 'bin' / 'none'}{os.pathsep}{path_without_nvidia_smi()}"
    smi.unlink()
    done = subprocess.run(["sh", str(ROOT / "systemd" / "torch.sh"), "[2/4]", str(python)], env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 and pip_log.read_text() == "-m pip install -q torch==2.13.0\n"


def test_make_install_writes_a_venv_a_config_and_a_unit_that_verifies(tmp_path, lessor_wheel):
    """The README's service path as `make install` runs it, into this test's folder instead of /opt
    and /etc (the venv's place is allowed by LESSOR_ANY_PREFIX: the unit is verified, never started)."""
    settings = {"LESSOR_ANY_PREFIX": "1", "LESSOR_SOURCE": str(lessor_wheel), "PIP_ARGS": "--no-deps",
                "TORCH_PIP_ARGS": TORCH_DRY_RUN}
    first = make_install(tmp_path, **settings)
    assert first.returncode == 0, first.stdout + first.stderr
    unit = tmp_path / "systemd" / "lessord.service"
    text = unit.read_text()
    venv = tmp_path / "opt" / "venv"
    assert f"ExecStart={venv}/bin/lessord --config {tmp_path}/etc/lessor/lessor.yaml" in text
    assert f"\nUser={pwd.getpwuid(os.getuid()).pw_name}\n" in text and "\nGroup=" in text
    assert os.access(venv / "bin" / "lessord", os.X_OK)
    config = tmp_path / "etc" / "lessor" / "lessor.yaml"
    assert "state_dir" not in config.read_text() and oct(config.stat().st_mode & 0o777) == "0o640"
    assert (tmp_path / "state").is_dir()
    verify(unit)
    # Again: nothing fails, an edited config is kept.
    config.write_text(config.read_text() + "# edited\n")
    again = make_install(tmp_path, **settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept as it is" in again.stdout and config.read_text().endswith("# edited\n")
    verify(unit)


@pytest.mark.parametrize("prefix,setting", [("/home/someone/lessor", "ProtectHome=yes"), ("/root/lessor", "ProtectHome=yes"),
                                            ("/tmp/lessor", "PrivateTmp=yes")])
def test_make_install_refuses_a_venv_the_unit_would_hide(tmp_path, prefix, setting):
    done = make_install(tmp_path, PREFIX=prefix)
    assert done.returncode != 0 and setting in done.stderr and "PREFIX=/opt/lessor" in done.stderr
    assert not (tmp_path / "systemd").exists() and not Path(prefix).exists()


NAMESPACE_INSTALL = r"""
set -eu
# Private to this mount namespace: /etc, /opt and /var/lib are overlays whose writes land in a tmpfs.
mount -t tmpfs none "$NS"
for dir in /etc /opt /var/lib; do
    layer="$NS/$(echo "$dir" | tr / _)"
    mkdir -p "$layer/up" "$layer/work"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$layer/up,workdir=$layer/work" "$dir"
done
make -s install
make -s install
systemd-analyze verify /etc/systemd/system/lessord.service
id -un lessor
stat -c '%U:%G %a %n' /var/lib/lessor /etc/lessor/lessor.yaml
grep -E '^(User|Group|ExecStart)=' /etc/systemd/system/lessord.service
test -x /opt/lessor/venv/bin/lessord && echo "lessord is executable"
"""


def test_make_install_as_written_the_user_opt_etc_and_var_lib_in_a_private_mount_namespace(tmp_path, lessor_wheel):
    """`sudo make install` with its defaults (useradd lessor, /opt/lessor/venv, /etc, /var/lib/lessor),
    run where /etc, /opt and /var/lib are overlays private to the test: the real ones are not touched."""
    if os.getuid() != 0 or shutil.which("unshare") is None or not Path("/opt").is_dir():
        pytest.skip("needs root, unshare(1) and /opt (a private mount namespace with overlays)")
    analyze = systemd_analyze()
    (tmp_path / "ns").mkdir()
    env = {**os.environ, "NS": str(tmp_path / "ns"), "LESSOR_SOURCE": str(lessor_wheel), "PIP_ARGS": "--no-deps",
           "TORCH_PIP_ARGS": TORCH_DRY_RUN,
           "SYSTEMCTL": "true", "PATH": f"{Path(analyze).parent}:{os.environ['PATH']}"}
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs none {tmp_path / 'ns'}"], capture_output=True, text=True, timeout=HANG_S)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    def real() -> tuple:
        return (Path("/etc/passwd").read_text(), Path("/etc/group").read_text(),
                *(Path(p).exists() for p in ("/etc/lessor", "/opt/lessor", "/var/lib/lessor", "/etc/systemd/system/lessord.service")))

    before = real()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_INSTALL], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "lessor" in lines and "lessord is executable" in lines
    assert "lessor:lessor 750 /var/lib/lessor" in lines and "root:lessor 640 /etc/lessor/lessor.yaml" in lines
    assert {"User=lessor", "Group=lessor",
            "ExecStart=/opt/lessor/venv/bin/lessord --config ${CONFIGURATION_DIRECTORY}/lessor.yaml"} <= set(lines)
    assert "kept as it is (already there)" in done.stdout  # the second run
    assert real() == before, "the real /etc, /opt or /var/lib changed"
