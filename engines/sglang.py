"""SGLang (kind `sglang`): `python -m sglang.launch_server`, one phase. `--mem-fraction-static`
(weights + KV pool, a fraction of total memory) and `--max-total-tokens` come from the lease."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing


class SGLangEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "SGLang"
    kv_param: ClassVar[str] = "max_total_tokens"
    batch_param: ClassVar[str] = "max_running_requests"
    kv_per_sequence: ClassVar[bool] = False
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = False
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 512

    kind: Literal["sglang"] = Field(description="SGLang's server.")
    command: list[str] = Field(default_factory=lambda: ["python3", "-m", "sglang.launch_server"], min_length=1, description="The command that starts SGLang's server.")
    context_length: int | None = Field(default=None, ge=16, description="--context-length; planned when unset.")
    max_running_requests: int | None = Field(default=None, ge=1, description="--max-running-requests; planned when unset.")
    max_total_tokens: int | None = Field(default=None, ge=16, description="--max-total-tokens (KV pool size); planned when unset.")
    kv_cache_dtype: Literal["auto", "fp8_e5m2", "fp8_e4m3"] = Field(default="auto", description="--kv-cache-dtype.")

    def planned_flags(self, sizing: Sizing) -> Flags:
        # --mem-fraction-static covers weights and the KV pool, as a fraction of total memory.
        static = sizing.gpu_bytes - sizing.activation_bytes
        return Flags({"max_total_tokens": sizing.kv_tokens, "max_running_requests": sizing.batch,
                      "context_length": self.context_length or sizing.kv_tokens,
                      "mem_fraction_static": int(static * 1000 // max(sizing.total_bytes, 1)) / 1000}, [], [])


class SGLangAdapter(ProcessAdapter):
    args_class = SGLangEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        argv = [*engine.command, "--model-path", engine.model_path, "--served-model-name", launch.spec.name,
                "--host", launch.host, "--port", str(launch.port),
                "--context-length", str(p["context_length"]), "--max-running-requests", str(p["max_running_requests"]),
                "--max-total-tokens", str(p["max_total_tokens"]),
                "--mem-fraction-static", f"{p['mem_fraction_static']:.3f}",
                "--kv-cache-dtype", engine.kv_cache_dtype, "--tp-size", str(len(launch.gpus))]
        return Command(argv, {"HF_HUB_OFFLINE": "1"}, health_path="/health")
