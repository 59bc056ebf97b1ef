"""A model's shape: the fields of a HF config.json that decide memory, read completely.

`from_hf_config` maps each family's names onto `Architecture` and refuses, by name, a key that
changes memory and that lessor does not model (a config read silently as a dense text model
would plan too little).

The rule, key by key (`_screen`):
- a key the family's reader handles, or one known to change no memory (`_HARMLESS`), passes;
- a key whose value is null passes (nothing is set);
- any other key that looks like it shapes memory (`_SUSPICIOUS`: experts, MoE, windows, layer
  patterns, multimodal towers, adapters, state-space or linear attention, extra heads or widths)
  is refused, for every family;
- for a model_type lessor has never seen, every other key is refused too: only a config made
  wholly of understood keys is read as a dense decoder. For a known family, other keys are
  new metadata (the family's modelling code does not read them) and pass.
Defaults for absent keys are those of the transformers config class of each family."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types values


class UnsupportedConfig(ValueError):
    """A config.json key that changes memory in a way lessor does not model."""

    def __init__(self, key: str, reason: str):
        self.key = key
        super().__init__(f"config.json '{key}': {reason}")


class Architecture(BaseModel):
    """The fields of a HF config.json that decide memory (names as in config.json where it has one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: str = Field(default="", description="HF model_type, for messages.")
    hidden_size: int = Field(gt=0, description="Model width.")
    num_hidden_layers: int = Field(gt=0, description="Transformer layers (the MTP module not among them).")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_key_value_heads: int | None = Field(default=None, gt=0, description="KV heads (GQA); default = query heads.")
    head_dim: int | None = Field(default=None, gt=0, description="Per-head width; default hidden_size / heads.")
    intermediate_size: int = Field(gt=0, description="Dense MLP width.")
    vocab_size: int = Field(gt=0, description="Vocabulary size.")
    tie_word_embeddings: bool = Field(default=False, description="lm_head shares the embedding matrix.")
    attention_bias: bool = Field(default=False, description="q/k/v projections carry a bias (Qwen2).")
    qk_norm: bool = Field(default=False, description="Per-head RMSNorm on q and k (Qwen3, Gemma 3): 2 x head_dim a layer.")
    norms_per_layer: int = Field(default=2, ge=0, description="hidden_size-wide norms a layer (Gemma 2/3: 4, pre and post).")
    fused_gate_up: bool = Field(default=False, description="gate and up stored as one tensor (Phi-3): same count, larger tensor.")
    n_routed_experts: int = Field(default=0, ge=0, description="MoE routed experts per MoE layer.")
    n_shared_experts: int = Field(default=0, ge=0, description="MoE shared experts per MoE layer, each moe_intermediate_size wide.")
    shared_expert_intermediate_size: int = Field(default=0, ge=0, description="Qwen2-MoE: one shared expert of this width, with a sigmoid gate (hidden_size -> 1).")
    moe_intermediate_size: int = Field(default=0, ge=0, description="Width of one expert's MLP.")
    num_experts_per_tok: int = Field(default=0, ge=0, description="Experts each token visits.")
    first_k_dense_replace: int = Field(default=0, ge=0, description="Leading layers with a dense MLP instead of MoE.")
    moe_layer_freq: int = Field(default=1, gt=0, description="DeepSeek: past first_k_dense_replace, layer i is MoE when i % freq == 0.")
    decoder_sparse_step: int = Field(default=1, gt=0, description="Qwen-MoE: layer i is MoE when (i + 1) % step == 0.")
    mlp_only_layers: tuple[int, ...] = Field(default=(), description="Qwen-MoE: layers with a dense MLP whatever the step.")
    router_bias: bool = Field(default=False, description="DeepSeek-V3: the router's e_score_correction_bias (one per expert).")
    num_nextn_predict_layers: int = Field(default=0, ge=0, description="DeepSeek-V3 MTP layers: in the checkpoint, not loaded for plain serving.")
    sliding_window: int | None = Field(default=None, gt=0, description="Tokens a sliding-window layer attends to.")
    layer_types: tuple[str, ...] | None = Field(default=None, description="Per layer 'full_attention' or 'sliding_attention'; None = every layer slides when sliding_window is set (Mistral).")
    quantization_method: str | None = Field(default=None, description="quantization_config.quant_method of the checkpoint (fp8, compressed-tensors, gptq, awq).")
    kv_lora_rank: int | None = Field(default=None, gt=0, description="MLA: compressed KV rank (DeepSeek).")
    q_lora_rank: int | None = Field(default=None, gt=0, description="MLA: compressed query rank (None = full q_proj).")
    qk_nope_head_dim: int = Field(default=0, ge=0, description="MLA: per-head non-rotary q/k width.")
    qk_rope_head_dim: int = Field(default=0, ge=0, description="MLA: rotary q/k width (shared k_pe).")
    v_head_dim: int = Field(default=0, ge=0, description="MLA: per-head value width.")
    max_position_embeddings: int | None = Field(default=None, gt=0, description="Positions the model was trained for (a GGUF's ARCH.context_length): with rope_scaling, the longest sequence each engine runs it at, which caps the planned KV cache.")
    rope_scaling: dict[str, str | float | int | None] | None = Field(default=None, description="config.json's rope_scaling (or rope_parameters): rope_type, factor, original_max_position_embeddings; engines scale the context limit by it, each its own way.")
    source: str | None = Field(default=None, description="Where these fields were read from; set by lessor (architecture.hf_config, or the config.json or GGUF header in engine.model_path), shown by `lessor plan`.")

    @model_validator(mode="after")
    def _shape(self) -> Architecture:
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.kv_heads}")
        if self.n_routed_experts and not self.moe_intermediate_size:
            raise ValueError("moe_intermediate_size is required with n_routed_experts")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            if odd := sorted(set(self.layer_types) - {FULL, SLIDING}):
                raise ValueError(f"layer_types: {odd[0]!r} is not a layer kind lessor models ({FULL}, {SLIDING})")
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        if bad := [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]:
            raise ValueError(f"mlp_only_layers: layer {bad[0]} is outside 0..{self.num_hidden_layers - 1}")
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

    def is_moe_layer(self, i: int) -> bool:
        """Layer i's MLP is routed experts (DeepseekV2/V3 and Qwen2/3-MoE decoder layers' rules)."""
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
                and (i + 1) % self.decoder_sparse_step == 0 and i not in self.mlp_only_layers)

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_sliding_layer(self, i: int) -> bool:
        """Layer i attends to the last sliding_window tokens only (its KV cache can be that short)."""
        return self.sliding_window is not None and (self.layer_types is None or self.layer_types[i] == SLIDING)

    @property
    def sliding_layers(self) -> int:
        return sum(self.is_sliding_layer(i) for i in range(self.num_hidden_layers))


# --- reading a config.json ---------------------------------------------------------------------

# Keys that change no weight or KV memory: token ids, numerics, dropout, positions, bookkeeping.
_HARMLESS = frozenset({
    "architectures", "_name_or_path", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "rms_norm_eps", "layer_norm_eps",
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "max_position_embeddings",
    "original_max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "pretraining_tp",
    "output_router_logits", "router_aux_loss_coef", "norm_topk_prob", "hidden_act", "hidden_activation",
    "cache_implementation", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
    "rope_local_base_freq",
})
# What a dense decoder's reader takes from any family; a family adds its own keys.
_BASE = frozenset({"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias",
                   "quantization_config"})
_SUSPICIOUS = re.compile(r"expert|moe|sparse|router_|window|layer_types|pattern|interval|layers|block|hybrid|"
                         r"vision|visual|audio|speech|image|video|text_config|encoder|lora|adapter|mamba|ssm|"
                         r"linear|conv|state|nextn|mtp|quant|bias|heads|_dim|_size|num_", re.I)
_MULTIMODAL = ("vision_config", "audio_config", "speech_config", "vision_tower", "mm_projector_type")
# The quantization_config methods the memory model has a format for (memory.weights.FORMATS).
KNOWN_QUANT = frozenset({"fp8", "compressed-tensors", "gptq", "awq"})

_QWEN_MOE = frozenset({"num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                       "mlp_only_layers", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
_DEEPSEEK = frozenset({"n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
                       "first_k_dense_replace", "moe_layer_freq", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                       "qk_rope_head_dim", "v_head_dim", "num_nextn_predict_layers", "qk_head_dim",
                       # routing knobs: how experts are picked, not how many there are
                       "topk_method", "n_group", "topk_group", "scoring_func", "routed_scaling_factor", "seq_aux",
                       "aux_loss_alpha", "ep_size"})


@dataclass(frozen=True)
class _Family:
    keys: frozenset[str] = frozenset()  # keys this family's reader handles, beyond _BASE
    defaults: dict[str, Any] = field(default_factory=dict)  # Architecture fields when the key is absent
    fixed: dict[str, Any] = field(default_factory=dict)  # Architecture fields the family implies


# Defaults from each family's transformers config class (configuration_<model_type>.py).
FAMILIES: dict[str, _Family] = {
    "llama": _Family(),  # LlamaConfig: tie_word_embeddings False
    "granite": _Family(frozenset({"embedding_multiplier", "attention_multiplier", "residual_multiplier",
                                  "logits_scaling"})),  # GraniteConfig: scalars on activations, no weights
    "mistral": _Family(frozenset({"sliding_window"}), {"sliding_window": 4096}),  # MistralConfig: 4096 on every layer
    "mixtral": _Family(frozenset({"sliding_window", "num_local_experts", "num_experts_per_tok"}),
                       {"num_experts_per_tok": 2}),
    "phi3": _Family(frozenset({"sliding_window"}), fixed={"fused_gate_up": True}),  # qkv_proj, gate_up_proj fused
    "qwen2": _Family(frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
                     fixed={"attention_bias": True}),  # Qwen2Attention: q/k/v bias=True, not in the config
    "qwen3": _Family(frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}),
                     {"head_dim": 128}, {"qk_norm": True}),
    "qwen2_moe": _Family(_QWEN_MOE | {"shared_expert_intermediate_size", "qkv_bias"},
                         {"num_experts": 60, "moe_intermediate_size": 1408, "num_experts_per_tok": 4,
                          "shared_expert_intermediate_size": 5632, "qkv_bias": True}),
    "qwen3_moe": _Family(_QWEN_MOE, {"head_dim": 128, "num_experts": 128, "moe_intermediate_size": 768,
                                     "num_experts_per_tok": 8}, {"qk_norm": True}),
    "gemma2": _Family(frozenset({"sliding_window", "sliding_window_size", "layer_types"}),
                      {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096}, {"norms_per_layer": 4}),
    "gemma3_text": _Family(frozenset({"sliding_window", "sliding_window_pattern", "layer_types",
                                      "use_bidirectional_attention"}),
                           {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096, "vocab_size": 262_208},
                           {"norms_per_layer": 4, "qk_norm": True}),
    "deepseek_v2": _Family(_DEEPSEEK, {"first_k_dense_replace": 0, "n_shared_experts": 2, "n_routed_experts": 64}),
    "deepseek_v3": _Family(_DEEPSEEK, {"first_k_dense_replace": 3, "n_shared_experts": 1, "n_routed_experts": 256},
                           {"router_bias": True}),  # DeepseekV3TopkRouter.e_score_correction_bias
}


def from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map a HF config.json onto Architecture's fields, or raise UnsupportedConfig naming the key."""
    model_type = config.get("model_type") or ""
    for key in _MULTIMODAL:
        if config.get(key) is not None:
            hint = ("give the text_config's fields as the architecture (its model_type gemma3_text reads), "
                    "or the weights' bytes as memory.weights" if "text_config" in config else
                    "give the weights' bytes as memory.weights")
            raise UnsupportedConfig(key, f"{model_type or 'this model'} is multimodal: its text part alone would "
                                         f"under-count the weights; {hint}")
    if "text_config" in config:  # a wrapper round a text model (no tower): read the text model
        _screen({k: v for k, v in config.items() if k != "text_config"}, _BASE, unknown_is_suspicious=True)
        inner = dict(config["text_config"])
        inner.setdefault("quantization_config", config.get("quantization_config"))
        return from_hf_config(inner)
    family = FAMILIES.get(model_type)
    _screen(config, _BASE | (family.keys if family else frozenset()), unknown_is_suspicious=family is None)
    return _read(config, family or _Family(), model_type)


def _screen(config: dict[str, Any], handled: frozenset[str], unknown_is_suspicious: bool) -> None:
    odd = [k for k, v in config.items() if k not in handled and k not in _HARMLESS and v is not None
           and (unknown_is_suspicious or _SUSPICIOUS.search(k))]
    if odd:
        odd.sort(key=lambda k: not _SUSPICIOUS.search(k))  # the memory-shaped ones first
        what = f"model_type {config.get('model_type')!r}" if config.get("model_type") else "a config without model_type"
        raise UnsupportedConfig(odd[0], f"{what}: lessor does not model {', '.join(map(repr, odd[:3]))}"
                                        f"{' and more' if len(odd) > 3 else ''}; it may change memory "
                                        f"(give memory.weights to plan without the architecture)")
    if unknown_is_suspicious and config.get("hidden_act", "silu") != "silu":
        # A dense decoder of an unseen family is read as Llama's gated (SwiGLU) MLP: 3 matrices.
        raise UnsupportedConfig("hidden_act", f"{config['hidden_act']!r} in an unknown model_type often means a "
                                              "non-gated MLP (2 matrices, not 3), which lessor cannot tell")


def _read(c: dict[str, Any], fam: _Family, model_type: str) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        # As transformers: an absent key takes the config class's default, a null one stays null.
        return c[key] if key in c else fam.defaults.get(key, default)

    out: dict[str, Any] = {"model_type": model_type}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        # DeepseekV2/V3Config (transformers 5) write head_dim = qk_rope_head_dim, the rotary width:
        # no per-head width of K or V, which the MLA fields give.
        if key == "head_dim" and model_type in ("deepseek_v2", "deepseek_v3"):
            continue
        if get(key) is not None:
            out[key] = get(key)
    out.update(fam.fixed)
    _read_positions(c, out)
    if get("mlp_bias"):
        raise UnsupportedConfig("mlp_bias", "MLP biases are not modelled")
    if get("attention_bias") and model_type not in ("qwen2", "qwen2_moe"):
        # Llama, Granite, Qwen3, Gemma, DeepSeek: attention_bias biases o_proj too (modeling_<type>.py)
        raise UnsupportedConfig("attention_bias", f"true on {model_type or 'an unknown model_type'} biases o_proj "
                                                  "as well as q/k/v, which lessor does not model")
    if model_type == "qwen2_moe":
        out["attention_bias"] = bool(get("qkv_bias"))
    _read_quantization(c.get("quantization_config"), out)
    _read_experts(c, get, model_type, out)
    _read_window(c, get, model_type, out)
    return out


def _read_positions(c: dict[str, Any], out: dict[str, Any]) -> None:
    """The context the model was made for: max_position_embeddings and its rope scaling
    (transformers 4's rope_scaling, 5's rope_parameters; per layer type, the full layers')."""
    if isinstance(c.get("max_position_embeddings"), int) and c["max_position_embeddings"] > 0:
        out["max_position_embeddings"] = c["max_position_embeddings"]
    rope = c.get("rope_scaling") or c.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get(FULL), dict):
        rope = rope[FULL]
    if isinstance(rope, dict):
        kept = {k: rope[k] for k in ("rope_type", "type", "factor", "original_max_position_embeddings")
                if isinstance(rope.get(k), (str, int, float))}
        if kept.get("factor") is not None or kept.get("rope_type", kept.get("type", "default")) != "default":
            out["rope_scaling"] = kept


def _read_quantization(q: Any, out: dict[str, Any]) -> None:
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method not in KNOWN_QUANT:
        raise UnsupportedConfig("quantization_config.quant_method",
                                f"{method!r} is not a method lessor has a weight format for ({', '.join(sorted(KNOWN_QUANT))})")
    out["quantization_method"] = method
    if method in ("gptq", "awq") and q.get("bits", 4) != 4:  # lessor's gptq/awq formats are 4-bit
        out["quantization_method"] = f"{method}-{q.get('bits')}bit"


def _read_experts(c: dict[str, Any], get, model_type: str, out: dict[str, Any]) -> None:
    if model_type == "mixtral":  # every layer MoE, experts as wide as the dense MLP (MixtralSparseMoeBlock)
        out.update(n_routed_experts=get("num_local_experts", 8), moe_intermediate_size=get("intermediate_size"),
                   num_experts_per_tok=get("num_experts_per_tok"))
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        out.update(n_routed_experts=get("num_experts"), moe_intermediate_size=get("moe_intermediate_size"),
                   num_experts_per_tok=get("num_experts_per_tok"), decoder_sparse_step=get("decoder_sparse_step", 1),
                   mlp_only_layers=tuple(get("mlp_only_layers", ())))
        if model_type == "qwen2_moe":  # Qwen2MoeSparseMoeBlock: shared_expert + shared_expert_gate
            out["shared_expert_intermediate_size"] = get("shared_expert_intermediate_size")
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        for key in ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
                    "first_k_dense_replace", "moe_layer_freq", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim"):
            if get(key) is not None:
                out[key] = get(key)
        qk = out.get("qk_nope_head_dim", 0) + out.get("qk_rope_head_dim", 0)
        if get("qk_head_dim") not in (None, qk):  # transformers 5 writes it, derived: nope + rope
            raise UnsupportedConfig("qk_head_dim", f"{get('qk_head_dim')} is not qk_nope_head_dim + qk_rope_head_dim "
                                                   f"({qk})")
        if model_type == "deepseek_v3":
            # The MTP module (model card: 671B main model + 14B MTP) is for speculative decoding; vLLM and
            # SGLang load it only with a speculative config, so the counts leave it out and record it.
            out["num_nextn_predict_layers"] = get("num_nextn_predict_layers", 0)


def _read_window(c: dict[str, Any], get, model_type: str, out: dict[str, Any]) -> None:
    layers = out.get("num_hidden_layers", 0)
    window = get("sliding_window") or None  # Qwen2-MoE writes 0 for none
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not c.get("use_sliding_window", False):
            if c.get("layer_types") and SLIDING in c["layer_types"]:
                raise UnsupportedConfig("layer_types", "sliding layers with use_sliding_window false")
            return  # Qwen2Config: sliding_window is ignored unless use_sliding_window
        if c.get("layer_types") is None and model_type in ("qwen2_moe", "qwen3_moe"):
            raise UnsupportedConfig("use_sliding_window", f"true on {model_type}: which layers slide differs between "
                                                          "transformers versions; give layer_types")
        window = window or 4096
        start = get("max_window_layers", 28)  # Qwen2Config: layers from max_window_layers on slide
        types = c.get("layer_types") or [SLIDING if i >= start else FULL for i in range(layers)]
    elif model_type == "gemma2":
        if c.get("sliding_window_size") not in (None, window):
            raise UnsupportedConfig("sliding_window_size", f"{c['sliding_window_size']} differs from sliding_window {window}")
        # Gemma2Config: even layers (0, 2, ...) slide, odd ones attend globally
        types = c.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    elif model_type == "gemma3_text":
        if c.get("use_bidirectional_attention"):
            raise UnsupportedConfig("use_bidirectional_attention", "an encoder (EmbeddingGemma) halves the window")
        pattern = get("sliding_window_pattern", 6)  # Gemma3TextConfig: 5 local : 1 global
        if not isinstance(pattern, int) or pattern < 1:
            raise UnsupportedConfig("sliding_window_pattern", f"{pattern!r} is not a whole number of layers")
        types = c.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    else:  # Mistral, Mixtral, Phi-3: a sliding_window applies to every layer
        if window is not None:
            out["sliding_window"] = window
        return
    if not isinstance(types, list) or len(types) != layers or set(types) - {FULL, SLIDING}:
        raise UnsupportedConfig("layer_types", f"a pattern lessor does not understand: {str(types)[:80]}")
    if SLIDING in types:
        out.update(sliding_window=window, layer_types=tuple(types))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return from_hf_config(json.load(f))
