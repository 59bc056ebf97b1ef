"""ktransformers' arguments (kind `ktransformers`) and the parameter rules that crash it when broken.

The rules are plain functions returning the rule's text (or None) so that the config
validator and the planner check the same thing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from .base import EngineArgsBase

CUDA_PAGE_TOKENS = 256


def page_size_rule(page_size: int) -> str | None:
    if page_size < CUDA_PAGE_TOKENS or page_size % CUDA_PAGE_TOKENS:
        return f"must be a multiple of {CUDA_PAGE_TOKENS} and at least {CUDA_PAGE_TOKENS} (got {page_size})"
    return None


def cache_lens_rule(cache_lens: int, page_size: int) -> str | None:
    if cache_lens % page_size:
        return f"must be a multiple of {page_size} (page_size); got {cache_lens}, use {-(-cache_lens // page_size) * page_size}"
    return None


def chunk_size_rule(chunk_size: int) -> str | None:
    if chunk_size > 1024 and chunk_size % 1024:
        return f"must be at most 1024 or a multiple of 1024 (got {chunk_size})"
    return None


def max_batch_size_rule(max_batch_size: int, backend: str) -> str | None:
    # The balance_serve scheduler's spawned process sizes its warm-up tensors from its own config
    # file; below 3 it fails with "The size of tensor a (4) must match the size of tensor b (5)".
    if backend == "balance_serve" and max_batch_size < 3:
        return (f"must be at least 3 for the balance_serve backend (got {max_batch_size}); smaller values crash "
                "its warm-up with 'The size of tensor a (4) must match the size of tensor b (5)'")
    return None


def _check(message: str | None, value):
    if message:
        raise ValueError(message)
    return value


class KTransformersEngineArgs(EngineArgsBase):
    kind: Literal["ktransformers"] = Field(description="ktransformers (hybrid CPU/GPU MoE serving).")
    gguf_path: str = Field(min_length=1, description="Folder of the GGUF weights (experts stay on the CPU).")
    backend: Literal["balance_serve", "ktransformers"] = Field(default="balance_serve", description="--backend_type.")
    page_size: int = Field(default=CUDA_PAGE_TOKENS, ge=1, description="KV page size in tokens; a multiple of 256 on CUDA.")
    cache_lens: int | None = Field(default=None, ge=1, description="Total KV tokens on the GPU (all sequences); planned when unset.")
    max_batch_size: int | None = Field(default=None, ge=1, le=64, description="Sequences served together; planned when unset.")
    chunk_size: int | None = Field(default=None, ge=1, description="Prefill chunk in tokens: at most 1024, or a multiple of 1024.")
    max_new_tokens: int = Field(default=1024, ge=1, description="--max_new_tokens per request.")
    cpu_infer: int | None = Field(default=None, ge=1, description="--cpu_infer: CPU threads for the experts.")

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, v: int) -> int:
        return _check(page_size_rule(v), v)

    @field_validator("cache_lens")
    @classmethod
    def _cache_lens(cls, v: int | None, info: ValidationInfo) -> int | None:
        page = info.data.get("page_size")
        return v if v is None or page is None else _check(cache_lens_rule(v, page), v)

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int | None) -> int | None:
        return v if v is None else _check(chunk_size_rule(v), v)

    @field_validator("max_batch_size")
    @classmethod
    def _max_batch_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        backend = info.data.get("backend", "balance_serve")
        return v if v is None else _check(max_batch_size_rule(v, backend), v)
