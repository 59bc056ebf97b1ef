"""Engine adapters: one module per engine. Each module declares the engine's arguments as a
pydantic model (validated with the rest of the config) that also carries, as data and methods,
everything that differs per engine (`EngineArgsBase` lists the facts). Importing an adapter never
imports the engine's own package.

Adding an engine is one module and one line in REGISTRY: the config's union of engine arguments,
ENGINE_KINDS and adapters() follow from it."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import EngineArgsBase, ProcessAdapter
from .builtin import TorchAdapter, TorchEngineArgs
from .ktransformers import KTransformersAdapter, KTransformersEngineArgs
from .llamacpp import LlamaCppAdapter, LlamaCppEngineArgs
from .sglang import SGLangAdapter, SGLangEngineArgs
from .vllm import VLLMAdapter, VLLMEngineArgs

# In the order the config reference and error messages list them.
REGISTRY: tuple[type[ProcessAdapter], ...] = (TorchAdapter, LlamaCppAdapter, VLLMAdapter, SGLangAdapter, KTransformersAdapter)
ENGINE_ARGS: dict[str, type[EngineArgsBase]] = {a.args_class.engine_kind(): a.args_class for a in REGISTRY}
ENGINE_KINDS = tuple(ENGINE_ARGS)
EngineArgs = Annotated[Union[tuple(ENGINE_ARGS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]  # noqa: UP007 (a union built from the registry: `|` cannot spread a tuple)


def adapters() -> dict:
    """One adapter per engine kind (they hold no state: a fresh set is as good as any)."""
    return {adapter.kind: adapter for adapter in (a() for a in REGISTRY)}


__all__ = ["REGISTRY", "ENGINE_ARGS", "EngineArgs", "ENGINE_KINDS", "adapters", "TorchEngineArgs", "LlamaCppEngineArgs",
           "VLLMEngineArgs", "SGLangEngineArgs", "KTransformersEngineArgs"]
