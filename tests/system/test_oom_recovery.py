"""Out of memory, with real lessord and real engine processes: an engine that always runs out of
memory is tried the configured number of times and then failed with every attempt's reason,
while the other models keep serving; a torch engine that holds more than predicted is planned
from what lessor measured, and fits, on the retry and after a restart."""

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..support.clients import Admin, chat, metric
from ..support.configs import config_file, standin_spec, torch_spec
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S


def test_an_engine_that_always_runs_out_of_memory_stops_after_its_attempts_while_others_serve(tmp_path, tiny_qwen):
    starts = tmp_path / "oomy.starts"
    oomy = standin_spec("oomy", tmp_path)
    oomy["engine"]["env"].update({"LESSOR_STANDIN_OOM": "1", "LESSOR_STANDIN_STARTS": str(starts)})
    oomy["restart"] = {"policy": "on-failure", "max_restarts": 3}
    config = config_file(tmp_path, [torch_spec("steady", tiny_qwen, "1GiB"), oomy], planner={"oom_retries": 1})
    with running_lessord(config) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("steady")[0] == 200
        status, error = admin.load("oomy")
        assert status == 502 and error["error"]["type"] == "out_of_memory", error
        message = error["error"]["message"]
        assert "attempt 1:" in message and "attempt 2:" in message and "CUDA out of memory" in message
        assert len(starts.read_text().split()) == 2, "the first start and one retry, no more"
        model = admin.model("oomy")
        assert model["state"] == "failed" and "attempt 2:" in model["error"] and admin.leases("oomy") == []
        assert metric(url, 'lessor_load_retries_total{model="oomy",outcome="oom"}') == 1.0
        [fingerprint] = admin.call("GET", "/admin/v1/fingerprints?model=oomy")[1]
        assert fingerprint["outcome"] == "oom" and fingerprint["loads"] == 2
        # The operator sees the reason in `lessor status`, and the other model never stopped serving.
        shown = subprocess.run([str(Path(sys.executable).parent / "lessor"), "status", "--admin", url],
                               capture_output=True, text=True, timeout=HANG_S)
        assert shown.returncode == 0, shown.stderr
        assert "oomy" in shown.stdout and "attempt 2:" in shown.stdout and "out of memory" in shown.stdout
        assert admin.model("steady")["state"] == "ready"
        assert chat(router, "still there?", model="steady")["choices"]
        assert len(starts.read_text().split()) == 2, "a failed load schedules no restarts"


def test_a_torch_engine_holding_more_than_predicted_is_planned_from_its_measurement(tmp_path, measure_model):
    # The config says 64 MiB of weights; the engine really holds 291 MB of them.
    spec = torch_spec("heavy", measure_model, "64MiB")
    spec["engine"]["dtype"] = "bfloat16"
    config = config_file(tmp_path, [spec])
    with running_lessord(config) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        events = admin.events()
        status, model = admin.load("heavy")
        assert status == 200 and model["state"] == "ready", model
        retried = next(e for e in iter(lambda: events.get(timeout=HANG_S), None) if e["type"] == "load_retried")
        assert retried["outcome"] == "overrun" and retried["attempt"] == 1
        held = sum(lease["bytes"] for lease in admin.leases("heavy"))
        assert held > 270 * 2**20, "the retry leased what the engine measured, not the config's 64 MiB"
        assert chat(router, "hello", model="heavy")["choices"]
        assert admin.call("POST", "/admin/v1/models/heavy", {"action": "unload"})[0] == 200
    # A new lessord on the same ledger remembers: the first attempt is planned from the measurement and fits.
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        status, plan = admin.call("POST", "/admin/v1/plan", {"model": "heavy"})
        assert status == 200 and plan["fits"] and plan["fingerprint"]["used"]["outcome"] == "ready"
        measured = {c["name"] for c in plan["memory"] if c["source"] == "measured"}
        # The 291 MB beyond the config's 64 MiB are held beside the KV cache (workspace); the cache
        # itself measured 10 240 B/token (10 layers x 4 KV heads x 64 x 2 x bf16) where the config said 8192.
        assert {"workspace_measured", "kv_per_token"} <= measured, plan["memory"]
        kv = next(c for c in plan["memory"] if c["name"] == "kv_per_token")
        assert abs(kv["bytes"] - 10240 * 1.03) < 10240 * 0.01 and kv["source"] == "measured"  # measured within 1 %
        assert admin.load("heavy")[0] == 200
        assert metric(url, "lessor_load_retries_total") == 0.0
        [fingerprint] = admin.call("GET", "/admin/v1/fingerprints?model=heavy")[1]
        assert fingerprint["loads"] == 3 and fingerprint["applies"] and fingerprint["measured"][0]["method"] == "engine"
        # The operator's view and their way to forget it.
        shown = subprocess.run([str(Path(sys.executable).parent / "lessor"), "fingerprints", "--admin", url],
                               capture_output=True, text=True, timeout=HANG_S)
        assert shown.returncode == 0 and "heavy" in shown.stdout and "[applies now]" in shown.stdout, shown
        key = fingerprint["key"]
        anonymous = urllib.request.Request(f"{url}/admin/v1/fingerprints/{key}", method="DELETE")
        try:
            urllib.request.urlopen(anonymous, timeout=HANG_S)
            raise AssertionError("DELETE without the admin token was accepted")
        except urllib.error.HTTPError as refused:
            assert refused.code == 401
        assert admin.call("DELETE", f"/admin/v1/fingerprints/{key}")[0] == 200
        status, error = admin.call("DELETE", f"/admin/v1/fingerprints/{key}")
        assert status == 404 and error["error"]["type"] == "fingerprint_not_found" and error["error"]["field"] == "key"
        assert admin.call("POST", "/admin/v1/plan", {"model": "heavy"})[1]["fingerprint"]["used"] is None
