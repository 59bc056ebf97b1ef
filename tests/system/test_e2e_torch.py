"""End to end: lessord --sim with two models on the built-in torch engine (the tiny Qwen2 model
the project writes), real engine processes, the admin API and the ledger as an operator sees them."""

import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from lessor.daemon.units import GiB

from ..support.clients import Admin, chat, post, wait_for
from ..support.configs import torch_spec, write_config
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S


def kinds(model: dict) -> dict:
    return {k: v for k, v in model["leased_bytes"].items() if v}


def test_two_models_share_one_device(tmp_path, tiny_qwen):
    config = write_config(tmp_path, [torch_spec("qa", tiny_qwen, "3GiB"), torch_spec("qb", tiny_qwen, "2GiB")])
    with running_lessord(config) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        for name in ("qa", "qb"):
            status, model = admin.load(name)
            assert status == 200 and model["state"] == "ready", model
        a, b = admin.model("qa"), admin.model("qb")
        # Weights as configured; the KV cache sized after them (4096 tokens x 8 KiB), the load peak gone.
        assert kinds(a) == {"weights": 3 * GiB, "kv": 4096 * 8192}
        assert kinds(b) == {"weights": 2 * GiB, "kv": 4096 * 8192}
        assert a["params"] == {"context_tokens": 2048, "max_batch_size": 2}
        # Where the load's time went: the engine's own stamps split its share, in the protocol's order.
        timeline = a["last_load"]
        assert [s["step"] for s in timeline["steps"]] == [
            "admit", "plan and grant weights", "spawn", "interpreter and imports", "tokenizer, config, modeling imports",
            "weights read", "weights noticed",
            "measure at weights", "release peak, plan and grant kv", "kv allocated", "measure at kv", "ready noticed",
            "measure at ready and verify", "record ready"]
        assert {s["whose"] for s in timeline["steps"]} == {"lessor", "engine", "measure", "notice"}
        assert list(timeline["marks"])[0] == "requested" and list(timeline["marks"])[-1] == "done"
        assert timeline["totals"]["engine"] > 0 and timeline["seconds"] >= sum(timeline["totals"].values()) * 0.999
        ledger = {(lease["model"], lease["kind"]) for lease in admin.leases()}
        assert ledger == {("qa", "weights"), ("qa", "kv"), ("qb", "weights"), ("qb", "kv")}
        for model in (a, b):
            answer = chat(model["endpoint"], "Hello, how are you?", seed=1)
            assert answer["object"] == "chat.completion" and answer["model"] == model["name"]
            assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["message"]["role"] == "assistant"
        # Streaming (SSE chunks, then [DONE]), plain completions, and a client's mistake named.
        status, raw = post(a["endpoint"] + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                    "max_tokens": 4, "stream": True})
        chunks = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and chunks[-1] == "[DONE]"
        parsed = [json.loads(c) for c in chunks[:-1]]
        assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
        assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length") and parsed[-1]["usage"]["completion_tokens"] >= 1
        status, raw = post(b["endpoint"] + "/v1/completions", {"prompt": "The quick brown", "max_tokens": 3})
        assert status == 200 and json.loads(raw)["object"] == "text_completion"
        status, raw = post(b["endpoint"] + "/v1/completions", {"prompt": "x", "max_tokens": 0})
        assert status == 400 and json.loads(raw)["error"]["param"] == "max_tokens"
        assert "max_tokens: must be a positive integer" in json.loads(raw)["error"]["message"]
        device = admin.call("GET", "/admin/v1/devices")[1][0]
        assert device["leased_by_kind"]["weights"] == 5 * GiB and device["leased_by_kind"]["load_peak"] == 0

        status, _ = admin.call("POST", "/admin/v1/models/qa", {"action": "unload"})
        assert status == 200 and admin.model("qa")["state"] == "unloaded"
        assert admin.leases("qa") == [] and {lease["model"] for lease in admin.leases()} == {"qb"}
        with pytest.raises(ProcessLookupError):
            os.killpg(a["pid"], 0)
        assert chat(admin.model("qb")["endpoint"], "still there?")["choices"]


def test_a_killed_engine_releases_its_leases_at_once(tmp_path, tiny_qwen):
    spec = torch_spec("qa", tiny_qwen, "3GiB", restart={"policy": "on-failure", "backoff": "200ms"})
    # No reconciler check runs in this test: the leases go back when the process is reaped, not later.
    with running_lessord(write_config(tmp_path, [spec], reconciler={"interval": "1h"})) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("qa")[0] == 200
        pid = admin.model("qa")["pid"]
        events = admin.events()
        os.kill(pid, signal.SIGKILL)
        exited, _ = wait_for(events, "engine_exited", 600, model="qa")
        assert exited["returncode"] == -signal.SIGKILL and exited["restart_in_s"] == 0.2
        released, _ = wait_for(events, "model_state", 600, model="qa", state="failed")
        assert "SIGKILL" in released["reason"]
        # The restart policy brings it back as a new process, with new leases.
        wait_for(events, "model_state", 600, model="qa", state="ready")
        model = admin.model("qa")
        assert model["pid"] != pid and model["restarts"] == 1 and kinds(model)["weights"] == 3 * GiB
        assert chat(model["endpoint"], "back?")["choices"]
        with urllib.request.urlopen(url + "/metrics", timeout=HANG_S) as r:
            assert 'lessor_engine_exits_total{model="qa"} 1.0' in r.read().decode()


def test_a_failed_second_load_leaves_the_first_untouched(tmp_path, tiny_qwen):
    models = [torch_spec("qa", tiny_qwen, "3GiB"), torch_spec("broken", tmp_path / "no-such-model", "1GiB"),
              {**torch_spec("too-big", tiny_qwen, "2GiB"), "memory": {"weights": "2GiB", "kv_bytes_per_token": 8192,
                                                                     "load_peak": "3GiB"}}]
    # Policy `fit` never evicts (lru_idle would rightly evict the idle first model for the third).
    with running_lessord(write_config(tmp_path, models, policy="fit")) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("qa")[0] == 200
        before = admin.leases()

        status, error = admin.load("broken")
        assert status == 502 and error["error"]["type"] == "load_failed"
        message = error["error"]["message"]  # refused before an engine was started, naming the path
        assert f"'start engine': model_path {tmp_path / 'no-such-model'}: no such folder" in message, message
        assert "Traceback" not in message
        assert admin.model("broken")["state"] == "failed" and admin.leases("broken") == []
        assert "no-such-model: no such folder" in admin.model("broken")["error"]

        # 8 - 0.5 headroom - 1 foreign - 3.03 (qa) leaves 3.47 GiB: 2 GiB of weights + a 3 GiB peak do not fit.
        status, error = admin.load("too-big")
        assert status == 503 and error["error"]["type"] == "not_enough_memory", error
        assert "too-big" in error["error"]["message"] and admin.leases("too-big") == []

        assert admin.leases() == before and admin.model("qa")["state"] == "ready"
        assert chat(admin.model("qa")["endpoint"], "unharmed?")["choices"]


def test_a_pinned_model_that_cannot_load_does_not_stop_the_daemon(tmp_path, tiny_qwen):
    spec = {**torch_spec("broken", tmp_path / "missing", "1GiB"), "pinned": True, "restart": {"policy": "never"}}
    with running_lessord(write_config(tmp_path, [spec, torch_spec("qa", tiny_qwen, "1GiB")]), not_ready=True) as (_, url, _):
        admin = Admin(url, tmp_path / "state")
        broken = admin.model("broken")
        assert broken["state"] == "failed" and "missing" in broken["error"] and admin.leases() == []
        assert admin.load("qa")[0] == 200
        ready = admin.call("GET", "/readyz")  # served, but not ready: the pin failed, and /readyz says which
        assert ready[0] == 503 and "pinned model 'broken' failed" in ready[1]["reason"], ready


def test_a_router_client_is_told_which_model_failed_and_where_to_look_not_the_engine_log(tmp_path, tiny_qwen):
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text('{"model_type": "no-such-family"}')  # transformers' traceback, at load
    faulty = torch_spec("faulty", tiny_qwen, "1GiB")
    faulty["engine"]["extra_args"] = ["--fail-at-step", "1"]
    models = [torch_spec("broken", tmp_path / "no-such-model", "1GiB"), torch_spec("garbled", garbled, "1GiB"), faulty]
    with running_lessord(write_config(tmp_path, models, policy="fit")) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        for name, step in (("broken", "start engine"), ("garbled", "wait for weights"), ("broken", "start engine")):
            status, raw = post(router + "/v1/chat/completions", {"model": name, "max_tokens": 2,
                                                                 "messages": [{"role": "user", "content": "Hi"}]})
            error = json.loads(raw)["error"]
            assert status in (502, 503) and error["code"] in ("load_failed", "model_failed"), raw
            assert f"model '{name}'" in error["message"] and f"its engine's log says why (lessor logs {name})" \
                in error["message"], raw
            if status == 502:
                assert f"at step '{step}'" in error["message"]
            if name == "broken":  # the reason, less the server's path
                assert "model_path <path>: no such folder" in error["message"], raw
            assert str(tmp_path) not in raw.decode() and "Traceback" not in raw.decode() and "/" not in raw.decode()
        # The operator has it all: the path in the model's error, the traceback in the engine's log.
        assert f"model_path {tmp_path / 'no-such-model'}: no such folder" in admin.model("broken")["error"]
        assert "Traceback" in admin.call("GET", "/admin/v1/models/garbled/log?lines=200")[1]

        status, raw = post(router + "/v1/completions", {"model": "faulty", "prompt": "The quick", "max_tokens": 3})
        error = json.loads(raw)["error"]
        assert status == 500 and error["code"] == "engine_error" and "(lessor logs faulty)" in error["message"], raw
        status, raw = post(router + "/v1/chat/completions", {"model": "faulty", "max_tokens": 3, "stream": True,
                                                             "messages": [{"role": "user", "content": "Hi"}]})
        chunks = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and chunks[-1] == "[DONE]" and "error" in json.loads(chunks[-2]), chunks
        assert "RuntimeError" in admin.call("GET", "/admin/v1/models/faulty/log?lines=200")[1]
        learned = admin.model("faulty")
        assert learned["request_rate"] > 0 and learned["load_s"] > 0, learned
    # What the router learned outlives lessord: saved at its stop, read back by the next one.
    saved = json.loads((tmp_path / "state" / "traffic.json").read_text())["stats"]
    assert saved["rates"]["faulty"] > 0 and saved["load_s"]["faulty"] == pytest.approx(learned["load_s"], abs=1e-3)
    with running_lessord(write_config(tmp_path, models, policy="fit")) as (_, url, _):
        again = Admin(url, tmp_path / "state").model("faulty")
        assert again["state"] == "unloaded" and again["request_rate"] > 0
        assert again["load_s"] == pytest.approx(learned["load_s"], abs=1e-3)
