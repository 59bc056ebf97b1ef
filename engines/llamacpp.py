"""llama.cpp server's arguments (kind `llamacpp`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EngineArgsBase

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


class LlamaCppEngineArgs(EngineArgsBase):
    kind: Literal["llamacpp"] = Field(description="llama.cpp's llama-server.")
    binary: str = Field(default="llama-server", min_length=1, description="llama-server executable (name on PATH or absolute path).")
    ctx_size: int | None = Field(default=None, ge=16, description="-c: total KV tokens shared by all slots; planned when unset.")
    parallel: int | None = Field(default=None, ge=1, le=256, description="--parallel: slots served at once; planned when unset.")
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-ngl: layers offloaded to the GPU, -1 for all.")
    cache_type_k: CacheType = Field(default="f16", description="--cache-type-k.")
    cache_type_v: CacheType = Field(default="f16", description="--cache-type-v (quantized V needs flash attention).")
