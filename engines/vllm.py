"""vLLM (kind `vllm`): `vllm serve`, one phase, and its memory model (vLLM 0.19.0).

lessor pins every flag that decides memory: `--kv-cache-memory-bytes` (vLLM then skips its own
profiling-based sizing, which would take whatever is free), `--max-num-batched-tokens` (the
profile run's activation peak), `--max-num-seqs` (the sampler's rows and the CUDA-graph sizes),
`--max-cudagraph-capture-size` or `--enforce-eager`, and the parallel sizes.

Sources are the vLLM 0.19.0 wheel's files (commit g2a69949bd); constants measured on an H100
80 GB come from llm-d-incubation/llm-d-planner PR #205 (../shared/calibration/)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from ..memory.context import ContextLimit, vllm_max_len
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Source
from ..memory.weights import kv_bytes_per_token
from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing
from .memory_model import TORCH_OOM, GiB, MiB, rank_weights

CALIBRATION = "vLLM 0.19.0 on H100 80GB, llm-d-planner PR #205"
CUDA_CONTEXT = int(0.51 * GiB)  # init_non_torch at tp=pp=1 (driver, cuBLAS handles)
NCCL_FIRST_GROUP = int(0.95 * GiB)  # the first group of size > 1: eager ncclCommInitRank + warm-up all_reduce
NCCL_EXTRA_GROUP = int(0.48 * GiB)  # each further group (PP beside TP; EP, which MoE models get at tp > 1)
CUSTOM_ALL_REDUCE = {2: 88 * MiB, 4: 64 * MiB}  # 2 x 8 MiB IPC buffers + 8 MiB rank data + the symm-mem buffer
NON_TORCH_FORWARD = {"tp": int(2.13 * GiB), "sampler": int(0.25 * GiB), "stage": int(0.07 * GiB)}
SAMPLER_SMS = 132  # H100/H200: the Triton top-k/top-p buffer keeps min(pow2(rows), SMs) rows
CUBLAS_WORKSPACE = 32 * MiB
GRAPH_BASE = int(0.37 * GiB)  # the graph pool of the largest size, 51 default sizes (estimate)
GRAPH_PER_LAYER = {"dense": 17.5 * MiB, "moe": 22 * MiB, "mla": 45 * MiB}  # per layer, 51 sizes (estimate)
DEFAULT_SIZES = 51


def capture_sizes(largest: int) -> list[int]:
    """vLLM's default CUDA-graph capture sizes up to `largest` (config/vllm.py:1343-1497)."""
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    return [s for s in sizes if s <= largest]


def stage_layers(layers: int, pp: int) -> list[int]:
    """get_pp_indices (distributed/utils.py:95-135): L // pp each; the remainder one each to the
    stages before the last, from pp-2 down."""
    counts = [layers // pp] * pp
    for i in range(layers % pp):
        counts[pp - 2 - i] += 1
    return counts


class VLLMEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "vLLM"
    kv_param: ClassVar[str] = "max_model_len"
    batch_param: ClassVar[str] = "max_num_seqs"
    kv_per_sequence: ClassVar[bool] = True
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = False
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 8192
    packages: ClassVar[tuple[str, ...]] = ("vllm", "torch")
    # vLLM 0.19 v1/core/kv_cache_utils.py: no room for the cache after profiling, or less than one
    # max_model_len sequence; torch's own when the profile run or a graph capture does not fit.
    oom_markers: ClassVar[tuple[str, ...]] = TORCH_OOM + ("No available memory for the cache blocks",
                                                          "larger than the available KV cache memory")
    # Its OpenAI server is uvicorn's, which logs this once the app (engine core included) started.
    ready_markers: ClassVar[tuple[str, ...]] = ("Application startup complete.",)
    takes_aliases: ClassVar[bool] = True  # --served-model-name takes several names (nargs="+")
    # vLLM 0.32 platforms/cpu.py:323-326: a non-empty VLLM_CPU_KVCACHE_SPACE (GiB) replaces
    # --kv-cache-memory-bytes on the CPU backend.
    memory_env: ClassVar[tuple[str, ...]] = ("VLLM_CPU_KVCACHE_SPACE",)

    kind: Literal["vllm"] = Field(description="vLLM's OpenAI server.")
    command: list[str] = Field(default_factory=lambda: ["vllm", "serve"], min_length=1, description="The command that starts vLLM's server, before the model path.")
    max_model_len: int | None = Field(default=None, ge=16, description="--max-model-len; planned when unset.")
    max_num_seqs: int | None = Field(default=None, ge=1, le=4096, description="--max-num-seqs: sequences at once (the sampler's rows and the CUDA-graph sizes); planned when unset.")
    max_num_batched_tokens: int = Field(default=8192, ge=16, le=1 << 20, description="--max-num-batched-tokens: tokens per forward pass (the prefill chunk); the activation peak grows with it.")
    enforce_eager: bool = Field(default=False, description="--enforce-eager: no CUDA graphs (less memory, slower decode).")
    max_cudagraph_capture_size: int | None = Field(default=None, ge=1, le=4096, description="--max-cudagraph-capture-size; vLLM's default when unset: min(2 x max_num_seqs, 512).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description="--pipeline-parallel-size; the tensor-parallel size is the placement's GPUs divided by it.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(default="auto", description="--kv-cache-dtype.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="--dtype.")

    def chunk_tokens(self) -> int:
        return self.max_num_batched_tokens

    def decode_batch(self) -> int | None:
        return self.max_num_seqs

    def context_limit(self, architecture) -> tuple[ContextLimit | None, bool]:
        # vLLM 0.32 config/model.py _get_and_verify_max_len: ValueError at start above it (without
        # VLLM_ALLOW_LONG_MAX_MODEL_LEN); the rule is in memory/context.py.
        return vllm_max_len(architecture), True

    def graph_largest(self, seqs: int) -> int:
        return min(self.max_cudagraph_capture_size or min(2 * seqs, 512), self.max_num_batched_tokens)

    def planned_flags(self, sizing: Sizing) -> Flags:
        # --gpu-memory-utilization only gates the start (free >= util x total, taken after the CUDA
        # context exists) once --kv-cache-memory-bytes is given: weights and KV as a fraction of
        # the card, rounded down, never more than lessor leased.
        held = sizing.gpu_bytes - sizing.activation_bytes
        fraction = max(int(held * 1000 // max(sizing.total_bytes, 1)) / 1000, 0.001)
        return Flags({"max_model_len": sizing.kv_tokens // sizing.batch, "max_num_seqs": sizing.batch,
                      "max_num_batched_tokens": self.max_num_batched_tokens,
                      "gpu_memory_utilization": fraction, "kv_cache_memory_bytes": sizing.kv_bytes,
                      "tensor_parallel_size": max(sizing.devices // self.pipeline_parallel_size, 1),
                      "pipeline_parallel_size": self.pipeline_parallel_size, "enforce_eager": self.enforce_eager,
                      "max_cudagraph_capture_size": None if self.enforce_eager else self.graph_largest(sizing.batch)},
                     [], [])

    def placement_problem(self, devices: int) -> str | None:
        if devices % self.pipeline_parallel_size:
            return (f"engine.pipeline_parallel_size: {self.pipeline_parallel_size} does not divide the placement's "
                    f"{devices} GPUs (tensor parallel x pipeline parallel = GPUs)")
        return None

    def footprint(self, shape: ModelShape) -> Footprint:
        if self.dtype == "float32" and shape.weight_format in ("bf16", "fp16"):  # --dtype decides unquantized weights
            shape = replace(shape, weight_format="fp32")
        pp = self.pipeline_parallel_size
        tp = max(shape.devices // pp, 1)
        layers = stage_layers(shape.architecture.num_hidden_layers, pp) if shape.architecture.num_hidden_layers >= pp \
            else [1] * pp
        stages = [_Rank(self, shape, tp, pp, stage, layers) for stage in range(pp)]
        return Footprint(tuple(stages[i // tp].device() for i in range(shape.devices)))


class _Rank:
    """One GPU of a vLLM deployment: a tensor-parallel rank of one pipeline stage."""

    def __init__(self, args: VLLMEngineArgs, shape: ModelShape, tp: int, pp: int, stage: int, layers: list[int]):
        self.args, self.shape, self.a = args, shape, shape.architecture
        self.tp, self.pp, self.stage = tp, pp, stage
        self.first_layer, self.layers = sum(layers[:stage]), layers[stage]
        self.first, self.last = stage == 0, stage == pp - 1
        self.b = 4 if shape.weight_format == "fp32" or args.dtype == "float32" else 2
        self.seqs = args.max_num_seqs or shape.batch

    def device(self) -> DeviceFootprint:
        return DeviceFootprint((self.weights(), *self.context(), self.activation(), self.graphs()),
                               self.kv_bytes_per_token(), Source.FORMULA,
                               "kv_cache_interface.py:72-87,191-205: per layer on this rank, 2 x max(1, KV heads / tp) "
                               "x head_dim x dtype; MLA: (kv_lora_rank + rope) x dtype on every rank")

    def weights(self) -> Component:
        return rank_weights(self.shape, self.tp, self.pp, self.stage, range(self.first_layer, self.first_layer + self.layers))

    def context(self) -> tuple[Component, ...]:
        out = [Component("cuda_context", CUDA_CONTEXT, Source.CONSTANT, f"init_non_torch_memory at tp=pp=1, {CALIBRATION}")]
        groups = (self.tp > 1) + (self.pp > 1) + (self.tp > 1 and bool(self.a.n_routed_experts))
        if groups:
            out.append(Component("nccl", NCCL_FIRST_GROUP + (groups - 1) * NCCL_EXTRA_GROUP
                                 + CUSTOM_ALL_REDUCE.get(self.tp, CUSTOM_ALL_REDUCE[2] if self.tp > 1 else 0),
                                 Source.CONSTANT, f"{groups} communicator group(s) (cuda_communicator.py:50-110; "
                                 f"custom_all_reduce.py:59,130-189); sizes from {CALIBRATION}"))
        key = "tp" if self.tp > 1 else "sampler" if self.last else "stage"
        out.append(Component("non_torch_forward", NON_TORCH_FORWARD[key], Source.CONSTANT,
                             f"non-torch memory gained in the profile run ({key}), {CALIBRATION}"))
        return tuple(out)

    def activation(self) -> Component:
        """The profile run's torch peak (gpu_model_runner.py:5721-5795): max(forward, sampler + MoE
        workspace) on the last stage, the forward pass elsewhere."""
        a, b, tp, t = self.a, self.b, self.tp, self.args.max_num_batched_tokens
        h, v = a.hidden_size, a.vocab_size
        rows = min(self.seqs, t)
        moe = 0
        if a.n_routed_experts:  # fused-MoE workspace, persistent (v1/worker/workspace.py), no chunking in 0.19
            k, inter = a.num_experts_per_tok, a.moe_intermediate_size // tp
            moe = b * (max(t * k * max(inter, h), t * h) + t * k * max(2 * inter, h))
        mlp = a.intermediate_size if not a.n_routed_experts or a.first_k_dense_replace else 0
        forward = t * b * (3 * mlp // tp + 7 * h)  # gate_up, act and ~7 hidden-sized tensors: a fit, not derived
        if not self.last:
            return Component("activation", forward + moe, Source.ESTIMATE,
                             f"forward pass of {t} tokens (no sampler before the last stage)")
        pow2 = 1 << max(rows - 1, 0).bit_length()
        sampler = (rows * v * b + (rows * v * 4 if b != 4 else 0) + 2 * rows * v * 4 + min(pow2, SAMPLER_SMS) * v * 4
                   + t * h * b + 2 * rows * h * b + CUBLAS_WORKSPACE)
        if forward > sampler + moe:
            return Component("activation", forward, Source.ESTIMATE, f"forward pass of {t} tokens (a fit to 0.19's profile run)")
        return Component("activation", sampler + moe, Source.FORMULA,
                         f"sampler over {rows} rows x {v} vocab (logits, fp32 copy, probs, q, top-k buffer)"
                         + (f" + fused-MoE workspace of {t} tokens" if moe else "") + " (gpu_model_runner.py:5556-5632)")

    def graphs(self) -> Component:
        if self.args.enforce_eager:
            return Component("cuda_graphs", 0, Source.FORMULA, "--enforce-eager: none captured")
        sizes = len(capture_sizes(self.args.graph_largest(self.seqs)))
        kind = "mla" if self.a.is_mla else "moe" if self.a.n_routed_experts else "dense"
        per_layer = GRAPH_PER_LAYER[kind] * self.layers * sizes / DEFAULT_SIZES
        return Component("cuda_graphs", int(GRAPH_BASE + per_layer), Source.ESTIMATE,
                         f"{sizes} capture sizes x {self.layers} layers, FULL_AND_PIECEWISE; scaled from {CALIBRATION}")

    def kv_bytes_per_token(self) -> int:
        a = self.a
        kv_b = 1 if self.args.kv_cache_dtype.startswith("fp8") else self.b
        return kv_bytes_per_token(a, k_v_bytes=(kv_b, kv_b), layers=self.layers, kv_heads=max(1, a.kv_heads // self.tp))


class VLLMAdapter(ProcessAdapter):
    args_class = VLLMEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        argv = [*engine.command, engine.model_path, "--served-model-name", launch.spec.name, *launch.spec.aliases,
                "--host", launch.host, "--port", str(launch.port),
                "--max-model-len", str(p["max_model_len"]), "--max-num-seqs", str(p["max_num_seqs"]),
                "--max-num-batched-tokens", str(p["max_num_batched_tokens"]),
                "--gpu-memory-utilization", f"{p['gpu_memory_utilization']:.3f}",
                "--kv-cache-memory-bytes", str(p["kv_cache_memory_bytes"]),
                "--kv-cache-dtype", engine.kv_cache_dtype, "--dtype", engine.dtype,
                "--tensor-parallel-size", str(p["tensor_parallel_size"]),
                "--pipeline-parallel-size", str(p["pipeline_parallel_size"])]
        if p["enforce_eager"]:
            argv.append("--enforce-eager")
        else:
            argv += ["--max-cudagraph-capture-size", str(p["max_cudagraph_capture_size"])]
        # Offline: a local folder only, and no usage report leaving the box. Its ZMQ sockets and
        # temporary files (TMPDIR) and its compile cache (VLLM_CACHE_ROOT, else ~/.cache/vllm, shared
        # by every model and version) in the model's own folder.
        return Command(argv, {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TMPDIR": socket_dir(launch),
                              "VLLM_CACHE_ROOT": str(launch.run_dir / "cache")}, health_path="/health")


def socket_dir(launch: Launch) -> str:
    """A TMPDIR of the engine's own. vLLM names its ZMQ sockets TMPDIR/<uuid4> (36 characters), and
    a unix socket's path holds at most 107 bytes: a deep state_dir (a test's tmp_path) gets a
    short folder in lessord's own temporary directory instead, made private to it."""
    tmp = launch.run_dir / "tmp"
    if len(str(tmp).encode()) + 37 > 107:
        tmp = Path(tempfile.gettempdir()) / f"lessor-{os.getuid()}-{launch.spec.name}"[:60]
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(tmp)
