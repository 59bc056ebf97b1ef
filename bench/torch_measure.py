"""The built-in torch engine measured on this machine's CPU: a random Qwen2 model large enough to
measure (291 MB in bf16) loaded by the real engine process, once per KV size, started and driven
through its adapter as lessord does (weights, then the KV cache lessor would grant), against
what lessor's memory model predicts for the same spec (the profile the planner leases from).

The engine measures itself (`measured` in `/lessor/v1/state`, engines/torch_engine.py): its
anonymous memory beyond a baseline taken before the weights. The runs start together and each
is waited on through the engine's own state, never a clock."""

from __future__ import annotations

import asyncio
import json
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.planning.kv_sizing import kv_bytes
from lessor.engines.base import GpuTarget, KvGrant, Launch
from lessor.engines.builtin import TorchAdapter
from lessor.engines.process import free_port
from lessor.engines.tiny_qwen import write

# 10 layers of 1024 wide with 4 KV heads of 64 and a 32k vocabulary: 145.5 M parameters, 291 MB
# in bf16, written in seconds on two cores; large enough that a few MB of loader objects are 1 %.
ARCHITECTURE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000)
KV_CASES = ((1024, 4), (4096, 2), (8192, 3))  # (context_tokens, max_batch_size): 40, 80 and 240 MiB
DEVICE = "cpu0"
HANG_S = 600.0  # only turns a hang into a failure


@dataclass(frozen=True)
class Measurement:
    context_tokens: int
    max_batch_size: int
    predicted_weights: int
    predicted_kv: int
    loaded: dict[str, Any]  # the engine's state once its weights were in
    ready: dict[str, Any]  # and once its KV cache was allocated

    @property
    def measured_weights(self) -> int:
        return self.ready["measured"]["weights_bytes"]

    @property
    def measured_kv(self) -> int:
        return self.ready["measured"]["kv_bytes"]


def write_model(folder: Path) -> Path:
    return write(folder, seed=0, architecture=ARCHITECTURE, dtype="bfloat16")


def spec_for(model: Path) -> ModelSpec:
    return ModelSpec.model_validate({"name": "measured", "engine": {"kind": "torch", "model_path": str(model),
                                                                     "dtype": "bfloat16"},
                                     "architecture": {"hf_config": str(model / "config.json")}})


def _launch(spec: ModelSpec, params: dict[str, int], run_dir: Path) -> Launch:
    tokens = params["context_tokens"] * params["max_batch_size"]
    return Launch(spec, params, tokens, (GpuTarget(DEVICE, 0, "cpu", 0, 0),), {DEVICE: 0}, simulated=True,
                  port=free_port(), log_path=run_dir / "engine.log", run_dir=run_dir)


def _state(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url + "/lessor/v1/state", timeout=HANG_S) as response:
        return json.loads(response.read())


async def measure_one(spec: ModelSpec, context_tokens: int, max_batch_size: int, run_dir: Path) -> Measurement:
    params = {"context_tokens": context_tokens, "max_batch_size": max_batch_size}
    device = spec.profile().devices[0]
    tokens = context_tokens * max_batch_size
    handle = await TorchAdapter().start(_launch(spec, params, run_dir))
    try:
        await handle.wait_weights_loaded(HANG_S)
        loaded = await asyncio.to_thread(_state, handle.base_url)
        await handle.allocate_kv(KvGrant(tokens, kv_bytes(device, tokens), params, {DEVICE: 0}))
        await handle.wait_ready(HANG_S)
        ready = await asyncio.to_thread(_state, handle.base_url)
    finally:
        await handle.stop(10.0)
    return Measurement(context_tokens, max_batch_size, device.weights, kv_bytes(device, tokens), loaded, ready)


async def measure_all(model: Path, run_dir: Path, cases=KV_CASES) -> list[Measurement]:
    spec = spec_for(model)
    return list(await asyncio.gather(*(measure_one(spec, c, b, run_dir / f"ctx{c}-b{b}") for c, b in cases)))


def measure_now(cases=KV_CASES) -> list[Measurement]:
    """Writes the model in a temporary folder and measures every case (about a minute on two cores)."""
    with tempfile.TemporaryDirectory(prefix="lessor-measure-") as tmp:
        model = write_model(Path(tmp) / "qwen2-291mb")
        return asyncio.run(measure_all(model, Path(tmp) / "runs", cases))
