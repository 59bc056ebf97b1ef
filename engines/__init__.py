"""Engine adapters: one module per engine. Each module declares the engine's arguments as a
pydantic model (validated with the rest of the config) and, as data, the rules its parameters
must satisfy. Importing an adapter never imports the engine's own package."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .builtin import TorchEngineArgs
from .ktransformers import KTransformersEngineArgs
from .llamacpp import LlamaCppEngineArgs
from .sglang import SGLangEngineArgs
from .vllm import VLLMEngineArgs

EngineArgs = Annotated[
    Union[TorchEngineArgs, LlamaCppEngineArgs, VLLMEngineArgs, SGLangEngineArgs, KTransformersEngineArgs],
    Field(discriminator="kind"),
]
ENGINE_KINDS = ("torch", "llamacpp", "vllm", "sglang", "ktransformers")

__all__ = ["EngineArgs", "ENGINE_KINDS", "TorchEngineArgs", "LlamaCppEngineArgs", "VLLMEngineArgs",
           "SGLangEngineArgs", "KTransformersEngineArgs"]
