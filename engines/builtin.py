"""The built-in torch engine's arguments (kind `torch`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EngineArgsBase


class TorchEngineArgs(EngineArgsBase):
    kind: Literal["torch"] = Field(description="The built-in torch engine.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(default="bfloat16", description="Weight and KV dtype.")
    max_batch_size: int | None = Field(default=None, ge=1, le=256, description="Sequences decoded together; planned when unset.")
    context_tokens: int | None = Field(default=None, ge=16, le=1 << 20, description="Tokens per sequence in the static KV cache; planned when unset.")
