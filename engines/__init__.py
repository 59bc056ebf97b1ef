"""Engine adapters: one module per engine. Each module declares the engine's arguments as a
pydantic model (validated with the rest of the config) and, as data, the rules its parameters
must satisfy. Importing an adapter never imports the engine's own package."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .builtin import TorchAdapter, TorchEngineArgs
from .ktransformers import KTransformersAdapter, KTransformersEngineArgs
from .llamacpp import LlamaCppAdapter, LlamaCppEngineArgs
from .sglang import SGLangAdapter, SGLangEngineArgs
from .vllm import VLLMAdapter, VLLMEngineArgs

EngineArgs = Annotated[
    Union[TorchEngineArgs, LlamaCppEngineArgs, VLLMEngineArgs, SGLangEngineArgs, KTransformersEngineArgs],
    Field(discriminator="kind"),
]
ENGINE_KINDS = ("torch", "llamacpp", "vllm", "sglang", "ktransformers")
# Engines that load their weights, wait, then allocate the KV cache lessor grants. The others size
# their KV cache from flags at start, so their load peak and KV cache are held at the same time.
TWO_PHASE_KINDS = frozenset({"torch"})


def adapters() -> dict:
    """One adapter per engine kind (they hold no state: a fresh set is as good as any)."""
    made = {a.kind: a for a in (TorchAdapter(), LlamaCppAdapter(), VLLMAdapter(), SGLangAdapter(), KTransformersAdapter())}
    assert set(made) == set(ENGINE_KINDS) and {k for k, a in made.items() if a.two_phase} == TWO_PHASE_KINDS
    return made

__all__ = ["EngineArgs", "ENGINE_KINDS", "TWO_PHASE_KINDS", "adapters", "TorchEngineArgs", "LlamaCppEngineArgs", "VLLMEngineArgs",
           "SGLangEngineArgs", "KTransformersEngineArgs"]
