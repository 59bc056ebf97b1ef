"""A GGUF file's shape from its header: the key/value metadata and the tensor names, never the
tensors. Enough of the format (ggml's docs/gguf.md, version 2 and 3: little-endian, u64 counts)
to read what llama.cpp reads as hparams (`<arch>.block_count`, `<arch>.context_length`, ...),
mapped onto Architecture's fields; a key lessor does not model is refused by name, as for a
config.json."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from .architecture import FAMILIES, UnsupportedConfig

# Value types (gguf.md GGUFValueType): the struct format of each fixed-size one.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1 << 16  # a header with more is not a model's (a damaged or hostile file)

# general.architecture -> the HF model_type whose rules lessor applies.
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
               "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "granite": "granite",
               "deepseek2": "deepseek_v3"}


class GgufError(ValueError):
    pass


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GgufError("the header ends early")
    return struct.unpack("<" + fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "Q")
    if n > 1 << 24:
        raise GgufError(f"a string of {n} bytes in the header")
    raw = f.read(n)
    if len(raw) != n:
        raise GgufError("the header ends early")
    return raw.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _FIXED:
        return _read(f, _FIXED[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, n = _read(f, "I"), _read(f, "Q")
        if inner in _FIXED:  # skipped, counted: only the length of a vocabulary is wanted
            f.seek(n * struct.calcsize("<" + _FIXED[inner]), 1)
        else:
            for _ in range(n):
                _value(f, inner)
        return n  # an array reads as its length
    raise GgufError(f"unknown value type {kind}")


def read_header(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The metadata (arrays as their lengths) and the tensor names of a GGUF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GgufError("not a GGUF file (no GGUF magic)")
        version = _read(f, "I")
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version}; lessor reads versions 2 and 3")
        tensors, keys = _read(f, "Q"), _read(f, "Q")
        if keys > MAX_KEYS or tensors > 1 << 24:
            raise GgufError(f"{keys} keys and {tensors} tensors: not a model's header")
        meta = {}
        for _ in range(keys):
            key = _string(f)
            meta[key] = _value(f, _read(f, "I"))
        names = []
        for _ in range(tensors):
            names.append(_string(f))
            dims = _read(f, "I")
            f.seek(8 * dims + 4 + 8, 1)  # the dimensions, the type, the offset
        return meta, names


def architecture_fields(meta: dict[str, Any], tensors: list[str]) -> dict[str, Any]:
    """Architecture's fields from llama.cpp's hparams keys (src/llama-model.cpp load_hparams,
    src/llama-arch.cpp LLM_KV names)."""
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise UnsupportedConfig("general.architecture", f"{arch!r}: lessor reads the shape of {', '.join(sorted(MODEL_TYPES))} "
                                                        "GGUFs; give architecture.hf_config or memory.weights")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    out: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch], "hidden_size": key("embedding_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": key("attention.head_count_kv", heads),
        "intermediate_size": key("feed_forward_length"),
        "vocab_size": key("vocab_size") or meta.get("tokenizer.ggml.tokens"),
        # llama.cpp loads token_embd as the output where the file has no output.weight (tied).
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": key("context_length"),
    }
    if any(not isinstance(out[k], int) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "vocab_size")):
        raise UnsupportedConfig(f"{arch}.embedding_length", "the header lacks the model's widths or layer count")
    if key("attention.key_length") and arch != "deepseek2" and key("attention.key_length") * heads != out["hidden_size"]:
        out["head_dim"] = key("attention.key_length")
    if key("attention.sliding_window"):
        out["sliding_window"] = key("attention.sliding_window")
    if key("rope.scaling.type") not in (None, "none"):
        out["rope_scaling"] = {"rope_type": key("rope.scaling.type"), "factor": key("rope.scaling.factor"),
                               "original_max_position_embeddings": key("rope.scaling.original_context_length")}
    if key("expert_count"):
        out.update(n_routed_experts=key("expert_count"), num_experts_per_tok=key("expert_used_count"),
                   moe_intermediate_size=key("expert_feed_forward_length"),
                   n_shared_experts=key("expert_shared_count", 0), first_k_dense_replace=key("leading_dense_block_count", 0))
        if arch == "qwen2moe":
            out["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length", 0)
            out["n_shared_experts"] = 0
    if arch == "deepseek2":
        rope = key("rope.dimension_count")
        out.update(kv_lora_rank=key("attention.kv_lora_rank"), q_lora_rank=key("attention.q_lora_rank") or None,
                   qk_rope_head_dim=rope, qk_nope_head_dim=key("attention.key_length", rope) - rope,
                   v_head_dim=key("attention.value_length"))
    out.update(FAMILIES[MODEL_TYPES[arch]].fixed)  # what the family implies (Qwen2's q/k/v biases, Gemma's norms)
    return {k: v for k, v in out.items() if v is not None}
