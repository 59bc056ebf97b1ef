"""The router end to end: lessord (simulated 8 GiB device), real torch-engine processes, and the
official `openai` client, unchanged, pointed at the router."""

import json
import time
import urllib.request

import openai
import pytest

from ..support.clients import Admin, client
from ..support.configs import torch_spec, write_config
from ..support.lessord import running_lessord
from ..support.waiting import HANG_S


def test_the_openai_client_works_through_the_router_and_loads_on_demand(tmp_path, tiny_qwen):
    # 8 GiB - 1 GiB foreign - 512 MiB headroom = 6.5 GiB: one 4 GiB model at a time.
    models = [torch_spec("qa", tiny_qwen, "4GiB", aliases=["a"]), torch_spec("qb", tiny_qwen, "4GiB")]
    with running_lessord(write_config(tmp_path, models)) as (_, url, router):
        admin, api = Admin(url, tmp_path / "state"), client(router)
        assert [(m.id, m.state) for m in api.models.list().data] == [("qa", "unloaded"), ("a", "unloaded"),
                                                                      ("qb", "unloaded")]
        answer = api.chat.completions.create(model="qa", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=5, seed=1)
        assert answer.model == "qa" and answer.choices[0].message.role == "assistant"
        assert admin.model("qa")["state"] == "ready"  # loaded on demand by the request

        chunks = list(api.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, stream=True, seed=2))
        assert len(chunks) >= 3 and chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert isinstance("".join(c.choices[0].delta.content or "" for c in chunks), str)

        text = api.completions.create(model="a", prompt="The quick brown", max_tokens=3)
        assert text.object == "text_completion" and text.usage.completion_tokens >= 1

        vectors = api.embeddings.create(model="qa", input=["hello", "world"])  # the client asks for base64
        assert [len(v.embedding) for v in vectors.data] == [64, 64]
        assert abs(sum(x * x for x in vectors.data[0].embedding) - 1) < 1e-4

        # qb does not fit beside qa: qa is idle, so the policy evicts it.
        answer = api.chat.completions.create(model="qb", messages=[{"role": "user", "content": "Hello"}], max_tokens=3)
        assert answer.model == "qb"
        assert (admin.model("qa")["state"], admin.model("qb")["state"]) == ("unloaded", "ready")
        assert {lease["model"] for lease in admin.leases()} == {"qb"}

        with pytest.raises(openai.NotFoundError) as err:
            api.chat.completions.create(model="qc", messages=[{"role": "user", "content": "Hello"}])
        assert "known models: a, qa, qb" in str(err.value)


def test_a_client_that_leaves_a_stream_stops_the_engine_generating(tmp_path, tiny_qwen):
    with running_lessord(write_config(tmp_path, [torch_spec("qa", tiny_qwen, "2GiB")])) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("qa")[0] == 200
        endpoint = admin.model("qa")["endpoint"]
        stream = open_long_stream(router, "qa")
        assert engine_state(endpoint)["requests_in_flight"] == 1 and admin.model("qa")["in_flight"] == 1
        stream.close()  # 2000 tokens are far from done: the client leaves
        deadline = time.monotonic() + HANG_S
        while (state := engine_state(endpoint))["requests_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["requests_in_flight"] == 0 and state["requests_cancelled"] == 1
        assert admin.model("qa")["in_flight"] == 0


def open_long_stream(router: str, model: str):
    """A streamed chat of 2000 tokens, open once its first chunk has arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(router + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    stream = urllib.request.urlopen(request, timeout=HANG_S)
    assert stream.readline().startswith(b"data: ")
    return stream


def engine_state(endpoint: str) -> dict:
    with urllib.request.urlopen(endpoint + "/lessor/v1/state", timeout=HANG_S) as r:
        return json.loads(r.read())


def test_an_engine_that_crashes_mid_stream_cuts_the_stream_short_and_comes_back_on_demand(tmp_path, tiny_qwen):
    import http.client
    import os
    import signal

    spec = torch_spec("qa", tiny_qwen, "2GiB", restart={"policy": "never"})
    with running_lessord(write_config(tmp_path, [spec])) as (_, url, router):
        admin = Admin(url, tmp_path / "state")
        assert admin.load("qa")[0] == 200
        pid = admin.model("qa")["pid"]
        stream = open_long_stream(router, "qa")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(http.client.IncompleteRead):  # no final chunk: the client can tell it broke
            stream.read()
        deadline = time.monotonic() + HANG_S
        while admin.model("qa")["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        model = admin.model("qa")
        assert model["state"] == "failed" and "SIGKILL" in model["error"] and admin.leases() == []
        assert model["in_flight"] == 0
        # The next request loads it again, as a new process.
        answer = client(router).chat.completions.create(model="qa", messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=3)
        assert answer.choices and admin.model("qa")["pid"] not in (None, pid)
