"""A model's shape: the fields of a HF config.json that decide memory, read completely.

`from_hf_config` maps each family's names onto `Architecture` and refuses, by name, a key that
changes memory and that lessor does not model (a config read silently as a dense text model
would plan too little)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


def from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
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
        return from_hf_config(json.load(f))
