"""Elastic KV end to end: lessord --sim with two models on the built-in torch engine. The second
load goes through by shrinking the first model's KV cache (the engine resized in place, its lease
smaller in the ledger), and once the second is unloaded the first grows back to its plan."""

import json
import time
import urllib.request

from lessor.daemon.units import MiB

from .conftest import HANG_S, running_lessord
from .test_e2e_torch import Admin, chat, wait_for, write_config

KV_PER_TOKEN = MiB


def elastic_spec(name: str, model_path, weights: str) -> dict:
    return {"name": name, "engine": {"kind": "torch", "model_path": str(model_path), "dtype": "float32"},
            "memory": {"weights": weights, "kv_bytes_per_token": KV_PER_TOKEN, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 256, "max_kv_tokens": 2048, "max_batch_size": 2}}


def kv_lease(admin: Admin, model: str) -> int:
    return sum(lease["bytes"] for lease in admin.leases(model) if lease["kind"] == "kv")


def engine_tokens(model: dict) -> int:
    """The KV tokens the engine itself says it holds (all sequences)."""
    with urllib.request.urlopen(model["endpoint"] + "/lessor/v1/state", timeout=HANG_S) as r:
        state = json.loads(r.read())
    return state["context_tokens"] * state["max_batch_size"]


def engine_reaches(model: dict, tokens: int) -> int:
    """A grow takes the lease first, then resizes the engine: its state says so once that is done
    (polled, the deadline only a guard against a hang)."""
    deadline = time.monotonic() + HANG_S
    while (held := engine_tokens(model)) != tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def test_a_load_goes_through_by_shrinking_an_idle_models_kv_cache_which_grows_back(tmp_path, tiny_qwen):
    # 6.5 GiB leasable: qa takes 3 GiB of weights and a 2 GiB KV cache; qb's 2 GiB of weights and
    # its smallest KV cache fit only if qa gives some of its cache back (evicting qa is not needed).
    config = write_config(tmp_path, [elastic_spec("qa", tiny_qwen, "3GiB"), elastic_spec("qb", tiny_qwen, "2GiB")],
                          reconciler={"interval": "200ms"})
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        status, qa = admin.load("qa")
        assert status == 200 and qa["state"] == "ready", qa
        planned = kv_lease(admin, "qa")
        assert planned == 2048 * KV_PER_TOKEN and engine_tokens(qa) == 2048
        events = admin.events()

        status, qb = admin.load("qb")
        assert status == 200 and qb["state"] == "ready", qb
        admitted, _ = wait_for(events, "admission", HANG_S, model="qb")
        assert admitted["result"] == "evict" and admitted["victims"] == [], admitted
        shrunk, _ = wait_for(events, "lease_resized", HANG_S, model="qa", reason="shrunk for 'qb'")
        assert admin.model("qa")["state"] == "ready"
        held = kv_lease(admin, "qa")
        assert shrunk["from_bytes"] == planned and shrunk["bytes"] == held
        assert 256 * KV_PER_TOKEN <= held < planned
        assert engine_tokens(admin.model("qa")) * KV_PER_TOKEN == held  # the engine holds what is leased
        assert chat(admin.model("qa")["endpoint"], "still there?")["choices"]

        status, _ = admin.call("POST", "/admin/v1/models/qb", {"action": "unload"})
        assert status == 200
        grown, _ = wait_for(events, "lease_resized", HANG_S, model="qa", bytes=planned)
        assert grown["from_bytes"] == held and grown["reason"] == "memory idle: grown back"
        assert kv_lease(admin, "qa") == planned and engine_reaches(admin.model("qa"), 2048) == 2048
        assert chat(admin.model("qa")["endpoint"], "and now?")["choices"]
