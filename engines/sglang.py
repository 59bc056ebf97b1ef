"""SGLang (kind `sglang`): `python -m sglang.launch_server`, one phase, and its memory model.

`--mem-fraction-static` m is a fraction of the memory *free* when SGLang starts (measured after
its CUDA context, before the weights): the pool is m x F - weights (model_runner
profile_max_num_token: rest = free_after_weights - F x (1 - m)). lessor computes m at launch
from what is free then, and caps the pool with `--max-total-tokens`, so the pool is the one it
planned on a shared card too. Everything else SGLang holds comes out of (1 - m) x F: CUDA graphs,
the chunked prefill's activations, the request-to-token table; lessor pins each flag that sizes
them. Read from sgl-project/sglang (model_runner, server_args, mem_cache/memory_pool, v0.5.x)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..memory.context import ContextLimit, sglang_context_length
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Source
from ..memory.weights import kv_bytes_per_token
from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing
from .memory_model import TORCH_OOM, MiB, rank_weights
from .vllm import CUDA_CONTEXT, NCCL_FIRST_GROUP

MISC = 512 * MiB  # attention metadata, sampler, misc: server_args' reserve heuristic
PREFILL_PER_TOKEN = int(1.5 * MiB)  # server_args' heuristic per chunked-prefill token (at least 2048)
GRAPH_PER_BATCH = 2 * MiB  # server_args' heuristic per CUDA-graph batch size


class SGLangEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "SGLang"
    kv_param: ClassVar[str] = "max_total_tokens"
    batch_param: ClassVar[str] = "max_running_requests"
    kv_per_sequence: ClassVar[bool] = False
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = False
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 4096
    packages: ClassVar[tuple[str, ...]] = ("sglang", "torch")
    # SGLang's model_runner raises "Not enough memory. Please try to increase --mem-fraction-static."
    oom_markers: ClassVar[tuple[str, ...]] = TORCH_OOM + ("Not enough memory",)
    # entrypoints/http_server.py, after its warm-up request (_wait_and_warmup) succeeded.
    ready_markers: ClassVar[tuple[str, ...]] = ("The server is fired up and ready to roll!",)
    # --served-model-name is one string at v0.5.9 (server_args.py add_argument, type=str, no nargs).
    takes_aliases: ClassVar[bool] = False
    # SGLang's environment that changes the memory lessor planned (v0.5.9):
    #  SGLANG_MEMORY_SAVER_CUDA_GRAPH (environ.py:443): CUDA graphs in torch_memory_saver's pool;
    #  SGLANG_SYMM_MEM_PREALLOC_GB_SIZE (environ.py:483): symmetric memory preallocated per GPU (-1: none).
    memory_env: ClassVar[tuple[str, ...]] = ("SGLANG_MEMORY_SAVER_CUDA_GRAPH", "SGLANG_SYMM_MEM_PREALLOC_GB_SIZE")

    kind: Literal["sglang"] = Field(description="SGLang's server.")
    command: list[str] = Field(default_factory=lambda: ["python3", "-m", "sglang.launch_server"], min_length=1, description="The command that starts SGLang's server.")
    context_length: int | None = Field(default=None, ge=16, description="--context-length; planned when unset.")
    max_running_requests: int | None = Field(default=None, ge=1, description="--max-running-requests; planned when unset.")
    max_total_tokens: int | None = Field(default=None, ge=16, description="--max-total-tokens (KV pool size); planned when unset.")
    kv_cache_dtype: Literal["auto", "fp8_e5m2", "fp8_e4m3"] = Field(default="auto", description="--kv-cache-dtype.")
    chunked_prefill_size: int = Field(default=4096, ge=16, le=1 << 20, description="--chunked-prefill-size: tokens per prefill chunk, passed explicitly (SGLang's default depends on the card: 2048 below 35 GB, 8192 at 80 GB).")
    cuda_graph_max_bs: int | None = Field(default=None, ge=1, le=4096, description="--cuda-graph-max-bs; the planned max_running_requests when unset.")
    disable_cuda_graph: bool = Field(default=False, description="--disable-cuda-graph: no CUDA graphs.")

    def chunk_tokens(self) -> int:
        return self.chunked_prefill_size

    def decode_batch(self) -> int | None:
        return self.max_running_requests

    def context_limit(self, architecture) -> tuple[ContextLimit | None, bool]:
        return sglang_context_length(architecture), True  # model_config.py: ValueError above it

    def planned_flags(self, sizing: Sizing) -> Flags:
        # static_bytes: the weights and the pool, which --mem-fraction-static must cover of what
        # is free at launch; the fraction shown here is of an empty card (the adapter recomputes it).
        static = sizing.gpu_bytes - sizing.activation_bytes
        return Flags({"max_total_tokens": sizing.kv_tokens, "max_running_requests": sizing.batch,
                      "context_length": planned_context(self.context_length, sizing),
                      "chunked_prefill_size": self.chunked_prefill_size,
                      "cuda_graph_max_bs": None if self.disable_cuda_graph else self.cuda_graph_max_bs or sizing.batch,
                      "static_bytes": static,
                      "mem_fraction_static": int(static * 1000 // max(sizing.total_bytes, 1)) / 1000}, [], [])

    def footprint(self, shape: ModelShape) -> Footprint:
        a, tp = shape.architecture, shape.devices
        batch = self.max_running_requests or shape.batch
        graphs = 0 if self.disable_cuda_graph else GRAPH_PER_BATCH * (self.cuda_graph_max_bs or batch)
        kv_b = 1 if self.kv_cache_dtype.startswith("fp8") else 4 if shape.weight_format == "fp32" else 2
        # Every layer at full size, sliding-window ones too: v0.5.x caps --max-total-tokens before
        # it splits the pool between full and sliding layers (init_memory_pool), so the cap binds there.
        per_token = kv_bytes_per_token(a, k_v_bytes=(kv_b, kv_b), kv_heads=max(1, a.kv_heads // tp))
        rows = (batch + 1) * 4  # req_to_token: (max_running_requests + 1) x (context_length + 4) x int32
        context = [Component("cuda_context", CUDA_CONTEXT, Source.ESTIMATE, "a torch process's CUDA context "
                             "(vLLM 0.19 measured 0.51 GiB on an H100; SGLang does not log its own)")]
        if tp > 1:
            context.append(Component("nccl", NCCL_FIRST_GROUP, Source.ESTIMATE,
                                     "the tensor-parallel NCCL communicator (vLLM 0.19's measured first group)"))
        components = (
            rank_weights(shape, tp, 1, 0, range(a.num_hidden_layers)), *context,
            Component("activation", PREFILL_PER_TOKEN * max(self.chunked_prefill_size, 2048) + MISC, Source.ESTIMATE,
                      f"server_args' reserve: 1.5 MiB x a {self.chunked_prefill_size}-token prefill chunk + 512 MiB"),
            Component("cuda_graphs", graphs, Source.ESTIMATE,
                      "server_args' reserve: 2 MiB per CUDA-graph batch size" if graphs else "--disable-cuda-graph"),
            Component("req_to_token", rows * 4 * (self.context_length + 4) if self.context_length else rows * 4 * 4,
                      Source.FORMULA, f"ReqToTokenPool: ({batch} + 1) rows x (context_length + 4) x int32",
                      per_kv_token=0 if self.context_length else rows))
        device = DeviceFootprint(components, per_token, Source.FORMULA,
                                 "memory_pool cell_size: layers x max(1, KV heads / tp) x (K + V) x dtype; MLA: "
                                 "(kv_lora_rank + rope) x layers on every rank")
        return Footprint(tuple(device for _ in range(tp)))


def planned_context(given: int | None, sizing: Sizing) -> int:
    """--context-length: as given, else the pool, never above what SGLang derives from the model
    (it refuses a longer one at start)."""
    if given:
        return given
    return min(sizing.kv_tokens, sizing.context) if sizing.context else sizing.kv_tokens


class SGLangAdapter(ProcessAdapter):
    args_class = SGLangEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        argv = [*engine.command, *server_argv(launch, engine.kv_cache_dtype, p["max_running_requests"],
                                              p["max_total_tokens"], p["chunked_prefill_size"])]
        return Command(argv, {"HF_HUB_OFFLINE": "1"}, health_path="/health")


def server_argv(launch: Launch, kv_cache_dtype: str, running: int, total_tokens: int, chunk: int) -> list[str]:
    """SGLang's server flags for a planned launch (ktransformers' sglang path passes them too, its
    own names for the sizes): the model, where to listen, and every flag that decides memory."""
    p = launch.params
    graphs = ["--disable-cuda-graph"] if p["cuda_graph_max_bs"] is None else ["--cuda-graph-max-bs", str(p["cuda_graph_max_bs"])]
    return ["--model-path", launch.spec.engine.model_path, "--served-model-name", launch.spec.name,
            "--host", launch.host, "--port", str(launch.port),
            "--context-length", str(p["context_length"]), "--max-running-requests", str(running),
            "--max-total-tokens", str(total_tokens),
            "--mem-fraction-static", f"{launch_fraction(p['static_bytes'], launch):.3f}",
            "--chunked-prefill-size", str(chunk), "--kv-cache-dtype", kv_cache_dtype,
            "--tp-size", str(len(launch.gpus)), *graphs]


def launch_fraction(static_bytes: int, launch: Launch) -> float:
    """--mem-fraction-static for a pool of exactly what lessor planned: (weights + pool) over what
    SGLang will find free after its CUDA context (and NCCL with tp > 1), the least of its GPUs;
    rounded up, --max-total-tokens caps the pool at the planned tokens."""
    overhead = CUDA_CONTEXT + (NCCL_FIRST_GROUP if len(launch.gpus) > 1 else 0)
    free = min(g.free_bytes for g in launch.gpus) - overhead
    if free <= 0:
        return 1.0  # nothing is free: SGLang will say so ("Not enough memory")
    return min(1.0, -(-static_bytes * 1000 // free) / 1000)
