"""ktransformers (kind `ktransformers`): its two servers, their memory models and the parameter
rules that crash them when broken.

`server: sglang` (ktransformers >= 0.4, modelled at 0.7.2): SGLang with kt-kernel, `python -m
sglang.launch_server` from the kvcache-ai fork (PyPI `sglang-kt` 0.7.2, the version of
ktransformers' own third_party/sglang; its flags in tests/fixtures/cli/sglang-kt-0.7.2.txt). The
GPU holds what SGLang always puts there plus `--kt-num-gpu-experts` routed experts per MoE layer;
kt-kernel holds the routed experts in host RAM in `--kt-method`'s format. The pool and
`--mem-fraction-static` follow engines/sglang.py. `server: legacy`: the balance_serve server of
ktransformers <= 0.3 (`python -m ktransformers.server.main`, read at v0.3.2), with its own
config.yaml in a private HOME: its rules, memory model and HOME are engines/ktransformers_legacy.py's.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..memory.context import ContextLimit, sglang_context_length, trained_context
from ..memory.footprint import Component, Footprint, ModelShape, Part, Source
from ..memory.params import param_counts
from ..memory.weights import FORMATS, nbytes
from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing, absolute_path
from .ktransformers_legacy import (
    CUDA_PAGE_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    cache_lens_rule,
    chunk_size_rule,
    legacy_flags,
    legacy_footprint,
    max_batch_size_rule,
    page_size_rule,
    rounded_pages,
    write_engine_home,
)
from .memory_model import TORCH_OOM
from .sglang import SGLangEngineArgs, planned_context, server_argv

# sglang-kt 0.7.2 (kvcache-ai/sglang, PyPI sglang-kt; ktransformers 0.7.2).
SGLANG_CHUNK_TOKENS = 4096  # --chunked-prefill-size lessor passes when chunk_size is unset (kt's docs use 4096)
KT_METHODS = ("AMXINT4", "AMXINT8", "RAWINT4", "FP8", "FP8_PERCHANNEL", "BF16", "LLAMAFILE")
# Bits per routed-expert weight in host RAM, per --kt-method (estimates: kt-kernel keeps per-row or
# per-group scales beside the integers; LLAMAFILE reads a GGUF, taken as Q4_K_M as in kt's docs).
KT_METHOD_BITS = {"AMXINT4": 4.5, "AMXINT8": 8.25, "RAWINT4": 4.5, "FP8": FORMATS["fp8"][0],
                  "FP8_PERCHANNEL": 8.0, "BF16": 16.0, "LLAMAFILE": FORMATS["q4_k_m"][0]}


def _check(message: str | None, value):
    if message:
        raise ValueError(message)
    return value


class KTransformersEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "ktransformers"
    kv_param: ClassVar[str] = "cache_lens"
    batch_param: ClassVar[str] = "max_batch_size"
    kv_per_sequence: ClassVar[bool] = False  # cache_lens is shared by all sequences
    two_phase: ClassVar[bool] = False  # it reserves cache_lens before it loads the weights
    hybrid: ClassVar[bool] = True
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = DEFAULT_CHUNK_TOKENS
    packages: ClassVar[tuple[str, ...]] = ("ktransformers", "torch")
    oom_markers: ClassVar[tuple[str, ...]] = TORCH_OOM + ("Not enough memory",)  # the latter: SGLang's model_runner
    # sglang-kt is SGLang's server (http_server.py logs it after its warm-up request); the legacy
    # server is uvicorn's, which logs the other once the app started.
    ready_markers: ClassVar[tuple[str, ...]] = ("The server is fired up and ready to roll!", "Application startup complete.")
    # Both servers take one name: sglang-kt 0.7.2's --served-model-name is one string (server_args.py:4487,
    # no nargs), the legacy --model_name too (server/args.py, v0.3.2).
    takes_aliases: ClassVar[bool] = False
    # What the engine reads from its environment that changes the memory lessor planned:
    #  SGLANG_MEMORY_SAVER_CUDA_GRAPH: sglang-kt 0.7.2 environ.py:449, CUDA graphs in a memory saver pool
    #    (model_executor/cuda_graph_runner.py:760).
    #  SGLANG_SYMM_MEM_PREALLOC_GB_SIZE: sglang-kt 0.7.2 environ.py:563, preallocated symmetric memory
    #    (model_runner.py:2801).
    #  SGLANG_KT_BYPASS_GPU_MOE: kt_ep_wrapper.py:5965 (0.7.2), the GPU experts skipped (their memory held for nothing).
    # (HOME, where the legacy server reads config.yaml from, server/config/config.py:35 at v0.3.2, is
    # not claimed: the legacy adapter sets it, and the sglang path needs the inherited one.)
    memory_env: ClassVar[tuple[str, ...]] = ("SGLANG_MEMORY_SAVER_CUDA_GRAPH", "SGLANG_SYMM_MEM_PREALLOC_GB_SIZE",
                                             "SGLANG_KT_BYPASS_GPU_MOE")

    kind: Literal["ktransformers"] = Field(description="ktransformers (hybrid CPU/GPU MoE serving).")
    # sglang by default: ktransformers 0.4 on serves only through SGLang with kt-kernel (0.7 ships
    # no ktransformers.server.main), so that is what an operator installing it today runs. A config
    # written for the legacy server before this field existed (gguf_path, no kt_weight_path) keeps
    # meaning it (_server_of_older_configs).
    server: Literal["sglang", "legacy"] = Field(default="sglang", description="Which server: 'sglang' (ktransformers >= 0.4: `python -m sglang.launch_server` of sglang-kt with kt-kernel) or 'legacy' (ktransformers <= 0.3: `python -m ktransformers.server.main`, balance_serve).")
    command: list[str] | None = Field(default=None, min_length=1, description="The command that starts the server; by server: ['python3', '-m', 'sglang.launch_server'] or ['python3', '-m', 'ktransformers.server.main'].")
    gguf_path: str | None = Field(default=None, validate_default=True, description="legacy: folder of the GGUF weights (experts stay on the CPU); required there.")
    optimize_config_path: str | None = Field(default=None, description="legacy: --optimize_config_path, the injection rules YAML (e.g. DeepSeek-V3-Chat-serve.yaml).")
    backend: Literal["balance_serve", "ktransformers"] = Field(default="balance_serve", description="legacy: --backend_type.")
    page_size: int = Field(default=CUDA_PAGE_TOKENS, ge=1, description="legacy: KV page size in tokens; a multiple of 256 on CUDA.")
    cache_lens: int | None = Field(default=None, ge=1, description="Total KV tokens on the GPU (all sequences): --cache_lens (legacy, a multiple of page_size) or --max-total-tokens (sglang); planned when unset.")
    max_batch_size: int | None = Field(default=None, ge=1, le=64, description="Sequences served together: --max_batch_size (legacy) or --max-running-requests (sglang); planned when unset.")
    chunk_size: int | None = Field(default=None, ge=1, description="Prefill chunk in tokens: --chunk_size (legacy: at most 1024, or a multiple of 1024; default 256) or --chunked-prefill-size (sglang; default 4096).")
    cpu_infer: int | None = Field(default=None, ge=1, description="CPU threads for the experts: --cpu_infer (legacy) or --kt-cpuinfer (sglang; the host's physical cores when unset).")
    max_new_tokens: int = Field(default=1024, ge=1, description="legacy: --max_new_tokens per request.")
    release: Literal["0.2", "0.3"] = Field(default="0.3", description="legacy: the installed server: '0.2' (up to 0.2.4post1) reserves the KV cache before it loads the weights and captures graphs {1, 2, 3, max_batch_size, 64, chunk_size}; '0.3' (0.3.1 on) loads the weights first and adds 256 and 512.")
    kt_weight_path: str | None = Field(default=None, description="sglang: --kt-weight-path, the folder of the CPU experts' weights (converted for the AMX methods, a GGUF for LLAMAFILE); model_path when unset, as the native methods (FP8, BF16, RAWINT4) read the checkpoint itself.")
    kt_method: Literal["AMXINT4", "AMXINT8", "RAWINT4", "FP8", "FP8_PERCHANNEL", "BF16", "LLAMAFILE"] = Field(default="AMXINT4", description="sglang: --kt-method, the CPU experts' format (it sets their host RAM).")
    kt_num_gpu_experts: int | None = Field(default=None, ge=0, description="sglang: --kt-num-gpu-experts, routed experts per MoE layer kept on the GPU; planned from the GPU budget when unset.")
    kt_threadpool_count: int | None = Field(default=None, ge=1, le=64, description="sglang: --kt-threadpool-count, one pool per NUMA node; the host's NUMA nodes when unset.")
    kt_max_deferred_experts_per_token: int | None = Field(default=None, ge=0, le=8, description="sglang: --kt-max-deferred-experts-per-token (0 off; 1-4 kt's advice); the engine's default when unset.")
    context_length: int | None = Field(default=None, ge=16, description="sglang: --context-length; the KV pool when unset.")
    kv_cache_dtype: Literal["auto", "fp8_e5m2", "fp8_e4m3"] = Field(default="auto", description="sglang: --kv-cache-dtype.")
    cuda_graph_max_bs: int | None = Field(default=None, ge=1, le=4096, description="sglang: --cuda-graph-max-bs; the planned max_batch_size when unset.")
    disable_cuda_graph: bool = Field(default=False, description="sglang: --disable-cuda-graph: no CUDA graphs.")

    @model_validator(mode="before")
    @classmethod
    def _server_of_older_configs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "server" not in data and data.get("gguf_path") and not data.get("kt_weight_path"):
            return {**data, "server": "legacy"}
        return data

    @field_validator("gguf_path")
    @classmethod
    def _gguf_for_legacy(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None and info.data.get("server") == "legacy":
            raise ValueError("required with server: legacy (the folder of the GGUF weights the experts are read from); "
                             "set it, or set server: sglang (with kt_weight_path) for ktransformers >= 0.4")
        return None if path is None else absolute_path(path)

    @field_validator("optimize_config_path", "kt_weight_path")
    @classmethod
    def _absolute_config(cls, path: str | None) -> str | None:
        return None if path is None else absolute_path(path)

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, v: int) -> int:
        return _check(page_size_rule(v), v)

    @field_validator("cache_lens")
    @classmethod
    def _cache_lens(cls, v: int | None, info: ValidationInfo) -> int | None:
        page = info.data.get("page_size")
        if v is None or page is None or info.data.get("server") != "legacy":
            return v
        return _check(cache_lens_rule(v, page), v)

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        return v if v is None or info.data.get("server") != "legacy" else _check(chunk_size_rule(v), v)

    @field_validator("max_batch_size")
    @classmethod
    def _max_batch_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None or info.data.get("server") != "legacy":
            return v
        return _check(max_batch_size_rule(v, info.data.get("backend", "balance_serve")), v)

    def kv_granule(self, batch: int = 1) -> int:
        return self.page_size if self.server == "legacy" else 1  # SGLang's --page-size defaults to 1

    def context_limit(self, architecture) -> tuple[ContextLimit | None, bool]:
        if self.server == "sglang":  # sglang-kt 0.7.2 derives it as SGLang does
            return sglang_context_length(architecture), True
        # The legacy server (balance_serve, v0.3.2) reads the config with transformers and checks a
        # request only against cache_lens: past the trained context it runs without a word.
        return trained_context(architecture), False

    def rounded_kv(self, value: int, batch: int) -> tuple[int, str | None]:
        if self.server != "legacy" or value % self.page_size == 0:
            return value, None
        held = rounded_pages(value, self.page_size)
        return held, (f"engine.cache_lens {value} is not a whole number of {self.page_size}-token pages: ktransformers' "
                      f"scheduler keeps whole pages, rounded down (scheduler.cpp:73-77, v0.3.2), so it holds {held} "
                      f"tokens; planned as {held}")

    def chunk_tokens(self) -> int:
        return self.chunk_size or (self.default_chunk_tokens if self.server == "legacy" else SGLANG_CHUNK_TOKENS)

    def decode_batch(self) -> int | None:
        return self.max_batch_size

    def server_command(self) -> list[str]:
        if self.command:
            return list(self.command)
        return ["python3", "-m", "ktransformers.server.main" if self.server == "legacy" else "sglang.launch_server"]

    def version_query(self) -> tuple[list[str], tuple[str, ...]]:
        return self.server_command(), self.packages if self.server == "legacy" else ("sglang-kt", "kt-kernel", "torch")

    def graph_sizes(self, batch: int) -> list[int]:
        """model_runner.py:42-52 (generate_cuda_graphs) at v0.3.2; v0.2.4: model_runner.py:57."""
        chunk = self.chunk_tokens()
        sizes = {1, 2, 3, batch, 64, chunk} | ({256, 512} if self.release == "0.3" else set())
        return sorted(sizes | set(range(1024, chunk + 1, 1024)))

    def footprint(self, shape: ModelShape) -> Footprint:
        return legacy_footprint(self, shape) if self.server == "legacy" else self._sglang_footprint(shape)

    def planned_flags(self, sizing: Sizing) -> Flags:
        return legacy_flags(self, sizing) if self.server == "legacy" else self._sglang_flags(sizing)

    # -- server: sglang (sglang-kt 0.7.2) --

    def sglang_args(self) -> SGLangEngineArgs:
        """SGLang's own arguments for what SGLang sizes the same way with kt-kernel beside it."""
        return SGLangEngineArgs(kind="sglang", model_path=self.model_path, context_length=self.context_length,
                                max_running_requests=self.max_batch_size, max_total_tokens=self.cache_lens,
                                kv_cache_dtype=self.kv_cache_dtype, chunked_prefill_size=self.chunk_tokens(),
                                cuda_graph_max_bs=self.cuda_graph_max_bs, disable_cuda_graph=self.disable_cuda_graph)

    def _sglang_footprint(self, shape: ModelShape) -> Footprint:
        a = shape.architecture
        base = self.sglang_args().footprint(shape)
        per_layer = gpu_experts_per_layer(self, shape)
        routed, on_gpu = routed_rank_bytes(shape, a.n_routed_experts), routed_rank_bytes(shape, per_layer)
        staging = self.chunk_tokens() * a.hidden_size * 2
        devices = []
        for device in base.devices:
            parts = []
            for c in device.components:
                if c.name == "weights":
                    c = replace(c, bytes=c.bytes - routed + on_gpu, basis=(
                        f"{c.basis}; of the routed experts only {per_layer} per MoE layer x {a.moe_layers} layers "
                        "(kt_ep_wrapper.py:4606-4612, create_weights:5255 in sglang-kt 0.7.2)"))
                parts.append(c)
            parts.append(Component("kt_staging", staging, Source.FORMULA,
                                   f"the CPU experts' shared input buffer: {self.chunk_tokens()} tokens x hidden x bf16 "
                                   "(kt_ep_wrapper.py:568-596, sglang-kt 0.7.2)"))
            devices.append(replace(device, components=tuple(parts)))
        p = param_counts(a)
        cpu_experts = p.routed_experts if shape.experts_on_cpu else 0
        host = (Component("host_weights", nbytes(cpu_experts, KT_METHOD_BITS[self.kt_method]), Source.ESTIMATE,
                          f"every routed expert in kt-kernel's {self.kt_method} layout ({KT_METHOD_BITS[self.kt_method]:.2f} "
                          "bits a weight, scales included: estimate); kt-kernel loads them all, the GPU mask only skips "
                          "their compute (operators/amx/moe_base.hpp:212, ktransformers 0.7.0)", Part.WEIGHTS),)
        return Footprint(tuple(devices), host, base.notes)

    def _sglang_flags(self, sizing: Sizing) -> Flags:
        # static_bytes, as engines/sglang.py: the weights (GPU experts included) and the pool, which
        # --mem-fraction-static must cover of what is free at launch (the adapter computes the fraction).
        static = sizing.gpu_bytes - sizing.activation_bytes
        params = {"cache_lens": sizing.kv_tokens, "max_batch_size": sizing.batch, "chunk_size": self.chunk_tokens(),
                  "context_length": planned_context(self.context_length, sizing),
                  "cuda_graph_max_bs": None if self.disable_cuda_graph else self.cuda_graph_max_bs or sizing.batch,
                  "static_bytes": static, "mem_fraction_static": int(static * 1000 // max(sizing.total_bytes, 1)) / 1000,
                  "kt_num_gpu_experts": self.kt_num_gpu_experts or 0, "kt_method": self.kt_method,
                  "cpu_infer": self.cpu_infer, "kt_threadpool_count": self.kt_threadpool_count}
        warnings = [] if self.kt_weight_path or self.kt_method not in ("AMXINT4", "AMXINT8", "LLAMAFILE") else [
            f"engine.kt_weight_path unset: kt-kernel's {self.kt_method} reads converted expert weights, and will look "
            "for them in model_path; set kt_weight_path to the converted folder"]
        return Flags(params, [], warnings)

    def fitted(self, shape: ModelShape, room_bytes: int, kv_tokens: int) -> KTransformersEngineArgs:
        return self.with_gpu_experts(shape, room_bytes, kv_tokens)

    def with_gpu_experts(self, shape: ModelShape, room_bytes: int, kv_tokens: int) -> KTransformersEngineArgs:
        """These arguments with kt_num_gpu_experts set to the most routed experts per MoE layer that
        fit `room_bytes` (per GPU: what is left for the model after everything but its experts) beside
        a pool of `kv_tokens`; kept as set where the operator set it."""
        if self.server != "sglang" or self.kt_num_gpu_experts is not None:
            return self
        none = self.model_copy(update={"kt_num_gpu_experts": 0, "cache_lens": self.cache_lens or kv_tokens})
        used = max(_gpu_need(none.footprint(shape), kv_tokens))
        one = routed_rank_bytes(shape, 1)
        fit = max(0, room_bytes - used) // one if one else 0
        return self.model_copy(update={"kt_num_gpu_experts": min(shape.architecture.n_routed_experts, fit)})


def _gpu_need(footprint: Footprint, kv_tokens: int) -> list[int]:
    return [sum(c.bytes for c in d.components) + int(kv_tokens * d.kv_rate) for d in footprint.devices]


def gpu_experts_per_layer(args: KTransformersEngineArgs, shape: ModelShape) -> int:
    """Routed experts per MoE layer on the GPU: --kt-num-gpu-experts (per layer: kt_ep_wrapper.py:4606,
    sglang-kt 0.7.2), all of them where the placement keeps experts on the GPU."""
    if not shape.experts_on_cpu:
        return shape.architecture.n_routed_experts
    return min(args.kt_num_gpu_experts or 0, shape.architecture.n_routed_experts)


def routed_rank_bytes(shape: ModelShape, per_layer: int) -> int:
    """Bytes on one GPU of `per_layer` routed experts in every MoE layer: gate, up and down
    (3 x hidden x moe_intermediate) in the GPU checkpoint's format, the intermediate split over tp
    (SGLang's moe_tp_size)."""
    a = shape.architecture
    params = 3 * a.hidden_size * a.moe_intermediate_size * per_layer * a.moe_layers // max(shape.devices, 1)
    return nbytes(params, FORMATS[shape.weight_format][0])


def physical_cores() -> int:
    """kt's docs want --kt-cpuinfer at the physical cores, not the hyperthreads: distinct
    core_cpus of the CPUs this process may use (os.cpu_count where sysfs does not say)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(1, len(cores))


def numa_nodes() -> int:
    """One kt thread pool per NUMA node (kt's docs); 1 where sysfs lists none."""
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


class KTransformersAdapter(ProcessAdapter):
    """One phase either way. legacy: ktransformers reserves its KV cache (cache_lens) before it
    loads the weights, and each model gets its own HOME with a config.yaml that agrees with the
    flags. sglang: SGLang's memory flags (as engines/sglang.py) and kt-kernel's."""

    args_class = KTransformersEngineArgs

    def command(self, launch: Launch) -> Command:
        return self._legacy(launch) if launch.spec.engine.server == "legacy" else self._sglang(launch)

    def _sglang(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        argv = [*engine.server_command(), "--trust-remote-code",
                *server_argv(launch, engine.kv_cache_dtype, p["max_batch_size"], p["cache_lens"], p["chunk_size"]),
                "--kt-weight-path", engine.kt_weight_path or engine.model_path, "--kt-method", p["kt_method"],
                "--kt-num-gpu-experts", str(p["kt_num_gpu_experts"]),
                "--kt-cpuinfer", str(p["cpu_infer"] or physical_cores()),
                "--kt-threadpool-count", str(p["kt_threadpool_count"] or numa_nodes())]
        if engine.kt_max_deferred_experts_per_token is not None:
            argv += ["--kt-max-deferred-experts-per-token", str(engine.kt_max_deferred_experts_per_token)]
        return Command(argv, {"HF_HUB_OFFLINE": "1"}, health_path="/health")

    def _legacy(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        home_env = write_engine_home(launch.run_dir / "home", p)
        argv = [*engine.server_command(), "--model_path", engine.model_path, "--gguf_path", engine.gguf_path,
                "--model_name", launch.spec.name, "--host", launch.host, "--port", str(launch.port),
                "--backend_type", engine.backend, "--cache_lens", str(p["cache_lens"]),
                "--max_batch_size", str(p["max_batch_size"]), "--chunk_size", str(p["chunk_size"]),
                "--max_new_tokens", str(p["max_new_tokens"])]
        argv += ["--cpu_infer", str(engine.cpu_infer)] if engine.cpu_infer else []
        argv += ["--optimize_config_path", engine.optimize_config_path] if engine.optimize_config_path else []
        return Command(argv, {**home_env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                       health_path="/v1/models")
