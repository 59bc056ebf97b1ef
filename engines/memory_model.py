"""Building blocks the engines' memory models share: weights split evenly over the devices,
the activation estimate of a prefill chunk, the dequantization peak of a GGUF loader. Each
engine's module composes these with its own facts (and cites its engine's source for them)."""

from __future__ import annotations

from ..memory.architecture import Architecture
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from ..memory.params import ParamCounts, param_counts
from ..memory.weights import DTYPE_BYTES, kv_bytes_per_token, nbytes, split_weights

GiB = 1 << 30
MiB = 1 << 20


def even(total: int, devices: int) -> int:
    return -(-total // devices)


def chunk_activation(a: Architecture, chunk_tokens: int, batch: int, dtype: str = "bf16") -> int:
    """Estimate of the prefill workspace of one chunk plus decode logits (not an engine's formula:
    for engines whose forward pass lessor has not read)."""
    b = DTYPE_BYTES[dtype]
    mlp_width = max(a.intermediate_size if a.first_k_dense_replace or not a.n_routed_experts else 0,
                    a.num_experts_per_tok * a.moe_intermediate_size)
    attn_width = a.num_attention_heads * ((a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) if a.is_mla
                                          else 3 * a.dim_per_head)
    per_token = 6 * a.hidden_size + 2 * mlp_width + attn_width
    return chunk_tokens * per_token * b + batch * a.vocab_size * 4


def dequant_peak(p: ParamCounts, weight_format: str, dequant_dtype: str = "bf16") -> int:
    """The largest tensor a loader holds in full precision on the GPU at once (a GGUF loader
    dequantizes before repacking; a bf16 checkpoint streams tensor by tensor)."""
    if weight_format.startswith("q"):
        return max(p.lm_head, p.largest_tensor) * DTYPE_BYTES[dequant_dtype]
    return nbytes(p.largest_tensor, 16)


def generic_footprint(shape: ModelShape, chunk_tokens: int, batch: int, context_bytes: int, context_basis: str,
                      k_v_bytes: tuple[float, float] | None = None) -> Footprint:
    """Weights split evenly, the KV cache split evenly, an activation estimate and a CUDA context:
    the model of an engine whose layout lessor has not read in detail."""
    a, n = shape.architecture, shape.devices
    p = param_counts(a)
    gpu, embed, experts = split_weights(p, shape.weight_format, shape.experts_on_cpu)
    on_gpu = gpu + (0 if shape.experts_on_cpu else embed + experts)
    kv = kv_bytes_per_token(a, shape.kv_dtype, k_v_bytes)
    device = DeviceFootprint((
        Component("weights", even(on_gpu, n), Source.FORMULA, f"parameters by module in {shape.weight_format}", Part.WEIGHTS),
        Component("activation", chunk_activation(a, chunk_tokens, batch), Source.ESTIMATE,
                  f"a prefill chunk of {chunk_tokens} tokens and the logits of {batch} sequences"),
        Component("cuda_context", context_bytes, Source.CONSTANT, context_basis),
        Component("load_peak", dequant_peak(p, shape.weight_format), Source.FORMULA,
                  "the largest tensor dequantized on the GPU while loading", Part.LOAD_PEAK),
    ), kv_bytes_per_token=kv // n if n > 1 else kv, kv_basis="layers x KV heads x head_dim x (K + V), split over the devices")
    host = (Component("host_weights", experts + embed, Source.FORMULA, "routed experts and the embedding in host RAM",
                      Part.WEIGHTS),) if shape.experts_on_cpu else ()
    return Footprint(tuple(device for _ in range(n)), host)
