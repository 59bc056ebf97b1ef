"""The built-in torch engine's model: weights, the static KV cache lessor granted, prompts,
sampling and generation. Imported only by torch_server, in the engine's own process (it imports
torch and transformers)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from . import torch_weights
from .torch_requests import BadRequest, Sampling

log = logging.getLogger("lessor.torch_engine")

DTYPES = ("bfloat16", "float16", "float32")
GREEDY_BELOW = 1e-5  # a temperature under this is greedy: dividing logits by it overflows to inf (vLLM's cut-off too)


class Engine:
    """The model, its tokenizer and the static KV slots. Methods run in worker threads."""

    def __init__(self, model_path: str, dtype: str, device: str, memory_limit: int | None) -> None:
        self.model_path, self.dtype_name, self.device_name = model_path, dtype, device
        self.phase = "starting"
        self.error = ""
        # torch's and transformers' objects, typed Any: both are imported in the engine's process only,
        # when the weights load, so that importing this module costs neither.
        self.model: Any = None
        self.tokenizer: Any = None
        self.slots: list[Any] = []
        self.context_tokens = 0
        self.baseline_bytes: int | None = None  # what the process held before the weights (see _held)
        self.weights_measured: int | None = None
        self.read_started = 0.0  # CLOCK_MONOTONIC: when the weights' read began (set by load_weights)
        self.kv_measured: int | None = None
        self.fail_at_step: int | None = None  # tests only: the decode step that raises (the error path)
        self._cap(memory_limit)

    @property
    def on_cuda(self) -> bool:
        return self.device_name.startswith("cuda")

    def _cap(self, limit: int | None) -> None:
        import torch

        if limit and self.on_cuda:
            device = torch.device(self.device_name)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)

    def _held(self) -> int:
        import torch

        if self.on_cuda:
            return torch.cuda.memory_reserved(torch.device(self.device_name))
        # Only for the baseline and once serving (requests free their temporaries): lessor samples
        # a load 20 times a second, and malloc_trim holds glibc's arena locks for about 10 ms at
        # 1.2 GB, so every thread that allocates waits (the "weights loaded" line, and with it
        # lessor noticing, came 15-20 ms late). load_weights trims once before its own figure.
        if self.phase in ("starting", "ready"):
            _trim()
        return anonymous_bytes()

    def memory_reserved(self) -> int:
        """What the engine holds for its model: on CUDA torch's reserved bytes; on the CPU what the
        process holds now beyond its baseline (0 before the baseline is taken)."""
        if self.on_cuda:
            return self._held()
        return 0 if self.baseline_bytes is None else self._held() - self.baseline_bytes

    def load_weights(self) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        # Resolving the class imports its modeling module (tens of MB of Python objects): that, the
        # tokenizer and torch are the process's baseline, not the weights.
        model_class = _causal_lm_class(config)
        self.baseline_bytes = self._held()
        self.read_started = time.monotonic()  # the tokenizer, config and modeling imports are done
        self.phase = "loading_weights"
        dtype = getattr(torch, self.dtype_name)
        try:
            model = torch_weights.load_model(self.model_path, model_class, config, dtype, self.device_name)
        except torch_weights.NotLoadable as exc:
            log.info("reading %s through transformers' from_pretrained: %s", self.model_path, exc)
            model = self._from_pretrained(model_class, config, dtype)
        # Inference only: with no parameter asking for gradients, no step can build an autograd graph.
        self.model = model.to(self.device_name).eval().requires_grad_(False)
        _trim()  # what the loader freed goes back before the figure (_held does not trim while loading)
        self.weights_measured = self.memory_reserved()
        self.phase = "weights_loaded"

    def _from_pretrained(self, model_class: Any, config, dtype) -> Any:
        """transformers' loader: slower (see torch_weights), but it converts checkpoints whose
        tensors are named or laid out other than the model's (DeepSeek-V2's experts, one each)."""
        model = model_class.from_pretrained(self.model_path, config=config, dtype=dtype, local_files_only=True)
        if not self.on_cuda:
            _materialise(model)
        return model

    def allocate_kv(self, context_tokens: int, max_batch_size: int, memory_limit: int | None) -> int:
        if self.phase != "weights_loaded":
            raise BadRequest("phase", f"the KV cache is allocated once, after the weights; phase is {self.phase}")
        self._cap(memory_limit)
        before = self.memory_reserved()
        self.slots = [self._slot(context_tokens) for _ in range(max_batch_size)]
        self.context_tokens = context_tokens
        self.kv_measured = self.memory_reserved() - before
        self.phase = "ready"
        return self.kv_bytes()

    def resize_kv(self, context_tokens: int, memory_limit: int | None) -> int:
        """The static cache again at `context_tokens` per slot, the slots kept (elastic KV: lessor
        shrinks a lease to let another model in, and grows it back). The caller holds every slot,
        so no sequence is mid-way in the old caches. The old caches go first, so a cache as large
        as before fits where it was; a grow that fails puts the old size back and raises."""
        if self.phase != "ready":
            raise BadRequest("phase", f"the KV cache is resized once it is allocated; phase is {self.phase}")
        old, batch = self.context_tokens, len(self.slots)
        if memory_limit is not None and context_tokens > old:
            self._cap(memory_limit)  # a grow needs the higher cap before it allocates
        try:
            self._reallocate(context_tokens, batch)
        except Exception:
            self._reallocate(old, batch)
            raise
        if memory_limit is not None:
            self._cap(memory_limit)  # a shrink lowers the cap once the memory is given back
        return self.kv_bytes()

    def _reallocate(self, context_tokens: int, batch: int) -> None:
        self.slots = []
        self._give_back()
        before = self.memory_reserved()
        self.slots = [self._slot(context_tokens) for _ in range(batch)]
        self.context_tokens = context_tokens
        self.kv_measured = self.memory_reserved() - before

    def _give_back(self) -> None:
        """Freed tensors back to the device (torch's caching allocator keeps them reserved) or,
        on the CPU, the allocator's free pages to the kernel: what lessor measures drops at once."""
        import gc

        import torch

        gc.collect()  # a finished request's decoder may still reference its slot's cache in a cycle
        if self.on_cuda:
            torch.cuda.empty_cache()
        else:
            _trim()

    def _slot(self, context_tokens: int) -> Any:
        """One sequence's static cache, every layer allocated now (zeroed, so its pages are touched)."""
        import torch
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=context_tokens)
        (k_heads, k_dim), (v_heads, v_dim) = cache_shapes(self.model.config.get_text_config(decoder=True))
        for layer in _kv_layers(cache):
            # Cache.early_initialization gives K and V one head_dim; MLA's differ, so each layer is
            # initialised as its first update would (zero-length K and V of the cached shapes).
            keys = torch.zeros((1, k_heads, 0, k_dim), dtype=self.model.dtype, device=self.model.device)
            values = torch.zeros((1, v_heads, 0, v_dim), dtype=self.model.dtype, device=self.model.device)
            layer.lazy_initialization(keys, values)
        return cache

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for cache in self.slots for layer in _kv_layers(cache)
                   for t in (layer.keys, layer.values))

    def measure(self) -> dict[str, Any]:
        weights = 0 if self.model is None else sum(
            t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return {"phase": self.phase, "error": self.error, "device": self.device_name,
                "weights_tensor_bytes": weights, "kv_tensor_bytes": self.kv_bytes(),
                "context_tokens": self.context_tokens, "max_batch_size": len(self.slots),
                "memory_reserved": self.memory_reserved(),
                "measured": {"baseline_bytes": self.baseline_bytes, "weights_bytes": self.weights_measured,
                             "kv_bytes": self.kv_measured}}

    def prompt_ids(self, messages: tuple[dict[str, str], ...] | None, prompt: str | None) -> list[int]:
        """The token ids of a checked chat (`messages`) or completion (`prompt`)."""
        if messages is None:
            return list(self.tokenizer(prompt)["input_ids"])
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # a template may refuse an order of roles (raise_exception)
            raise BadRequest("messages", f"the model's chat template refused these messages: {exc}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

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

    def decoder(self, slot: int, prompt: list[int], sampling: Sampling) -> Decoder:
        return Decoder(self, self.slots[slot], prompt, sampling)

    def generate(self, slot: int, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Every token of one sequence, decoded in the calling thread (the server steps a Decoder instead)."""
        decoder = self.decoder(slot, prompt, sampling)
        while (token := decoder.step()) is not None:
            yield token


class Decoder:
    """One sequence decoded into its slot's static cache, a token per `step()`.

    Each step enters inference mode itself: the mode is per thread, and the steps of one request
    run on whichever worker thread is free. (A generator holding `with torch.inference_mode()`
    across its yields ran its later steps, on other threads, outside it, with autograd on: issue
    20's engine log has "Inference tensors cannot be saved for backward" and a stream cut short.)"""

    def __init__(self, engine: Engine, cache: Any, prompt: list[int], sampling: Sampling) -> None:
        self.engine, self.cache, self.sampling = engine, cache, sampling
        self.pending = list(prompt)  # the ids the next step feeds the model
        self.tokens = 0
        self.ended = False
        self.generator: Any = None  # a torch.Generator, made by the first step

    def step(self) -> int | None:
        """The next token id; None once the sequence ended (eos unless ignored, or max_tokens)."""
        import torch

        if self.ended or self.tokens >= self.sampling.max_tokens:
            return None
        model = self.engine.model
        with torch.inference_mode():
            if self.generator is None:
                self.cache.reset()
                self.generator = torch.Generator(device=model.device)
                seed = self.sampling.seed
                self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
            if self.engine.fail_at_step == self.tokens + 1:
                raise RuntimeError(f"decode step {self.tokens + 1} failed as --fail-at-step asked")
            ids = torch.tensor([self.pending], device=model.device)
            logits = model(input_ids=ids, cache=self.cache, use_cache=True).logits[0, -1].float()
            token = _sample(logits, self.sampling, self.generator)
        if token == self.engine.tokenizer.eos_token_id and not self.sampling.ignore_eos:
            self.ended = True
            return None
        self.tokens += 1
        self.pending = [token]
        return token


def _sample(logits, sampling: Sampling, generator) -> int:
    import torch

    if sampling.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
        keep[0] = True  # the likeliest token always: top_p 0 would keep none, and multinomial needs one
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _kv_layers(cache) -> list[Any]:
    """The layers that cache K and V (transformers' DummyLayer, for a layer without attention, holds none)."""
    return [layer for layer in cache.layers if layer.supports_early_init]


def _causal_lm_class(config) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"config.json's model_type {config.model_type!r} has no causal-LM class in this "
                         "transformers") from None


def cache_shapes(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, head_dim) of one layer's cached K and of its V, as the model's attention updates them.
    DeepSeek-V2/V3 (MLA) cache the compressed latent, one head each: K the normalised kv_a latent
    (kv_lora_rank), V the rotary key k_pe (qk_rope_head_dim); the per-head K and V are expanded
    from it at every step (transformers 5.20-5.24 modeling_deepseek_v2.py, DeepseekV2Attention:
    "Cache read / write is performed while the latent KV is still compressed")."""
    if getattr(config, "kv_lora_rank", None):
        return (1, config.kv_lora_rank), (1, config.qk_rope_head_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_key_value_heads or config.num_attention_heads
    return (heads, head_dim), (heads, head_dim)


def anonymous_bytes() -> int:
    """This process's anonymous memory, resident or swapped (RssAnon + VmSwap of /proc/self/status).
    File-backed pages are left out: the shared libraries' code is shared with every other torch
    process, so its share moves whenever one of them starts or exits; what the engine holds for
    its model is anonymous. The kernel keeps these as counters, so the read is O(1); smaps_rollup's
    Pss_Anon, the same figure for a process that shares no anonymous pages (this one never forks),
    walks every page table: 7 ms at 1.2 GB of weights, on each of lessor's 20 samples a second."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "VmSwap"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields["RssAnon"] + fields.get("VmSwap", 0)


def _materialise(model) -> None:
    """Copy every tensor into memory of the process's own. transformers leaves a safetensors
    checkpoint memory-mapped (the parameters are views of the file's private mapping), so the
    weights would be page cache, read in on first touch, and dropped under pressure: not what an
    engine holding its model looks like, nor what a GPU engine's copy to the device does."""
    import torch

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()


def _trim() -> None:
    """Give the allocator's free pages back to the kernel before reading what the process holds:
    glibc keeps the loader's freed temporaries in its arenas (resident, counted), and later
    allocations reuse them without touching new pages, so growth would read low."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none (it frees eagerly)
