"""The built-in torch engine's model: weights, the static KV cache lessor granted, prompts,
sampling and generation. Imported only by torch_server, in the engine's own process (it imports
torch and transformers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class BadRequest(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Engine:
    """The model, its tokenizer and the static KV slots. Methods run in worker threads."""

    def __init__(self, model_path: str, dtype: str, device: str, memory_limit: int | None) -> None:
        self.model_path, self.dtype_name, self.device_name = model_path, dtype, device
        self.phase = "starting"
        self.error = ""
        self.model = self.tokenizer = None
        self.slots: list[Any] = []
        self.context_tokens = 0
        self._cap(memory_limit)

    def _cap(self, limit: int | None) -> None:
        import torch

        if limit and self.device_name.startswith("cuda"):
            device = torch.device(self.device_name)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)

    def load_weights(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.phase = "loading_weights"
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype_name),
                                                     local_files_only=True)
        self.model = model.to(self.device_name).eval()
        self.phase = "weights_loaded"

    def allocate_kv(self, context_tokens: int, max_batch_size: int, memory_limit: int | None) -> int:
        from transformers import StaticCache

        if self.phase != "weights_loaded":
            raise BadRequest("phase", f"the KV cache is allocated once, after the weights; phase is {self.phase}")
        self._cap(memory_limit)
        config = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        slots = []
        for _ in range(max_batch_size):
            cache = StaticCache(config=self.model.config, max_cache_len=context_tokens)
            cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads, head_dim=head_dim,
                                       dtype=self.model.dtype, device=self.model.device)
            slots.append(cache)
        self.slots, self.context_tokens = slots, context_tokens
        self.phase = "ready"
        return self.kv_bytes()

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for cache in self.slots for layer in cache.layers
                   for t in (layer.keys, layer.values))

    def measure(self) -> dict[str, Any]:
        import torch

        weights = 0 if self.model is None else sum(
            t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        out = {"phase": self.phase, "error": self.error, "device": self.device_name, "weights_bytes": weights,
               "kv_bytes": self.kv_bytes(), "context_tokens": self.context_tokens, "max_batch_size": len(self.slots)}
        if self.device_name.startswith("cuda"):
            out["memory_reserved"] = torch.cuda.memory_reserved(torch.device(self.device_name))
        else:
            out["memory_reserved"] = weights + out["kv_bytes"]
        return out

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest("messages", "must be a non-empty list of {role, content} objects with string content")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt", "must be a non-empty string")
        return list(self.tokenizer(prompt)["input_ids"])

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean of the last hidden layer over each text's tokens, L2-normalised; and the tokens read."""
        import torch

        vectors, tokens = [], 0
        limit = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", 32768)
        with torch.inference_mode():
            for i, text in enumerate(texts):
                ids = self.tokenizer(text)["input_ids"]
                if len(ids) > limit:
                    raise BadRequest("input", f"input[{i}] has {len(ids)} tokens; this model reads at most {limit}")
                hidden = self.model(input_ids=torch.tensor([ids], device=self.model.device), use_cache=False,
                                    output_hidden_states=True).hidden_states[-1][0].float()
                vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist())
                tokens += len(ids)
        return vectors, tokens

    def generate(self, slot: int, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Token ids, one at a time, decoded into the slot's static cache."""
        import torch

        cache = self.slots[slot]
        cache.reset()
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little"))
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([prompt], device=self.model.device)
        with torch.inference_mode():
            for _ in range(sampling.max_tokens):
                logits = self.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].float()
                token = _sample(logits, sampling, generator)
                if token == eos and not sampling.ignore_eos:
                    return
                yield token
                ids = torch.tensor([[token]], device=self.model.device)


def _sample(logits, sampling: Sampling, generator) -> int:
    import torch

    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
