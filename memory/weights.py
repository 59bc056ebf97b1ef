"""What a model's weights weigh: parameter counts per module (from `Architecture`), bytes per
format, and KV bytes per token for a given share of layers and heads. Formulas, no constants:
every engine's memory model builds on these and lays them out its own way."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .architecture import Architecture

if TYPE_CHECKING:
    from .params import ParamCounts

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
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def nbytes(params: int, bits: float) -> int:
    return int(params * bits / 8)


def kv_bytes_per_token(a: Architecture, kv_dtype: str = "bf16", k_v_bytes: tuple[float, float] | None = None,
                       layers: int | None = None, kv_heads: int | None = None) -> int:
    """MLA caches the compressed latent and the shared rotary key; GQA caches K and V per KV head.
    `k_v_bytes` gives per-element sizes of K and V where they differ (llama.cpp's cache types);
    `layers` and `kv_heads` the share one device holds (default: all of them)."""
    k_bytes, v_bytes = k_v_bytes or (DTYPE_BYTES[kv_dtype], DTYPE_BYTES[kv_dtype])
    layers = a.num_hidden_layers if layers is None else layers
    if (rank := a.kv_lora_rank) is not None:  # MLA
        return int(layers * (rank + a.qk_rope_head_dim) * k_bytes)
    heads = a.kv_heads if kv_heads is None else kv_heads
    return int(layers * heads * a.dim_per_head * (k_bytes + v_bytes))


def paged_tokens(tokens: int, page_tokens: int) -> int:
    """Paged caches allocate whole pages."""
    return -(-tokens // page_tokens) * page_tokens


def split_weights(p: ParamCounts, weight_format: str, experts_on_cpu: bool) -> tuple[int, int, int]:
    """(GPU bytes without embeddings, embedding bytes, routed-expert bytes) in one format: engines
    place the embedding and the experts differently (llama.cpp keeps token_embd in host RAM; a
    hybrid engine keeps the routed experts there)."""
    linear_bits, embed_bits, head_bits = FORMATS[weight_format]
    small_bits = 32 if weight_format == "fp32" else 16  # norms and router stay 16-bit beside quantized layers
    gpu = (nbytes(p.attention + p.dense_mlp + p.shared_experts, linear_bits) + nbytes(p.router + p.norms, small_bits)
           + nbytes(p.lm_head, head_bits))
    return gpu, nbytes(p.embedding, embed_bits), nbytes(p.routed_experts, linear_bits)
