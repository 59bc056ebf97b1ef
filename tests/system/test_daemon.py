"""The real daemon and CLI as processes: the seed case as an operator sees it."""

import json
import os
import signal
import stat
import subprocess
import time

import pytest
import yaml

from lessor.daemon.units import GiB
from lessor.engines.process import free_port

from ..support.lessord import running_lessord
from ..support.paths import BIN, ROOT
from ..support.waiting import HANG_S


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "lessor"), *args], capture_output=True, text=True, timeout=HANG_S,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"lessor {args} exited {result.returncode}: {result.stderr}")
    return result


@pytest.fixture
def seed_config(tmp_path):
    data = yaml.safe_load((ROOT / "examples" / "seed.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def daemon(seed_config, tmp_path):
    with running_lessord(seed_config) as (proc, url, _):
        yield proc, url, seed_config, tmp_path / "state"


def test_status_shows_the_seed_case(daemon):
    proc, url, config, _ = daemon
    out = cli("status", "--admin", url).stdout
    gpu = out.split("gpu0", 1)[1].split("host", 1)[0]
    assert "total 24.0 GiB" in gpu
    assert "foreign                    8.0 GiB" in gpu
    assert "headroom                   1.0 GiB" in gpu
    assert "leasable                  15.0 GiB" in gpu
    assert "probe: sim" in out and "deepseek-r1" in out
    devices = json.loads(cli("status", "--admin", url, "--json").stdout)["devices"]
    assert devices[0]["free_bytes"] == 15 * GiB


def test_token_file_is_created_private_and_used_by_the_cli(daemon):
    proc, url, config, state = daemon
    token = state / "admin.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    # The CLI finds the token through --config. ktransformers is not installed here: the engine
    # exits at once, the error quotes its log, and no lease is left behind.
    result = cli("load", "deepseek-r1", "--config", str(config), "--admin", url, check=False)
    assert result.returncode == 1 and "502 load_failed" in result.stderr
    assert "No module named 'ktransformers'" in result.stderr and "every lease of the attempt was released" in result.stderr
    result = cli("load", "deepseek-r1", "--admin", url, "--token", "wrong", check=False)
    assert "401 unauthorized" in result.stderr
    assert json.loads(cli("leases", "--admin", url, "--json").stdout) == []


def test_set_foreign_changes_the_budget(daemon):
    proc, url, config, _ = daemon
    cli("set-foreign", "gpu0", "12GiB", "--config", str(config), "--admin", url)
    devices = json.loads(cli("status", "--admin", url, "--json").stdout)["devices"]
    assert devices[0]["free_bytes"] == 11 * GiB


def test_sigterm_stops_cleanly(daemon):
    proc, *_ = daemon
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(HANG_S) == 0


def test_plan_json_contract_without_a_daemon(seed_config):
    plan = json.loads(cli("plan", "deepseek-r1", "--config", str(seed_config), "--json").stdout)
    assert plan["fits"] is True and plan["reasons"] == []
    assert {"cache_lens", "max_batch_size", "chunk_size"} <= set(plan["params"])
    steady = sum(lease["bytes"] for lease in plan["leases"] if lease["device"] == "gpu0" and lease["kind"] != "load_peak")
    assert steady <= 15 * GiB and plan["peak_bytes"]["gpu0"] <= 15 * GiB
    result = cli("plan", "deepseek-r1", "--config", str(seed_config), "--json", "--set", "max_batch_size=2", check=False)
    rejected = json.loads(result.stdout)
    assert result.returncode == 1 and rejected["fits"] is False
    assert "at least 3 for the balance_serve backend" in rejected["reasons"][0]


def test_bad_config_fails_at_start_listing_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: {headroom: lots}\npolicy: {name: fifo}\n")
    result = subprocess.run([str(BIN / "lessord"), "--config", str(bad)], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 2
    assert "devices.headroom: 'lots' is not a size" in result.stderr
    assert "policy.name: unknown policy 'fifo'" in result.stderr
    check = cli("check-config", str(bad), check=False)
    assert check.returncode == 1 and "2 problem(s)" in check.stderr  # the config's problems: 1 (check-config --help)


def test_unix_socket_is_group_only(seed_config, tmp_path):
    data = yaml.safe_load(seed_config.read_text())
    sock = tmp_path / "admin.sock"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}", "unix_socket": str(sock)}
    data["router"] = {"listen": f"127.0.0.1:{free_port()}"}  # never the default port another lessord may hold
    seed_config.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(seed_config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_S
        while not sock.exists() or stat.S_IMODE(sock.stat().st_mode) != 0o660:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        import socket
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(HANG_S)
