"""llama.cpp's server (kind `llamacpp`): `llama-server`, or llama-cpp-python's `python -m
llama_cpp.server`. Both size their KV cache from flags at start (one phase)."""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

from pydantic import Field

from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
# llama-cpp-python takes cache types as ggml_type numbers.
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
# Bytes per element of each cache type, block scales included (q8_0: 32 int8 + an fp16 scale per 34 bytes).
GGML_TYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                   "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
UNQUANTIZED = ("f32", "f16", "bf16")  # cache types that need no flash attention


class LlamaCppEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "llama.cpp's server"
    kv_param: ClassVar[str] = "ctx_size"
    batch_param: ClassVar[str] = "parallel"
    kv_per_sequence: ClassVar[bool] = False  # -c is shared by all slots
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = True
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 512

    kind: Literal["llamacpp"] = Field(description="llama.cpp's llama-server.")
    server: Literal["llama-server", "llama-cpp-python"] = Field(default="llama-server", description="Which server: llama.cpp's `llama-server` binary, or `python -m llama_cpp.server` (llama-cpp-python).")
    binary: str = Field(default="llama-server", min_length=1, description="llama-server executable (name on PATH or absolute path); for llama-cpp-python, the Python that has it (default: lessor's own).")
    ctx_size: int | None = Field(default=None, ge=16, description="-c: total KV tokens shared by all slots; planned when unset.")
    parallel: int | None = Field(default=None, ge=1, le=256, description="--parallel: slots served at once; planned when unset.")
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-ngl: layers offloaded to the GPU, -1 for all.")
    cache_type_k: CacheType = Field(default="f16", description="--cache-type-k.")
    cache_type_v: CacheType = Field(default="f16", description="--cache-type-v (quantized V needs flash attention).")
    threads: int | None = Field(default=None, ge=1, le=1024, description="-t: CPU threads; the server's default when unset.")

    def kv_element_bytes(self) -> tuple[float, float] | None:
        return GGML_TYPE_BYTES[self.cache_type_k], GGML_TYPE_BYTES[self.cache_type_v]

    def planned_flags(self, sizing: Sizing) -> Flags:
        warnings = []
        if self.cache_type_v not in UNQUANTIZED:
            warnings.append("engine.cache_type_v: a quantized V cache needs flash attention (the adapter passes -fa on)")
        return Flags({"ctx_size": sizing.kv_tokens, "parallel": sizing.batch, "n_gpu_layers": self.n_gpu_layers,
                      "cache_type_k": self.cache_type_k, "cache_type_v": self.cache_type_v}, [], warnings)


class LlamaCppAdapter(ProcessAdapter):
    args_class = LlamaCppEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        flash = engine.cache_type_v not in UNQUANTIZED  # a quantized V cache needs it
        ngl = 0 if launch.simulated else p["n_gpu_layers"]
        if engine.server == "llama-cpp-python":
            python = sys.executable if engine.binary == "llama-server" else engine.binary
            argv = [python, "-m", "llama_cpp.server", "--model", engine.model_path, "--model_alias", launch.spec.name,
                    "--host", launch.host, "--port", str(launch.port), "--n_ctx", str(p["ctx_size"]),
                    "--n_gpu_layers", str(ngl), "--type_k", str(GGML_TYPE_IDS[p["cache_type_k"]]),
                    "--type_v", str(GGML_TYPE_IDS[p["cache_type_v"]])]
            argv += ["--flash_attn", "true"] if flash else []
            argv += ["--n_threads", str(engine.threads)] if engine.threads else []
            return Command(argv, {}, health_path="/v1/models")
        # -ngl -1 means all layers in recent llama-server; 999 says the same to older builds.
        argv = [engine.binary, "-m", engine.model_path, "--alias", launch.spec.name, "--host", launch.host,
                "--port", str(launch.port), "-c", str(p["ctx_size"]), "--parallel", str(p["parallel"]),
                "-ngl", str(999 if ngl < 0 else ngl), "--cache-type-k", p["cache_type_k"],
                "--cache-type-v", p["cache_type_v"]]
        argv += ["-fa", "on"] if flash else []
        argv += ["-t", str(engine.threads)] if engine.threads else []
        return Command(argv, {}, health_path="/health")
