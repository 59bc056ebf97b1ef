"""Parameter counts per module, from a model's shape: what each family's layers hold (attention
of its kind, dense MLP, routed and shared experts, router, norms, embeddings). Exact formulas,
checked against the published totals (tests/unit/test_architecture.py).

`layers` gives each decoder layer's parameters, so an engine can split layers over pipeline
stages: total = embedding + lm_head + sum(layers) + final_norm."""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import Architecture


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int
    attention: int  # all layers' projections, with the norms inside attention (MLA's, q/k norms)
    dense_mlp: int  # dense layers' MLPs
    shared_experts: int  # with Qwen2-MoE's shared-expert gate
    routed_experts: int
    router: int  # with DeepSeek-V3's correction bias
    norms: int  # the layers' hidden-size norms and the final norm
    largest_tensor: int
    layers: tuple[int, ...] = ()  # parameters of each decoder layer, in order
    final_norm: int = 0
    mtp: int = 0  # DeepSeek-V3's MTP module as the checkpoint stores it: not in total (not loaded to serve)

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.dense_mlp + self.shared_experts
                + self.routed_experts + self.router + self.norms)


def _attention_params(a: Architecture) -> int:
    h = a.hidden_size
    if (rank := a.kv_lora_rank) is not None:  # MLA: q_a_proj, q_a_layernorm, q_b_proj (or q_proj); kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = (h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_attention_heads * qk) if a.q_lora_rank \
            else h * a.num_attention_heads * qk
        kv = h * (rank + a.qk_rope_head_dim) + rank \
            + rank * a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + a.num_attention_heads * a.v_head_dim * h
    q_width, kv_width = a.num_attention_heads * a.dim_per_head, a.kv_heads * a.dim_per_head
    bias = (q_width + 2 * kv_width) if a.attention_bias else 0
    qk_norm = 2 * a.dim_per_head if a.qk_norm else 0  # q_norm, k_norm: one head_dim weight each, shared by heads
    return h * q_width + 2 * h * kv_width + q_width * h + bias + qk_norm


def _moe_mlp(a: Architecture) -> tuple[int, int, int]:
    """One MoE layer's (shared experts, routed experts, router)."""
    h, expert = a.hidden_size, 3 * a.hidden_size * a.moe_intermediate_size
    shared = a.n_shared_experts * expert
    if a.shared_expert_intermediate_size:  # Qwen2-MoE: one shared expert and its gate (hidden -> 1)
        shared += 3 * h * a.shared_expert_intermediate_size + h
    router = a.n_routed_experts * h + (a.n_routed_experts if a.router_bias else 0)
    return shared, a.n_routed_experts * expert, router


def param_counts(a: Architecture) -> ParamCounts:
    h, n = a.hidden_size, a.num_hidden_layers
    attention, norms, dense = _attention_params(a), a.norms_per_layer * h, 3 * h * a.intermediate_size
    shared, routed, router = _moe_mlp(a)
    moe = [a.is_moe_layer(i) for i in range(n)]
    moe_layers = sum(moe)
    embedding = a.vocab_size * h
    mla_q = a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    largest = max(embedding, (2 if a.fused_gate_up else 1) * h * a.intermediate_size,
                  (a.q_lora_rank or h) * mla_q if a.is_mla else 0,
                  h * (a.num_attention_heads + 2 * a.kv_heads) * a.dim_per_head if a.fused_gate_up else 0)
    # DeepSeek-V3's MTP layer (modeling_deepseek.py / the V3 report): a decoder layer (MoE, as it comes after
    # first_k_dense_replace) plus enorm, hnorm, eh_proj (2h -> h), its head's norm, and its own copies of the
    # embedding and the head.
    mtp_layer = attention + norms + shared + routed + router + 3 * h + 2 * h * h + 2 * embedding
    return ParamCounts(
        embedding=embedding,
        lm_head=0 if a.tie_word_embeddings else embedding,
        attention=n * attention,
        dense_mlp=(n - moe_layers) * dense,
        shared_experts=moe_layers * shared,
        routed_experts=moe_layers * routed,
        router=moe_layers * router,
        norms=n * norms + h,
        largest_tensor=largest,
        layers=tuple(attention + norms + (shared + routed + router if m else dense) for m in moe),
        final_norm=h,
        mtp=a.num_nextn_predict_layers * mtp_layer,
    )
