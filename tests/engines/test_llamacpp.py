"""llama.cpp for real, on the CPU: llama-cpp-python's server (built from source by the test setup)
runs the tiny Qwen2 model written as GGUF with the `gguf` package, started by lessor's adapter."""

import importlib.util
import json
import os
import re
import urllib.request

import pytest

from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.configs import sim_config
from ..support.waiting import HANG_S


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen, tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        reason = "llama-cpp-python or gguf not installed (pip install -e '.[test]' builds them)"
        if os.environ.get("LESSOR_REQUIRE_LLAMACPP"):
            pytest.fail(reason)
        pytest.skip(reason)
    from lessor.engines.tiny_qwen import write_gguf

    return write_gguf(tiny_qwen, tmp_path_factory.mktemp("gguf") / "tiny-qwen.gguf")


async def test_llama_cpp_serves_a_gguf_with_the_planned_context(tiny_gguf, tmp_path):
    spec = {"name": "tiny-gguf", "engine": {"kind": "llamacpp", "server": "llama-cpp-python",
                                            "model_path": str(tiny_gguf), "threads": 1},
            "memory": {"weights": "1GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 256, "max_kv_tokens": 2048, "max_batch_size": 1},
            "restart": {"policy": "never"}}
    async with runtime(sim_config(tmp_path, [spec])) as controller:
        model = await controller.load("tiny-gguf")
        assert model["state"] == "ready" and model["params"]["ctx_size"] == 2048
        # One phase: weights and the KV cache leased together; the load peak released once ready.
        assert model["leased_bytes"]["weights"] == GiB and model["leased_bytes"]["kv"] == 2048 * 8192
        assert model["leased_bytes"]["load_peak"] == 0
        body = {"model": "tiny-gguf", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        request = urllib.request.Request(model["endpoint"] + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] >= 1
        # The engine really took the planned context, as its own log says.
        log = controller.log_tail("tiny-gguf", 400)
        assert re.search(r"n_ctx\s+= 2048\b", log), log[-2000:]
        await controller.unload("tiny-gguf")
        assert controller.leases() == []
