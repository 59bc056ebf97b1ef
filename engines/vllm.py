"""vLLM (kind `vllm`): `vllm serve`, one phase. Its memory flags come from lessor's lease:
`--gpu-memory-utilization` is a fraction of the card's *total* memory, and
`--kv-cache-memory-bytes` pins the KV cache to the bytes granted (vLLM then skips its own
profiling-based sizing, which would take whatever is free)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing


class VLLMEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "vLLM"
    kv_param: ClassVar[str] = "max_model_len"
    batch_param: ClassVar[str] = "max_num_seqs"
    kv_per_sequence: ClassVar[bool] = True
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = False
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 512

    kind: Literal["vllm"] = Field(description="vLLM's OpenAI server.")
    command: list[str] = Field(default_factory=lambda: ["vllm", "serve"], min_length=1, description="The command that starts vLLM's server, before the model path.")
    max_model_len: int | None = Field(default=None, ge=16, description="--max-model-len; planned when unset.")
    max_num_seqs: int | None = Field(default=None, ge=1, description="--max-num-seqs; planned when unset.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(default="auto", description="--kv-cache-dtype.")
    dtype: Literal["auto", "bfloat16", "float16"] = Field(default="auto", description="--dtype.")

    def planned_flags(self, sizing: Sizing) -> Flags:
        # --gpu-memory-utilization is a fraction of the card's *total* memory, not of what is free:
        # computed from lessor's lease, rounded down so vLLM never takes more than it was granted.
        fraction = int(sizing.gpu_bytes * 1000 // max(sizing.total_bytes, 1)) / 1000
        kv_bytes = sizing.kv_bytes
        return Flags({"max_model_len": sizing.kv_tokens // sizing.batch, "max_num_seqs": sizing.batch,
                      "gpu_memory_utilization": fraction, "kv_cache_memory_bytes": kv_bytes}, [], [])


class VLLMAdapter(ProcessAdapter):
    args_class = VLLMEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        argv = [*engine.command, engine.model_path, "--served-model-name", launch.spec.name,
                "--host", launch.host, "--port", str(launch.port),
                "--max-model-len", str(p["max_model_len"]), "--max-num-seqs", str(p["max_num_seqs"]),
                "--gpu-memory-utilization", f"{p['gpu_memory_utilization']:.3f}",
                "--kv-cache-memory-bytes", str(p["kv_cache_memory_bytes"]),
                "--kv-cache-dtype", engine.kv_cache_dtype, "--dtype", engine.dtype,
                "--tensor-parallel-size", str(len(launch.gpus))]
        # Offline: a local folder only, and no usage report leaving the box.
        return Command(argv, {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}, health_path="/health")
