"""llama.cpp's server (kind `llamacpp`): `llama-server`, or llama-cpp-python's `python -m
llama_cpp.server`. Both size their KV cache from flags at start (one phase)."""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

from pydantic import Field

from ..memory.context import ContextLimit, trained_context
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from ..memory.params import param_counts
from ..memory.weights import FORMATS, nbytes
from .base import Command, EngineArgsBase, Flags, Launch, ProcessAdapter, Sizing
from .memory_model import CUDA_CONTEXT_ESTIMATE

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
# llama-cpp-python takes cache types as ggml_type numbers.
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
# Bytes per element of each cache type, block scales included (q8_0: 32 int8 + an fp16 scale per 34 bytes).
GGML_TYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                   "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
UNQUANTIZED = ("f32", "f16", "bf16")  # cache types that need no flash attention
# Read at upstream 3514e9f6 (Dec 2025): src/llama-model.cpp load_tensors, src/llama-context.cpp,
# src/llama-kv-cache.cpp. Not in its log lines: the CUDA context and ggml's on-demand pool.


class LlamaCppEngineArgs(EngineArgsBase):
    title: ClassVar[str] = "llama.cpp's server"
    kv_param: ClassVar[str] = "ctx_size"
    batch_param: ClassVar[str] = "parallel"
    kv_per_sequence: ClassVar[bool] = False  # -c is shared by all slots
    two_phase: ClassVar[bool] = False
    hybrid: ClassVar[bool] = True
    max_devices: ClassVar[int | None] = None
    default_chunk_tokens: ClassVar[int] = 512
    packages: ClassVar[tuple[str, ...]] = ()  # llama-server says its build with --version
    # ggml-cuda.cu: "cudaMalloc failed: out of memory"; ggml-alloc.c / ggml-backend.cpp: "failed to
    # allocate ... buffer"; llama-context: "failed to allocate compute buffers" / KV "failed to allocate buffer".
    oom_markers: ClassVar[tuple[str, ...]] = ("out of memory", "failed to allocate", "unable to allocate")
    # llama-server (tools/server/server.cpp) logs the first when it listens and the second when the
    # model is in (its /health says 503 until then); llama-cpp-python's server is uvicorn's.
    ready_markers: ClassVar[tuple[str, ...]] = ("server is listening on", "all slots are idle",
                                                "Application startup complete.")
    # llama-server's --alias takes several names, llama-cpp-python's --model_alias one: the router
    # rewrites an alias for both.
    takes_aliases: ClassVar[bool] = False
    # llama-server reads every option from LLAMA_ARG_<NAME> (common/arg.cpp set_env): a flag lessor
    # passes wins, but one it does not (--cpu-moe, --no-kv-offload, ...) would change memory;
    # GGML_CUDA_ENABLE_UNIFIED_MEMORY lets CUDA allocations spill to host RAM. llama-cpp-python
    # 0.3.36 reads its ModelSettings fields from the environment (pydantic-settings, any case):
    # those it is not passed that decide memory.
    memory_env: ClassVar[tuple[str, ...]] = ("LLAMA_ARG_*", "GGML_CUDA_ENABLE_UNIFIED_MEMORY", "OFFLOAD_KQV",
                                             "LOGITS_ALL", "SPLIT_MODE", "TENSOR_SPLIT", "MAIN_GPU", "CACHE",
                                             "CACHE_SIZE", "CACHE_TYPE", "DRAFT_MODEL", "USE_MLOCK")

    kind: Literal["llamacpp"] = Field(description="llama.cpp's llama-server.")
    server: Literal["llama-server", "llama-cpp-python"] = Field(default="llama-server", description="Which server: llama.cpp's `llama-server` binary, or `python -m llama_cpp.server` (llama-cpp-python).")
    binary: str = Field(default="llama-server", min_length=1, description="llama-server executable (name on PATH or absolute path); for llama-cpp-python, the Python that has it (default: lessor's own).")
    ctx_size: int | None = Field(default=None, ge=16, description="-c: total KV tokens shared by all slots; planned when unset.")
    parallel: int | None = Field(default=None, ge=1, le=256, description="--parallel: slots served at once; planned when unset.")
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-ngl: layers offloaded to the GPU, -1 for all.")
    cache_type_k: CacheType = Field(default="f16", description="--cache-type-k.")
    cache_type_v: CacheType = Field(default="f16", description="--cache-type-v (quantized V needs flash attention).")
    threads: int | None = Field(default=None, ge=1, le=1024, description="-t: CPU threads; the server's default when unset.")
    flash_attn: Literal["on", "off"] = Field(default="on", description="-fa: flash attention, passed explicitly (builds differ in what 'auto' picks). Off, the compute buffer grows with the context: n_ctx x ubatch x heads x 4 B.")
    ubatch_size: int = Field(default=512, ge=1, le=65536, description="-ub: tokens per physical batch; sizes the compute buffer.")
    batch_size: int = Field(default=2048, ge=1, le=1 << 20, description="-b: tokens per logical batch.")
    swa_full: bool = Field(default=False, description="--swa-full: full-size KV cache for sliding-window layers too (Gemma 2/3); off, each such layer keeps about window x slots + ubatch cells.")
    kv_unified: bool = Field(default=False, description="-kvu: one KV cache shared by all slots (llama-server's own choice when --parallel is not given); off, each slot gets ctx_size / parallel.")

    def version_query(self) -> tuple[list[str], tuple[str, ...]]:
        if self.server == "llama-cpp-python":
            return [sys.executable if self.binary == "llama-server" else self.binary], ("llama_cpp_python",)
        return [self.binary], ()

    def chunk_tokens(self) -> int:
        return self.ubatch_size

    def kv_granule(self, batch: int = 1) -> int:
        # Whole padded blocks for every slot: the cells llama.cpp makes (held_cells) are the ones leased.
        return CELL_PAD * (1 if self.kv_unified else self.parallel or batch)

    def rounded_kv(self, value: int, batch: int) -> tuple[int, str | None]:
        slots = 1 if self.kv_unified else self.parallel or batch
        held = held_cells(value, slots)
        if held == value:
            return value, None
        each = "" if slots == 1 else f", and each of the {slots} slots' share too"
        return held, (f"engine.ctx_size {value}: llama.cpp pads the context up to whole {CELL_PAD}-cell blocks{each} "
                      f"(llama-context.cpp, 3514e9f6), so it holds {held} cells; planned as {held}")

    def context_limit(self, architecture) -> tuple[ContextLimit | None, bool]:
        # src/llama-context.cpp (3514e9f6): a slot's context above n_ctx_train (the GGUF's
        # <arch>.context_length) only warns "possible training context overflow".
        return trained_context(architecture), False

    def footprint(self, shape: ModelShape) -> Footprint:
        """Layers split evenly over the devices (--tensor-split 1,1,...), the output layer on the
        last; token_embd always in host RAM ("there is very little benefit to offloading the
        input layer", llama-model.cpp load_tensors)."""
        a, n = shape.architecture, shape.devices
        p = param_counts(a)
        linear_bits, embed_bits, head_bits = FORMATS[shape.weight_format]
        k, v = self.kv_element_bytes()
        share = layer_split(a.num_hidden_layers, n)
        devices, first = [], 0
        for i, layers in enumerate(share):
            span = range(first, first + layers)
            first += layers
            experts = sum(p.routed_experts // max(a.moe_layers, 1) for j in span if a.is_moe_layer(j)) \
                if shape.experts_on_cpu else 0
            body = nbytes(sum(p.layers[j] for j in span) - experts, linear_bits)
            last = i == n - 1
            # A tied model's output is token_embd loaded a second time, onto the output's device.
            # (llama-quantize gives a tied token_embd the output's type: Q6_K in Q4_K_M.)
            head = (nbytes(p.embedding, head_bits) if a.tie_word_embeddings else nbytes(p.lm_head, head_bits)) if last else 0
            sliding = [j for j in span if a.is_sliding_layer(j)] if not self.swa_full else []
            components = [] if not sliding else [self._swa_cache(a, len(sliding), k, v, self.parallel or shape.batch)]
            devices.append(DeviceFootprint(
                (*components, Component("weights", body + head, Source.FORMULA,
                           f"{layers} layers in {shape.weight_format}" + (" and the output layer" if last else ""),
                           Part.WEIGHTS),
                 self._compute(a, last),
                 Component("cuda_context", CUDA_CONTEXT_ESTIMATE + 2 * p.largest_tensor, Source.ESTIMATE,
                           "a CUDA context, and ggml's pool dequantizing the largest matrix to f16 for prompt matmuls")),
                kv_bytes_per_token=int(sum(self._kv_layer(a, k, v) for j in span if j not in sliding)),
                kv_basis="llama-kv-cache.cpp: per layer n_embd_k_gqa x type_k + n_embd_v_gqa x type_v, n_ctx cells "
                         "(MLA: K kv_lora_rank + rope, V kv_lora_rank, PR #12801)"))
        host_bytes = nbytes(p.embedding, head_bits if a.tie_word_embeddings else embed_bits) + (nbytes(p.routed_experts, linear_bits) if shape.experts_on_cpu else 0)
        host = (Component("host_weights", host_bytes, Source.FORMULA,
                          "token_embd" + (" and the routed experts (-ot exps=CPU)" if shape.experts_on_cpu else ""),
                          Part.WEIGHTS),)
        return Footprint(tuple(devices), host)

    def _swa_cache(self, a, layers: int, k: float, v: float, slots: int) -> Component:
        """llama-kv-cache-iswa.cpp: a sliding-window layer's cache holds pad256(window x slots +
        ubatch) cells in one stream (-kvu), or pad256(window + ubatch) in each slot's own stream,
        whatever the context (at most n_ctx: an upper bound below that)."""
        def pad(n: int) -> int:
            return -(-n // 256) * 256
        cells = pad(a.sliding_window * slots + self.ubatch_size) if self.kv_unified else \
            slots * pad(a.sliding_window + self.ubatch_size)
        return Component("kv_sliding_window", int(layers * cells * self._kv_layer(a, k, v)), Source.FORMULA,
                         f"{layers} sliding-window layers x {cells} cells (window {a.sliding_window}, {slots} slots, ubatch)")

    @staticmethod
    def _kv_layer(a, k: float, v: float) -> float:
        if a.is_mla:
            return (a.kv_lora_rank + a.qk_rope_head_dim) * k + a.kv_lora_rank * v
        return a.kv_heads * a.dim_per_head * (k + v)

    def _compute(self, a, last: bool) -> Component:
        """The graph reserve at ubatch tokens (llama-context.cpp graph_reserve): the output's logits
        and a few hidden-sized tensors; without flash attention, also the KQ matrix of the whole
        context (softmax in place) and its f32 mask."""
        ub, h = self.ubatch_size, a.hidden_size
        output = (a.vocab_size * ub * 4 if last else 0) + 2 * h * ub * 4
        if self.flash_attn == "on":
            return Component("compute_buffer", output, Source.FORMULA,
                             f"logits of {ub} tokens and two hidden-sized tensors; the f16 mask grows with the context",
                             per_kv_token=ub * 2)
        slots = 1 if self.kv_unified else (self.parallel or 1)
        return Component("compute_buffer", output + 4 * h * ub * 4, Source.FORMULA,
                         f"flash attention off: KQ of {ub} tokens x {a.num_attention_heads} heads x the context"
                         f"{'' if slots == 1 else f' / {slots} slots'} and its mask, plus the output's peak (an upper "
                         "bound: the two peaks are not at once)", per_kv_token=ub * (a.num_attention_heads * 4 + 4) / slots)

    def kv_element_bytes(self) -> tuple[float, float]:
        return GGML_TYPE_BYTES[self.cache_type_k], GGML_TYPE_BYTES[self.cache_type_v]

    def planned_flags(self, sizing: Sizing) -> Flags:
        broken = []
        if self.cache_type_v not in UNQUANTIZED and self.flash_attn == "off":
            broken.append(f"engine.flash_attn: a quantized V cache ({self.cache_type_v}) needs flash attention; "
                          "set flash_attn: on or cache_type_v: f16")
        return Flags({"ctx_size": sizing.kv_tokens, "parallel": sizing.batch, "n_gpu_layers": self.n_gpu_layers,
                      "cache_type_k": self.cache_type_k, "cache_type_v": self.cache_type_v,
                      "flash_attn": self.flash_attn, "ubatch_size": self.ubatch_size,
                      "batch_size": max(self.batch_size, self.ubatch_size), "kv_unified": self.kv_unified}, broken, [])


CELL_PAD = 256  # src/llama-context.cpp (3514e9f6): cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)


def held_cells(ctx_size: int, slots: int) -> int:
    """The KV cells llama-server makes for -c ctx_size (llama-context.cpp, 3514e9f6): n_ctx padded
    up to 256; without -kvu, each of the slots' streams holds GGML_PAD(n_ctx / slots, 256)."""
    def pad(n: int) -> int:
        return -(-n // CELL_PAD) * CELL_PAD
    n_ctx = pad(ctx_size)
    return n_ctx if slots <= 1 else pad(n_ctx // slots) * slots


def layer_split(layers: int, devices: int) -> list[int]:
    return [layers // devices + (i < layers % devices) for i in range(devices)]


def tensor_split(architecture, devices: int) -> str:
    """--tensor-split that gives each GPU the layers the memory model puts there: llama.cpp splits
    n_layer + 1 "layers", the output layer last (llama-model.cpp load_tensors), so the last GPU's
    share counts the output as one more."""
    if architecture is None:
        return ",".join("1" for _ in range(devices))
    counts = layer_split(architecture.num_hidden_layers, devices)
    counts[-1] += 1
    return ",".join(str(c) for c in counts)


class LlamaCppAdapter(ProcessAdapter):
    args_class = LlamaCppEngineArgs

    def command(self, launch: Launch) -> Command:
        engine, p = launch.spec.engine, launch.params
        ngl = 0 if launch.simulated else p["n_gpu_layers"]
        if engine.server == "llama-cpp-python":
            python = sys.executable if engine.binary == "llama-server" else engine.binary
            argv = [python, "-m", "llama_cpp.server", "--model", engine.model_path, "--model_alias", launch.spec.name,
                    "--host", launch.host, "--port", str(launch.port), "--n_ctx", str(p["ctx_size"]),
                    "--n_gpu_layers", str(ngl), "--type_k", str(GGML_TYPE_IDS[p["cache_type_k"]]),
                    "--type_v", str(GGML_TYPE_IDS[p["cache_type_v"]])]
            argv += ["--flash_attn", "true" if p["flash_attn"] == "on" else "false",
                     "--n_batch", str(p["batch_size"]), "--n_ubatch", str(p["ubatch_size"])]
            argv += ["--n_threads", str(engine.threads)] if engine.threads else []
            return Command(argv, {}, health_path="/v1/models")
        # -ngl -1 means all layers in recent llama-server; 999 says the same to older builds.
        argv = [engine.binary, "-m", engine.model_path, "--alias", launch.spec.name, "--host", launch.host,
                "--port", str(launch.port), "-c", str(p["ctx_size"]), "--parallel", str(p["parallel"]),
                "-ngl", str(999 if ngl < 0 else ngl), "--cache-type-k", p["cache_type_k"],
                "--cache-type-v", p["cache_type_v"]]
        argv += ["-fa", p["flash_attn"], "-b", str(p["batch_size"]), "-ub", str(p["ubatch_size"])]
        argv += ["-kvu"] if p["kv_unified"] else []
        argv += ["--swa-full"] if engine.swa_full else []
        if len(launch.gpus) > 1:  # the layer split the memory model assumes, not one by free memory
            argv += ["--split-mode", "layer", "--tensor-split", tensor_split(launch.spec.architecture, len(launch.gpus))]
        if launch.spec.placement.experts == "cpu":
            argv += ["--override-tensor", r"\.ffn_(up|down|gate)_exps\.=CPU"]
        argv += ["-t", str(engine.threads)] if engine.threads else []
        return Command(argv, {}, health_path="/health")
