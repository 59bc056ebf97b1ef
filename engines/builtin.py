"""The built-in torch engine (kind `torch`): its arguments and its adapter. The server itself is
`torch_server`, run in its own process; this module never imports torch."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from ..memory.context import ContextLimit, trained_context
from ..memory.footprint import Footprint, ModelShape
from .base import (
    Command,
    EngineArgsBase,
    EngineHandle,
    Flags,
    KvGrant,
    KvResizeRefused,
    Launch,
    ProcessAdapter,
    ProcessHandle,
    Sizing,
)
from .memory_model import TORCH_OOM
from .readiness import probe_session

if TYPE_CHECKING:
    import aiohttp


KV_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
FOLDER = "the built-in engine reads an HF-format folder: config.json, the safetensors and the tokenizer"


class ModelPathUnusable(ValueError):
    """The model_path cannot be the built-in engine's model; the message is one line naming it."""


def model_path_problem(path: str) -> str | None:
    """Why the built-in engine could not read a model at `path`, in one line; None when it can try.
    Checked before the engine is started (and by the engine itself when run by hand): a missing
    folder is the operator's to fix, not a transformers traceback to read."""
    folder = Path(path)
    if not folder.exists():
        return f"model_path {path}: no such folder ({FOLDER})"
    if not folder.is_dir():
        return f"model_path {path}: not a folder ({FOLDER})"
    config = folder / "config.json"
    if not os.access(folder, os.R_OK | os.X_OK) or (config.exists() and not os.access(config, os.R_OK)):
        return f"model_path {path}: not readable by uid {os.getuid()}, which runs the engine"
    if not config.is_file():
        return f"model_path {path}: no config.json there ({FOLDER})"
    return None


class TorchEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "the built-in torch engine"
    kv_param: ClassVar[str] = "context_tokens"
    batch_param: ClassVar[str] = "max_batch_size"
    kv_per_sequence: ClassVar[bool] = True  # a static cache of max_batch_size slots of context_tokens
    two_phase: ClassVar[bool] = True
    hybrid: ClassVar[bool] = False
    max_devices: ClassVar[int | None] = 1
    default_chunk_tokens: ClassVar[int] = 512
    packages: ClassVar[tuple[str, ...]] = ("torch", "transformers")  # run by lessord's own Python
    oom_markers: ClassVar[tuple[str, ...]] = TORCH_OOM
    # torch_server's line once its phase is weights_loaded (main.load); its KV step answers when done.
    ready_markers: ClassVar[tuple[str, ...]] = ("weights loaded:",)
    takes_aliases: ClassVar[bool] = False  # it answers any `model`, under the one name it is given
    memory_env: ClassVar[tuple[str, ...]] = ()  # every size comes from its flags

    kind: Literal["torch"] = Field(description="The built-in torch engine.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(default="bfloat16", description="Weight and KV dtype.")
    max_batch_size: int | None = Field(default=None, ge=1, le=256, description="Sequences decoded together; planned when unset.")
    context_tokens: int | None = Field(default=None, ge=16, le=1 << 20, description="Tokens per sequence in the static KV cache; planned when unset.")
    threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads per decode step (CPU and simulated devices).")

    def decode_batch(self) -> int | None:
        return self.max_batch_size

    def context_limit(self, architecture) -> tuple[ContextLimit | None, bool]:
        # transformers 5.x runs a Qwen2/Llama past max_position_embeddings without a word (RoPE is
        # computed for any position), on positions the model never saw; torch_engine.embed refuses them.
        return trained_context(architecture), False

    def footprint(self, shape: ModelShape) -> Footprint:
        # Its dtype is the KV cache's (torch_engine allocates it in the model's dtype), whatever the
        # spec's kv_dtype says; float32 is the weights' too.
        shape = replace(shape, kv_dtype=KV_DTYPES[self.dtype])
        if self.dtype == "float32":
            shape = replace(shape, weight_format="fp32")
        footprint = super().footprint(shape)
        # The generic bytes per token are transformers' layout: for MLA too, since DeepseekV2/V3
        # attention caches the latent, not the per-head K and V it expands from it each step.
        basis = (f"a transformers StaticCache in {self.dtype}: each layer's K and V, "
                 + ("MLA's compressed latent, K kv_lora_rank and V qk_rope_head_dim wide, one head (transformers "
                    "5.20-5.24 modeling_deepseek_v2.py updates the cache before expand_kv)"
                    if shape.architecture.is_mla else "KV heads x head_dim each"))
        return replace(footprint, devices=tuple(replace(d, kv_basis=basis) for d in footprint.devices))

    def planned_flags(self, sizing: Sizing) -> Flags:
        return Flags({"context_tokens": sizing.kv_tokens // sizing.batch, "max_batch_size": sizing.batch}, [], [])


class TorchHandle(ProcessHandle):
    """Two phases: weights (`/lessor/v1/state` says `weights_loaded`), then `POST /lessor/v1/kv`;
    elastic KV through `POST /lessor/v1/kv/resize`."""

    resizes_kv: ClassVar[bool] = True
    RESIZE_WAIT_S: ClassVar[float] = 30.0  # for the requests running in the cache to end

    async def _state(self, session: aiohttp.ClientSession) -> dict:
        async with session.get(self.base_url + "/lessor/v1/state") as response:
            response.raise_for_status()
            return await response.json()

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        import aiohttp  # here, not at the top: see engines/readiness.py

        async with probe_session(10) as session:
            async def loaded() -> bool:
                # /health names the phase in its 503 and measures nothing: /lessor/v1/state would
                # read the process's memory first, milliseconds on every probe of a load.
                try:
                    async with session.get(self.health_url) as response:
                        return (await response.json(content_type=None)).get("status") == "weights_loaded"
                except (aiohttp.ClientError, OSError, ValueError):
                    return False  # not listening yet
            await self.process.wait_until(loaded, "loading its weights", timeout_s, self.launch.spec.engine.ready_markers)

    async def allocate_kv(self, kv: KvGrant) -> None:
        device = self.launch.gpus[0].device
        body = {"context_tokens": kv.params["context_tokens"], "max_batch_size": kv.params["max_batch_size"],
                "memory_limit_bytes": None if self.launch.simulated else kv.leased_bytes.get(device)}
        async with probe_session(300) as session:
            async with session.post(self.base_url + "/lessor/v1/kv", json=body) as response:
                answer = await response.json(content_type=None)
                if response.status != 200:
                    error = answer.get("error", {})
                    raise RuntimeError(f"the engine refused its KV cache ({response.status}): {error.get('message')}")
        self.engine_times = dict(answer.get("times") or {})  # for the load's timeline (daemon/models/timeline.py)
        self._ready = answer.get("phase") == "ready"  # its KV answer says so: wait_ready probes nothing

    async def measure(self) -> dict[str, int]:
        async with probe_session(10) as session:
            state = await self._state(session)
        return {self.launch.gpus[0].device: int(state["memory_reserved"])}

    async def resize_kv(self, kv_tokens: int, leased_bytes: Mapping[str, int]) -> int:
        import aiohttp  # here, not at the top: see engines/readiness.py

        device = self.launch.gpus[0].device
        body = {"kv_tokens": kv_tokens, "wait_s": self.RESIZE_WAIT_S,
                "memory_limit_bytes": None if self.launch.simulated else leased_bytes.get(device)}
        timeout = aiohttp.ClientTimeout(total=self.RESIZE_WAIT_S + 300)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.base_url + "/lessor/v1/kv/resize", json=body) as response:
                    answer = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError) as exc:
            raise KvResizeRefused(f"the engine did not answer the resize ({type(exc).__name__}: {exc})") from exc
        if response.status != 200:
            raise KvResizeRefused(f"the engine refused to resize its KV cache to {kv_tokens} tokens "
                                  f"({response.status}): {answer.get('error', {}).get('message')}")
        return int(answer["kv_tokens"])


class TorchAdapter(ProcessAdapter):
    args_class = TorchEngineArgs
    handle_class = TorchHandle

    async def start(self, launch: Launch) -> EngineHandle:
        problem = model_path_problem(launch.spec.engine.model_path)
        if problem is not None:
            raise ModelPathUnusable(problem)
        return await super().start(launch)

    def command(self, launch: Launch) -> Command:
        engine = launch.spec.engine
        argv = [sys.executable, "-m", "lessor.engines.torch_server", "--model-path", engine.model_path,
                "--served-model-name", launch.spec.name, "--host", launch.host, "--port", str(launch.port),
                "--dtype", engine.dtype, "--threads", str(engine.threads),
                "--min-kv-tokens", str(launch.spec.plan.min_kv_tokens),
                # CUDA_VISIBLE_DEVICES holds only this model's GPU, so it is always cuda:0 inside.
                "--device", "cpu" if launch.simulated else "cuda:0"]
        if not launch.simulated:
            argv += ["--memory-limit-bytes", str(launch.leased_bytes[launch.gpus[0].device])]
        return Command(argv, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"})
