"""The built-in torch engine: an OpenAI-compatible server for a local HF-format model folder.

It loads in the two phases of lessor's load protocol. Phase 1 loads the weights and waits; lessor
measures, releases the load peak and grants the KV lease; phase 2 (`POST /lessor/v1/kv`) allocates
a static KV cache of exactly that size: `max_batch_size` slots of `context_tokens` tokens each.
Nothing grows after that, so what lessor leased is what the engine holds. On CUDA it also caps
itself to its lease with `torch.cuda.set_per_process_memory_fraction`.

Run by lessor as `python -m lessor.engines.torch_server --model-path DIR --port N ...`; imports
torch and transformers only here, in the engine's own process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from aiohttp import web

log = logging.getLogger("lessor.torch_server")

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


# -- HTTP ------------------------------------------------------------------------------------

def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    if param and param != "phase":
        message = f"{param}: {message}"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}}, status=status)


def _sampling(body: dict[str, Any], room: int) -> Sampling:
    def number(name: str, default: float, low: float, high: float) -> float:
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise BadRequest(name, f"must be a number from {low} to {high}; got {value!r}")
        return float(value)

    if body.get("n", 1) != 1:
        raise BadRequest("n", "only n=1 is supported by the built-in engine")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = room
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens", f"must be a positive integer; got {max_tokens!r}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop", "must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("seed", f"must be an integer; got {seed!r}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos", f"must be true or false; got {ignore_eos!r}")
    return Sampling(min(max_tokens, room), number("temperature", 1.0, 0.0, 2.0), number("top_p", 1.0, 0.0, 1.0),
                    stop, seed, ignore_eos)


class Server:
    def __init__(self, engine: Engine, served_name: str) -> None:
        self.engine, self.served_name = engine, served_name
        self.free_slots: asyncio.Queue[int] | None = None
        self.cancelled = 0  # requests whose client went away before the answer was complete

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/lessor/v1/state", self.state)
        app.router.add_post("/lessor/v1/kv", self.allocate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        ready = self.engine.phase == "ready"
        return web.json_response({"status": "ok" if ready else self.engine.phase}, status=200 if ready else 503)

    async def state(self, request: web.Request) -> web.Response:
        state = await asyncio.to_thread(self.engine.measure)
        busy = 0 if self.free_slots is None else len(self.engine.slots) - self.free_slots.qsize()
        return web.json_response({**state, "requests_in_flight": busy, "requests_cancelled": self.cancelled})

    async def allocate(self, request: web.Request) -> web.Response:
        body = await _json(request)
        try:
            tokens, batch = body.get("context_tokens"), body.get("max_batch_size")
            for name, value in (("context_tokens", tokens), ("max_batch_size", batch)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise BadRequest(name, f"must be a positive integer; got {value!r}")
            kv = await asyncio.to_thread(self.engine.allocate_kv, tokens, batch, body.get("memory_limit_bytes"))
        except BadRequest as exc:
            return _error(409 if exc.param == "phase" else 400, str(exc), exc.param)
        except Exception as exc:  # CUDA OOM above the cap: lessor rolls the load back
            self.engine.error = f"{type(exc).__name__}: {exc}"
            return _error(507, f"allocating the KV cache failed: {self.engine.error}", "context_tokens", "server_error")
        self.free_slots = asyncio.Queue()
        for slot in range(batch):
            self.free_slots.put_nowait(slot)
        return web.json_response({"kv_bytes": kv, **self.engine.measure()})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": 0, "owned_by": "lessor"}]})

    async def _ready_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the error to answer: not ready yet (503), not an object (400)."""
        if self.engine.phase != "ready" or self.free_slots is None:
            return _error(503, f"the model is not ready (phase {self.engine.phase})", kind="server_error")
        body = await _json(request)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        return body

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._ready_body(request)
        if isinstance(body, web.Response):
            return body
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            return _error(400, "input: must be a non-empty string or a non-empty list of non-empty strings", "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return _error(400, f"encoding_format: must be 'float' or 'base64'; got {encoding!r}", "encoding_format")
        try:
            vectors, tokens = await asyncio.to_thread(self.engine.embed, texts)
        except BadRequest as exc:
            return _error(400, str(exc), exc.param)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": self.served_name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._ready_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            prompt = await asyncio.to_thread(self.engine.prompt_ids, body, chat)
            room = self.engine.context_tokens - len(prompt)
            if room < 1:
                raise BadRequest("messages" if chat else "prompt", f"the prompt has {len(prompt)} tokens; this engine's "
                                 f"context is {self.engine.context_tokens} tokens per sequence")
            sampling = _sampling(body, room)
        except BadRequest as exc:
            return _error(400, str(exc), exc.param)
        slot = await self.free_slots.get()
        try:
            completion = Completion(self, chat, len(prompt), bool(body.get("stream")))
            return await completion.run(request, self.engine.generate(slot, prompt, sampling), sampling)
        except (ConnectionResetError, asyncio.CancelledError):  # the client left: stop generating
            self.cancelled += 1
            raise
        finally:
            self.free_slots.put_nowait(slot)


class Completion:
    """One response, streamed (SSE) or whole, in the OpenAI shapes."""

    def __init__(self, server: Server, chat: bool, prompt_tokens: int, stream: bool) -> None:
        self.server, self.chat, self.prompt_tokens, self.stream = server, chat, prompt_tokens, stream
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if self.stream:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    def _body(self, choice: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if self.stream and self.chat else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.server.served_name,
               "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    async def run(self, request: web.Request, tokens: Iterator[int], sampling: Sampling) -> web.StreamResponse:
        response = None
        if self.stream:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            if self.chat:
                await _send(response, self._body(self._choice("", None, first=True)))
        ids: list[int] = []
        text, finish = "", "stop"
        decode = self.server.engine.tokenizer.decode
        while (token := await asyncio.to_thread(next, tokens, None)) is not None:
            ids.append(token)
            new_text = decode(ids, skip_special_tokens=True)
            if new_text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            hit = next((s for s in sampling.stop if s in new_text), None)
            if hit:
                new_text, finish = new_text[:new_text.index(hit)], "stop"
            if response is not None and len(new_text) > len(text):
                await _send(response, self._body(self._choice(new_text[len(text):], None)))
            text = new_text
            if hit:
                break
        else:
            finish = "length" if len(ids) >= sampling.max_tokens else "stop"  # eos ended it
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(ids),
                 "total_tokens": self.prompt_tokens + len(ids)}
        if response is None:
            return web.json_response(self._body(self._choice(text, finish), usage))
        await _send(response, self._body(self._choice(None, finish), usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # OpenAI's base64: float32 LE


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(body)}\n\n".encode())


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": {"message": "the body is not valid JSON",
                                                            "type": "invalid_request_error", "param": None,
                                                            "code": None}}), content_type="application/json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lessor.engines.torch_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="HF-format folder: config.json, safetensors, tokenizer")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N (N among the visible devices)")
    parser.add_argument("--memory-limit-bytes", type=int, default=None, help="CUDA cap while loading (the lease)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per decode step)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(args.threads)
    engine = Engine(args.model_path, args.dtype, args.device, args.memory_limit_bytes)
    server = Server(engine, args.served_model_name or os.path.basename(os.path.normpath(args.model_path)))

    def load() -> None:
        try:
            engine.load_weights()
            log.info("weights loaded: %s", engine.measure())
        except Exception as exc:
            log.exception("loading the weights failed")
            engine.error = f"{type(exc).__name__}: {exc}"
            os._exit(3)  # the supervisor sees the exit and rolls the load back

    async def start(app: web.Application) -> None:
        threading.Thread(target=load, name="load-weights", daemon=True).start()

    app = server.app()
    app.on_startup.append(start)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
