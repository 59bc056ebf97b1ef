"""ktransformers' legacy server (`server: legacy`): balance_serve of ktransformers <= 0.3, `python -m
ktransformers.server.main`, read at v0.3.2. Its parameter rules (plain functions returning the
rule's text, or None, so that the config validator and the planner check the same thing), its
memory model, and the private HOME whose config.yaml agrees with the flags. The engine's arguments
and its adapter, for both servers, are engines/ktransformers.py's."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..memory.footprint import Component, DeviceFootprint, Footprint, ModelShape, Part, Source
from ..memory.params import param_counts
from ..memory.weights import FORMATS, kv_bytes_per_token, nbytes
from .base import Flags, Sizing
from .memory_model import CUDA_CONTEXT_ESTIMATE, GiB, MiB, even

if TYPE_CHECKING:
    from .ktransformers import KTransformersEngineArgs

CUDA_PAGE_TOKENS = 256
DEFAULT_CHUNK_TOKENS = 256  # attn.chunk_size of ktransformers' shipped config.yaml

# The legacy server's memory (balance_serve, the serve YAML), read at v0.3.2 (495ae374) and
# v0.2.4 (ac95b6c7); HEAD keeps the same files under archive/.
MARLIN_BITS = FORMATS["marlin"][0]  # VLinearMarlin: int4, group 64, one bf16 scale a group (operators/linear.py:434)
MARLIN_REPACK = 14  # bytes per element at the repack's worst op, the bf16 input included (marlin_utils.py:33-45)
FLASHINFER_WORKSPACE = 136 * MiB  # 128 MiB float workspace (custom_modeling_deepseek_v3.py:45) + ~8 MiB int
ENGINE_CONTEXT = CUDA_CONTEXT_ESTIMATE  # the engine process's (not in its logs)
SCHED_CONTEXT = int(0.4 * GiB)  # the scheduler process (kvc2, libtorch) allocates the KV cache: a context of its own
GRAPH_BYTES_PER_TOKEN = 1 << 20  # pool + warm-up cache per token of the largest graph (estimate, ~0.4 MB of MLA
# attention intermediates [128, T, 512] x 3 in the pool and as much again left by the eager warm-up)


def page_size_rule(page_size: int) -> str | None:
    if page_size < CUDA_PAGE_TOKENS or page_size % CUDA_PAGE_TOKENS:
        return f"must be a multiple of {CUDA_PAGE_TOKENS} and at least {CUDA_PAGE_TOKENS} (got {page_size})"
    return None


def cache_lens_rule(cache_lens: int, page_size: int) -> str | None:
    # Below one page the scheduler would make no page at all (whole pages, rounded down: rounded_pages).
    if cache_lens < page_size:
        return f"must be at least {page_size} (page_size: the KV cache is made of whole pages); got {cache_lens}"
    return None


def rounded_pages(cache_lens: int, page_size: int) -> int:
    """The KV tokens the legacy server holds for --cache_lens: server/args.py:144 (v0.3.2) sizes
    gpu_memory_size = cache_lens x 2 x 576 x 61 bytes, and csrc/balance_serve/sched/scheduler.cpp:73-77
    makes floor(gpu_memory_size / page bytes) pages of it: whole pages, rounded down. (A value in
    config.yaml is rounded up instead, server/config/config.py:202; lessor passes the flag.)"""
    return cache_lens // page_size * page_size


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


def legacy_footprint(args: KTransformersEngineArgs, shape: ModelShape) -> Footprint:
    """What the legacy server holds on each GPU and in host RAM (the constants above)."""
    a, n = shape.architecture, shape.devices
    p = param_counts(a)
    kv_b = a.num_hidden_layers * a.kv_lora_rank * a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim) \
        if a.kv_lora_rank is not None else 0  # is_mla
    experts = 0 if shape.experts_on_cpu else p.routed_experts
    marlin = p.attention - kv_b + p.dense_mlp + p.shared_experts + experts + p.lm_head
    sizes = args.graph_sizes(args.max_batch_size or shape.batch)
    weights = nbytes(marlin, MARLIN_BITS) + 2 * kv_b * 2 + 2 * (p.router + p.norms)
    graphs = sum(sizes) * (a.vocab_size + a.hidden_size) * 2 + GRAPH_BYTES_PER_TOKEN * max(sizes)
    steady = weights + graphs + FLASHINFER_WORKSPACE + ENGINE_CONTEXT + SCHED_CONTEXT
    repack = MARLIN_REPACK * a.vocab_size * a.hidden_size  # lm_head goes first ("pre load lm_head", optimize.py:129)
    worst = ENGINE_CONTEXT + repack + (SCHED_CONTEXT if args.release == "0.2" else 0)
    device = DeviceFootprint((
        Component("weights", even(weights, n), Source.FORMULA,
                  "GPU linears and lm_head repacked to Marlin int4 g64 (4.25 bits), kv_b_proj in bf16 with its "
                  "absorbed q/out copies beside it, router and norms in bf16 (serve YAML, operators/linear.py)",
                  Part.WEIGHTS),
        Component("cuda_graphs", even(graphs, n), Source.ESTIMATE,
                  f"graphs for {sizes}: each keeps its bf16 logits and expert outputs (formula), plus the pool "
                  f"and warm-up cache of the largest, {max(sizes)} tokens (estimate)"),
        Component("flashinfer", FLASHINFER_WORKSPACE, Source.CONSTANT,
                  "MLA wrapper workspaces, custom_modeling_deepseek_v3.py:45 (v0.3.2)"),
        Component("cuda_context", ENGINE_CONTEXT + SCHED_CONTEXT, Source.ESTIMATE,
                  "two CUDA contexts: the engine and the scheduler process that allocates the KV cache"),
        Component("load_peak", max(0, worst - steady), Source.FORMULA,
                  f"lm_head first, repacked at {MARLIN_REPACK} B/element ({repack / 1e9:.1f} GB) "
                  + ("beside the KV cache reserved before it (<= 0.2.4)" if args.release == "0.2"
                     else "before the other weights and the KV cache (>= 0.3)") + ": above steady only by this",
                  Part.LOAD_PEAK),
    ), kv_bytes_per_token=even(kv_bytes_per_token(a, "bf16"), n),
        kv_basis="balance_serve settings.py:16-66: K only, (kv_lora_rank + rope) x layers x bf16, whole pages")
    host = (Component("host_weights", nbytes(p.routed_experts, FORMATS[shape.weight_format][0])
                      + nbytes(p.embedding, FORMATS[shape.weight_format][1]), Source.FORMULA,
                      "routed experts (KExpertsCPU) and embed_tokens stay in host RAM, in the GGUF's format",
                      Part.WEIGHTS),) if shape.experts_on_cpu else \
        (Component("host_weights", nbytes(p.embedding, FORMATS[shape.weight_format][1]), Source.FORMULA,
                   "embed_tokens stays in host RAM", Part.WEIGHTS),)
    return Footprint(tuple(device for _ in range(n)), host)


def legacy_flags(args: KTransformersEngineArgs, sizing: Sizing) -> Flags:
    tokens, batch, chunk = sizing.kv_tokens, sizing.batch, args.chunk_tokens()
    params = {"cache_lens": tokens, "max_batch_size": batch, "chunk_size": chunk, "page_size": args.page_size,
              "max_new_tokens": args.max_new_tokens}
    rules = [(name, rule) for name, rule in (
        ("page_size", page_size_rule(args.page_size)), ("cache_lens", cache_lens_rule(tokens, args.page_size)),
        ("chunk_size", chunk_size_rule(chunk)), ("max_batch_size", max_batch_size_rule(batch, args.backend))) if rule]
    warnings = []
    if tokens < batch * args.max_new_tokens:
        warnings.append(f"cache_lens {tokens} < max_batch_size {batch} x max_new_tokens {args.max_new_tokens}: "
                        f"concurrency is about cache_lens / (prompt + max_new_tokens), so requests will wait")
    return Flags(params, [f"engine.{name}: {rule}" for name, rule in rules], warnings)


def engine_config(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections of ktransformers' config.yaml that must agree with the planned flags.

    balance_serve's scheduler process reads async_server.max_batch_size from this file, not the
    flag; the shipped default of 4 against a flag of 5 (or 2) fails warm-up with 'The size of
    tensor a (4) must match the size of tensor b (5)'."""
    return {
        "model": {"cache_lens": params["cache_lens"], "max_new_tokens": params["max_new_tokens"]},
        "async_server": {"max_batch_size": params["max_batch_size"]},
        "attn": {"page_size": params["page_size"], "chunk_size": params["chunk_size"]},
    }


def _packaged_defaults() -> dict[str, Any]:
    """ktransformers' own configs/config.yaml where the package is installed (never imported)."""
    spec = importlib.util.find_spec("ktransformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def write_engine_home(home: Path, params: Mapping[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, str]:
    """Write HOME/.ktransformers/config.yaml for one model and return the environment that points
    the engine at it, so two models never share (or fight over) one user's config file."""
    merged = dict(_packaged_defaults() if defaults is None else defaults)
    for section, values in engine_config(params).items():
        merged[section] = {**(merged.get(section) or {}), **values}
    target = home / ".ktransformers" / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(merged, sort_keys=False))
    return {"HOME": str(home)}
