"""The memory model: bytes a model needs, from its architecture, weight format and engine parameters.

Pure functions. Exact where the formula is known (parameter counts, KV bytes per token, the
largest tensor a loader dequantizes); the activation workspace and the CUDA context are
estimates, and `MemoryEstimate.estimated` names which numbers are. `resolve` merges them with
what a model spec sets (`MemoryProfile`) into the `Memory` the planner works with; the config
tree (config.py) only calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from ..engines.base import EngineArgsBase
from .units import SIZE_PATTERN, parse_size

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 0},
               {"type": "string", "pattern": SIZE_PATTERN, "examples": ["8GiB", "512MiB", "8GB"]}]})]

# Bits per weight of each format: (linear layers, embeddings, lm_head). K-quants mix types per
# tensor; Q4_K_M averages 4.89 over the linear weights, with token_embd Q4_K and output Q6_K.
FORMATS: dict[str, tuple[float, float, float]] = {
    "fp32": (32, 32, 32), "bf16": (16, 16, 16), "fp16": (16, 16, 16),
    "fp8": (8 + 32 / (128 * 128), 16, 16),  # 128x128 blocks with an fp32 scale
    "int8": (8 + 16 / 4096, 16, 16),  # per-channel fp16 scale over ~4k inputs
    "awq": (4 + 20 / 128, 16, 16), "gptq": (4 + 20 / 128, 16, 16),  # int4 g128, fp16 scale + 4-bit zero
    "marlin": (4.25, 16, 16),  # int4 g64 with an fp16 scale
    "q4_k_m": (4.89, 4.5, 6.5625), "q8_0": (8.5, 8.5, 8.5), "q4_0": (4.5, 4.5, 6.5625), "q6_k": (6.5625, 6.5625, 6.5625),
}
WeightFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8", "awq", "gptq", "marlin", "q4_k_m", "q8_0", "q4_0", "q6_k"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
KvDtype = Literal["fp32", "bf16", "fp16", "fp8"]
CUDA_CONTEXT_BYTES = 512 << 20  # per process and GPU; NVML counts it, torch does not (estimate)


class Architecture(BaseModel):
    """The fields of a HF config.json that decide memory (names as in config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: str = Field(default="", description="HF model_type, for messages.")
    hidden_size: int = Field(gt=0, description="Model width.")
    num_hidden_layers: int = Field(gt=0, description="Transformer layers.")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_key_value_heads: int | None = Field(default=None, gt=0, description="KV heads (GQA); default = query heads.")
    head_dim: int | None = Field(default=None, gt=0, description="Per-head width; default hidden_size / heads.")
    intermediate_size: int = Field(gt=0, description="Dense MLP width.")
    vocab_size: int = Field(gt=0, description="Vocabulary size.")
    tie_word_embeddings: bool = Field(default=False, description="lm_head shares the embedding matrix.")
    attention_bias: bool = Field(default=False, description="q/k/v projections carry a bias (Qwen2).")
    n_routed_experts: int = Field(default=0, ge=0, description="MoE routed experts per MoE layer.")
    n_shared_experts: int = Field(default=0, ge=0, description="MoE shared experts per MoE layer.")
    moe_intermediate_size: int = Field(default=0, ge=0, description="Width of one expert's MLP.")
    num_experts_per_tok: int = Field(default=0, ge=0, description="Experts each token visits.")
    first_k_dense_replace: int = Field(default=0, ge=0, description="Leading layers with a dense MLP instead of MoE.")
    kv_lora_rank: int | None = Field(default=None, gt=0, description="MLA: compressed KV rank (DeepSeek).")
    q_lora_rank: int | None = Field(default=None, gt=0, description="MLA: compressed query rank (None = full q_proj).")
    qk_nope_head_dim: int = Field(default=0, ge=0, description="MLA: per-head non-rotary q/k width.")
    qk_rope_head_dim: int = Field(default=0, ge=0, description="MLA: rotary q/k width (shared k_pe).")
    v_head_dim: int = Field(default=0, ge=0, description="MLA: per-head value width.")

    @model_validator(mode="after")
    def _shape(self) -> "Architecture":
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.kv_heads}")
        if self.n_routed_experts and not self.moe_intermediate_size:
            raise ValueError("moe_intermediate_size is required with n_routed_experts")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace if self.n_routed_experts else 0


def architecture_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """Map a HF config.json onto Architecture's fields (Mixtral's and Qwen2's names included)."""
    out = {k: config[k] for k in Architecture.model_fields if k in config and config[k] is not None}
    if "num_local_experts" in config:  # Mixtral: every layer is MoE, experts as wide as the dense MLP
        out.update(n_routed_experts=config["num_local_experts"], moe_intermediate_size=config["intermediate_size"],
                   num_experts_per_tok=config.get("num_experts_per_tok", 2))
    if config.get("model_type") == "qwen2":
        out.setdefault("attention_bias", True)  # Qwen2 has q/k/v biases without saying so
    return out


def read_hf_config(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return architecture_from_hf(json.load(f))


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int
    attention: int  # all layers, projections + norms
    dense_mlp: int  # dense layers' MLPs
    shared_experts: int
    routed_experts: int
    router: int
    norms: int
    largest_tensor: int

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.dense_mlp + self.shared_experts
                + self.routed_experts + self.router + self.norms)


def _attention_params(a: Architecture) -> int:
    h = a.hidden_size
    if a.is_mla:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = (h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_attention_heads * qk) if a.q_lora_rank \
            else h * a.num_attention_heads * qk
        kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
            + a.kv_lora_rank * a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + a.num_attention_heads * a.v_head_dim * h
    q_width, kv_width = a.num_attention_heads * a.dim_per_head, a.kv_heads * a.dim_per_head
    bias = (q_width + 2 * kv_width) if a.attention_bias else 0
    return h * q_width + 2 * h * kv_width + q_width * h + bias


def param_counts(a: Architecture) -> ParamCounts:
    h, layers = a.hidden_size, a.num_hidden_layers
    dense_layers = layers - a.moe_layers
    expert = 3 * h * a.moe_intermediate_size
    embedding = a.vocab_size * h
    mla_q = a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    largest = max(embedding, h * a.intermediate_size, (a.q_lora_rank or h) * mla_q if a.is_mla else 0)
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if a.tie_word_embeddings else embedding,
        attention=layers * _attention_params(a),
        dense_mlp=dense_layers * 3 * h * a.intermediate_size,
        shared_experts=a.moe_layers * a.n_shared_experts * expert,
        routed_experts=a.moe_layers * a.n_routed_experts * expert,
        router=a.moe_layers * a.n_routed_experts * h,
        norms=layers * 2 * h + h,
        largest_tensor=largest,
    )


def kv_bytes_per_token(a: Architecture, kv_dtype: str = "bf16", k_v_bytes: tuple[float, float] | None = None) -> int:
    """MLA caches the compressed latent and the shared rotary key; GQA caches K and V per KV head.
    `k_v_bytes` gives per-element sizes of K and V where they differ (llama.cpp's cache types)."""
    k_bytes, v_bytes = k_v_bytes or (DTYPE_BYTES[kv_dtype], DTYPE_BYTES[kv_dtype])
    if a.is_mla:
        return int(a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * k_bytes)
    return int(a.num_hidden_layers * a.kv_heads * a.dim_per_head * (k_bytes + v_bytes))


def paged_tokens(tokens: int, page_tokens: int) -> int:
    """Paged caches allocate whole pages."""
    return -(-tokens // page_tokens) * page_tokens


def activation_bytes(a: Architecture, chunk_tokens: int, batch: int, dtype: str = "bf16") -> int:
    """Estimate of the prefill workspace of one chunk plus decode logits (not an exact formula)."""
    b = DTYPE_BYTES[dtype]
    mlp_width = max(a.intermediate_size if a.first_k_dense_replace or not a.n_routed_experts else 0,
                    a.num_experts_per_tok * a.moe_intermediate_size)
    attn_width = a.num_attention_heads * ((a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) if a.is_mla
                                          else 3 * a.dim_per_head)
    per_token = 6 * a.hidden_size + 2 * mlp_width + attn_width
    return chunk_tokens * per_token * b + batch * a.vocab_size * 4


@dataclass(frozen=True)
class MemoryEstimate:
    gpu_weight_bytes: int
    host_weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    load_peak_bytes: int
    params: ParamCounts
    estimated: tuple[str, ...] = ("activation_bytes",)


def _bytes(params: int, bits: float) -> int:
    return int(params * bits / 8)


def estimate(a: Architecture, weight_format: str = "bf16", kv_dtype: str = "bf16", experts_on_cpu: bool = False,
             chunk_tokens: int = 512, batch: int = 4, dequant_dtype: str = "bf16",
             k_v_bytes: tuple[float, float] | None = None) -> MemoryEstimate:
    """Split weights between GPU and host by module; the load peak is the largest tensor a GGUF
    loader dequantizes on the GPU before repacking (a bf16 checkpoint streams tensor by tensor)."""
    p = param_counts(a)
    linear_bits, embed_bits, head_bits = FORMATS[weight_format]
    embed = _bytes(p.embedding, embed_bits)
    experts = _bytes(p.routed_experts, linear_bits)
    gpu = (_bytes(p.attention + p.dense_mlp + p.shared_experts, linear_bits) + _bytes(p.router + p.norms, 16)
           + _bytes(p.lm_head, head_bits) + (0 if experts_on_cpu else experts + embed))
    host = (experts + embed) if experts_on_cpu else 0
    if weight_format.startswith("q"):
        peak = max(p.lm_head, p.largest_tensor) * DTYPE_BYTES[dequant_dtype]
    else:
        peak = _bytes(p.largest_tensor, 16)
    return MemoryEstimate(gpu, host, kv_bytes_per_token(a, kv_dtype, k_v_bytes),
                          activation_bytes(a, chunk_tokens, batch) + CUDA_CONTEXT_BYTES, peak, p)


class MemoryProfile(BaseModel):
    """What a model needs, in bytes. Computed from `architecture` when given; any field set here wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: Size | None = Field(default=None, description="Weight bytes on the GPU(s), split evenly over the placement's devices.")
    host_weights: Size | None = Field(default=None, description="Weight bytes in host RAM (hybrid engines).")
    kv_bytes_per_token: int | None = Field(default=None, gt=0, le=1 << 24, description="KV-cache bytes per token (all layers).")
    activation: Size | None = Field(default=None, description="Steady workspace beyond weights and KV (activations, CUDA context and graphs).")
    load_peak: Size | None = Field(default=None, description="Transient bytes above the weights while loading (e.g. a tensor dequantized on the GPU).")


@dataclass(frozen=True)
class Memory:
    """The resolved profile the planner works with."""

    weights: int
    host_weights: int
    kv_bytes_per_token: int
    activation: int
    load_peak: int
    estimated: tuple[str, ...] = ()


def resolve(given: MemoryProfile, architecture: Architecture | None, weight_format: str, kv_dtype: str,
            experts_on_cpu: bool, engine: EngineArgsBase, plan_batch: int) -> Memory:
    """The memory model's numbers for this engine's arguments, with every field `given` sets taken
    as given; `plan_batch` counts where the engine's arguments leave the batch open."""
    fixed = {k: v for k, v in given.model_dump().items() if v is not None}
    computed, estimated = {}, ()
    if architecture is not None:
        est = estimate(architecture, weight_format, kv_dtype, experts_on_cpu, chunk_tokens=engine.chunk_tokens(),
                       batch=engine.decode_batch() or plan_batch, k_v_bytes=engine.kv_element_bytes())
        computed = {"weights": est.gpu_weight_bytes, "host_weights": est.host_weight_bytes,
                    "kv_bytes_per_token": est.kv_bytes_per_token, "activation": est.activation_bytes,
                    "load_peak": est.load_peak_bytes}
        estimated = tuple(e.removesuffix("_bytes") for e in est.estimated if e.removesuffix("_bytes") not in fixed)
    return Memory(**{"host_weights": 0, "activation": 0, "load_peak": 0, **computed, **fixed}, estimated=estimated)
