"""Building blocks the engines' memory models share: weights split evenly over the devices,
the activation estimate of a prefill chunk, the dequantization peak of a GGUF loader. Each
engine's module composes these with its own facts (and cites its engine's source for them)."""

from __future__ import annotations

from ..memory.architecture import Architecture
from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from ..memory.params import ParamCounts, param_counts
from ..memory.weights import DTYPE_BYTES, FORMATS, kv_bytes_per_token, nbytes, split_weights

# What PyTorch raises when an allocation fails (torch 2.x: torch.OutOfMemoryError, "CUDA out of
# memory. Tried to allocate ..."; on the CPU its allocator's "can't allocate memory").
TORCH_OOM = ("torch.OutOfMemoryError", "CUDA out of memory", "OutOfMemoryError", "DefaultCPUAllocator: can't allocate memory")

GiB = 1 << 30
MiB = 1 << 20
# A CUDA context with cuBLAS, for engines that do not log their own (estimate; vLLM 0.19 measured
# 0.51 GiB on an H100, engines/vllm.py).
CUDA_CONTEXT_ESTIMATE = 512 * MiB
VOCAB_PAD = 64  # pad_vocab_size(V, 64): vLLM 0.19 vocab_parallel_embedding.py:28, and SGLang's copy of it


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
        Component("cuda_context", context_bytes, Source.ESTIMATE, context_basis),
        Component("load_peak", dequant_peak(p, shape.weight_format), Source.FORMULA,
                  "the largest tensor dequantized on the GPU while loading", Part.LOAD_PEAK),
    ), kv_bytes_per_token=kv // n if n > 1 else kv, kv_basis="layers x KV heads x head_dim x (K + V), split over the devices")
    host = (Component("host_weights", experts + embed, Source.FORMULA, "routed experts and the embedding in host RAM",
                      Part.WEIGHTS),) if shape.experts_on_cpu else ()
    return Footprint(tuple(device for _ in range(n)), host)


def rank_weights(shape: ModelShape, tp: int, pp: int, stage: int, layers: range) -> Component:
    """One GPU's weights under vLLM's layout (SGLang's is the same code): the stage's layers with
    their matrices split over tp, norms, the MoE router and MLA's down-projections replicated, KV
    heads replicated when fewer than tp; the vocabulary padded to 64 and split; embed_tokens on
    the first stage, lm_head on the last (with tied embeddings under pp, the last stage builds
    embed_tokens again)."""
    a = shape.architecture
    first, last = stage == 0, stage == pp - 1
    linear_bits, embed_bits, head_bits = FORMATS[shape.weight_format]
    vocab = -(-a.vocab_size // VOCAB_PAD) * VOCAB_PAD // tp
    embed = vocab * a.hidden_size if first or (last and a.tie_word_embeddings and pp > 1) else 0
    head = vocab * a.hidden_size if last and not a.tie_word_embeddings else 0
    linear = replicated = 0
    for layer in layers:
        split, whole, norms = _layer_share(a, tp, layer)
        linear, replicated = linear + split // tp + whole, replicated + norms
    small_bits = 32 if shape.weight_format == "fp32" else 16
    total = (nbytes(linear, linear_bits) + nbytes(replicated + (a.hidden_size if last else 0), small_bits)
             + nbytes(embed, embed_bits) + nbytes(head, head_bits))
    return Component("weights", total, Source.FORMULA,
                     f"this GPU's share in {shape.weight_format}: {len(layers)} layers split over tp {tp} (norms, "
                     "router and MLA's down-projections replicated; vocab padded to 64)", Part.WEIGHTS)


def _layer_share(a: Architecture, tp: int, layer: int) -> tuple[int, int, int]:
    """(linear parameters split over tp, linear parameters each rank holds whole, norms and router)."""
    h, heads_q = a.hidden_size, a.num_attention_heads
    if (rank := a.kv_lora_rank) is not None:  # is_mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        whole = h * (a.q_lora_rank or 0) + h * (rank + a.qk_rope_head_dim)  # ReplicatedLinear
        split = (a.q_lora_rank or h) * heads_q * qk + rank * heads_q * (a.qk_nope_head_dim + a.v_head_dim) \
            + heads_q * a.v_head_dim * h
        norms = 2 * h + (a.q_lora_rank or 0) + rank
    else:
        hd = a.dim_per_head
        kv_rank = max(1, a.kv_heads // tp)  # fewer KV heads than ranks: each rank keeps one, replicated
        split = 2 * h * heads_q * hd + (heads_q * hd if a.attention_bias else 0)
        whole = 2 * h * kv_rank * hd + (2 * kv_rank * hd if a.attention_bias else 0)
        norms = a.norms_per_layer * h + (2 * hd if a.qk_norm else 0)
    if a.is_moe_layer(layer):
        split += 3 * h * (a.moe_intermediate_size * (a.n_routed_experts + a.n_shared_experts)
                          + a.shared_expert_intermediate_size)
        norms += (a.n_routed_experts + bool(a.shared_expert_intermediate_size)) * h  # the router: ReplicatedLinear
    else:
        split += 3 * h * a.intermediate_size
    return split, whole, norms
