"""SGLang's arguments (kind `sglang`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EngineArgsBase


class SGLangEngineArgs(EngineArgsBase):
    kind: Literal["sglang"] = Field(description="SGLang's server.")
    context_length: int | None = Field(default=None, ge=16, description="--context-length; planned when unset.")
    max_running_requests: int | None = Field(default=None, ge=1, description="--max-running-requests; planned when unset.")
    max_total_tokens: int | None = Field(default=None, ge=16, description="--max-total-tokens (KV pool size); planned when unset.")
    kv_cache_dtype: Literal["auto", "fp8_e5m2", "fp8_e4m3"] = Field(default="auto", description="--kv-cache-dtype.")
