"""Parameter counts per module, from a model's shape: what each family's layers hold (attention
of its kind, dense MLP, routed and shared experts, router, norms, embeddings). Exact formulas,
checked against the published totals."""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import Architecture


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
