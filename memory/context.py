"""The longest sequence an engine will run a model at, derived from the model's config the way
each engine derives it. An engine refuses (vLLM, SGLang) or wastes (llama.cpp, transformers) a
context above it, so the planner caps every KV cache at it times the sequences planned.

Each engine's args class (engines/*.py `context_limit`) picks its rule here and cites it; the
config's side (`max_position_embeddings`, `rope_scaling`) is what memory/architecture.py reads
from config.json or a GGUF header."""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import Architecture


@dataclass(frozen=True)
class ContextLimit:
    tokens: int  # per sequence
    basis: str  # where the number comes from: the config's keys and the engine's rule, with its source


def positions(a: Architecture) -> tuple[int, str] | None:
    """The config's position count and what it was read from; None where the architecture does not
    say it (fields written in lessor's config often leave it out: no limit is known, none is applied.
    vLLM and SGLang would assume 2048 for a config.json without one)."""
    if a.max_position_embeddings is None:
        return None
    return a.max_position_embeddings, f"max_position_embeddings {a.max_position_embeddings}"


def _rope(a: Architecture) -> tuple[str, float, int | None]:
    rope = a.rope_scaling or {}
    kind = str(rope.get("rope_type") or rope.get("type") or "default")
    original = rope.get("original_max_position_embeddings")
    return kind, float(rope.get("factor", 1.0) or 1.0), int(original) if original else None


# Rope types whose max_position_embeddings vLLM takes as already scaled (no factor applied).
VLLM_SCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def vllm_max_len(a: Architecture) -> ContextLimit | None:
    """vLLM's derived max_model_len (vllm/config/model.py `_get_and_verify_max_len`, read in the
    vLLM 0.32.0 wheel tests/support/install-vllm.sh installs): the position count times the rope factor,
    except for the rope types that leave it scaled already (VLLM_SCALED_ROPE) and Gemma 3. A
    larger --max-model-len is refused at start unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set. (Older
    releases, e.g. at vllm-project/vllm 0052a5b8, took yarn's original_max_position_embeddings x
    factor, never less: the newer rule is the one no version refuses.)"""
    if (known := positions(a)) is None:
        return None
    tokens, said = known
    kind, factor, _ = _rope(a)
    if a.rope_scaling and "gemma3" not in a.model_type and kind not in VLLM_SCALED_ROPE and factor != 1.0:
        tokens, said = int(tokens * factor), f"{said} x rope factor {factor:g}"
    return ContextLimit(tokens, f"{said}; vLLM derives max_model_len so and refuses more")


def sglang_context_length(a: Architecture) -> ContextLimit | None:
    """SGLang's derived context length (python/sglang/srt/utils/hf_transformers_utils.py
    `get_context_length`, read at sgl-project/sglang 002fc100, the v0.5 line; sglang-kt 0.7.2 is
    SGLang's code): the position count times the rope factor, except where
    rope_scaling names original_max_position_embeddings or is llama3 (then the count as it is).
    model_config.py refuses a larger --context-length unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN."""
    if (known := positions(a)) is None:
        return None
    tokens, said = known
    kind, factor, original = _rope(a)
    if a.rope_scaling and original is None and kind != "llama3" and factor != 1.0:
        tokens, said = int(tokens * factor), f"{said} x rope factor {factor:g}"
    return ContextLimit(tokens, f"{said}; SGLang derives its context length so and refuses more")


def trained_context(a: Architecture) -> ContextLimit | None:
    """The positions the model was trained for, for an engine that runs past them without a word
    but with no use (positions past it are untrained): transformers, llama.cpp's n_ctx_train."""
    if (known := positions(a)) is None:
        return None
    tokens, said = known
    return ContextLimit(tokens, f"{said}, the context the model was trained for")
