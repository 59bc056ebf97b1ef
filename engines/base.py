"""What every engine's arguments share."""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from pydantic import BaseModel, ConfigDict, Field


class EngineArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(description="Local path of the model (HF folder or GGUF file); never a hub id.", min_length=1)
    extra_args: list[str] = Field(default_factory=list, description="Extra argv tokens appended to the engine's command, passed without a shell.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the engine process.")
    port: int | None = Field(default=None, ge=1024, le=65535, description="Port the engine listens on; chosen free by lessor when unset.")


class EngineHandle(Protocol):
    """A started engine process, as the supervisor drives it through the load protocol."""

    pid: int | None
    started_at: float | None

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        """Return once the weights are in (or usage stopped growing); raise on crash or timeout."""

    async def allocate_kv(self, kv_tokens: int, kv_bytes: int) -> None:
        """Let the engine allocate its KV cache of this size (engines that load in one phase ignore it)."""

    async def wait_ready(self, timeout_s: float) -> None: ...

    def measure(self) -> dict[str, int]:
        """Bytes the engine uses now, per device."""

    async def stop(self, grace_s: float) -> None: ...


class EngineAdapter(Protocol):
    kind: str

    async def start(self, spec: Any, params: Mapping[str, Any], kv_tokens: int) -> EngineHandle: ...
