"""vLLM's arguments (kind `vllm`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EngineArgsBase


class VLLMEngineArgs(EngineArgsBase):
    kind: Literal["vllm"] = Field(description="vLLM's OpenAI server.")
    max_model_len: int | None = Field(default=None, ge=16, description="--max-model-len; planned when unset.")
    max_num_seqs: int | None = Field(default=None, ge=1, description="--max-num-seqs; planned when unset.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(default="auto", description="--kv-cache-dtype.")
    dtype: Literal["auto", "bfloat16", "float16"] = Field(default="auto", description="--dtype.")
