"""The built-in torch engine: an OpenAI-compatible server for a local HF-format model folder.

It loads in the two phases of lessor's load protocol. Phase 1 loads the weights and waits; lessor
measures, releases the load peak and grants the KV lease; phase 2 (`POST /lessor/v1/kv`) allocates
a static KV cache of exactly that size: `max_batch_size` slots of `context_tokens` tokens each.
Nothing grows after that, so what lessor leased is what the engine holds. On CUDA it also caps
itself to its lease with `torch.cuda.set_per_process_memory_fraction`.

Elastic KV: `POST /lessor/v1/kv/resize` ({"kv_tokens": N}) reallocates that cache at N tokens, the
slots kept, between `--min-kv-tokens` and the size phase 2 allocated, once no request runs in it
(it waits up to `wait_s`; requests arriving meanwhile wait for it). lessor shrinks a model's KV
lease this way to let another model load, and grows it back when the memory sits idle.

`GET /lessor/v1/state` reports what it holds (`memory_reserved`): on CUDA torch's reserved bytes;
on the CPU its own process measured, anonymous memory beyond a baseline taken just before the
weights. `measured` keeps that baseline (null until it is taken) and the growth over each phase: the weights once loaded,
the KV cache over its allocation.

Every answer is OpenAI's: a client's mistake a 400 naming the field (torch_requests.py checks each
body before it takes a slot), one line in the log; the engine's own failure during a stream ends
the stream with an error event and `[DONE]`, never cut short, its traceback in the log only
(the responses: torch_completion.py).
Decode steps run on a worker per slot, each step under its own inference mode (`Decoder`).

Run by lessor as `python -m lessor.engines.torch_server --model-path DIR --port N ...`; imports
torch and transformers only here, in the engine's own process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from .builtin import model_path_problem
from .torch_completion import Completion, Steps, failed
from .torch_engine import DTYPES, Engine
from .torch_requests import BadRequest, Generate, chat_request, completion_request, parse_body
from .torch_weights import CorruptCheckpoint

log = logging.getLogger("lessor.torch_server")
MIN_CONTEXT = 16  # tokens per sequence a resize leaves at least (engine.context_tokens' own lower bound)

# -- HTTP ------------------------------------------------------------------------------------

def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    if param and param != "phase":
        message = f"{param}: {message}"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}}, status=status)


def _refused(request: web.Request, exc: BadRequest) -> web.Response:
    """A client's mistake: a 400 naming the field, and one line in the log (never a traceback)."""
    log.info("400 %s %s: %s%s", request.method, request.path, f"{exc.param}: " if exc.param else "", exc)
    return _error(400, str(exc), exc.param)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every answer an OpenAI error: aiohttp's own refusals (404, 405, 413) and the engine's faults too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return _error(exc.status, exc.reason)
    except BadRequest as exc:
        return _refused(request, exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": failed(f"answering {request.path}", exc)}, status=500)


class Server:
    def __init__(self, engine: Engine, served_name: str) -> None:
        self.engine, self.served_name = engine, served_name
        self.free_slots: asyncio.Queue[int] | None = None
        self.decoding: ThreadPoolExecutor | None = None  # one worker per slot, for the decode steps
        self.cancelled = 0  # requests whose client went away before the answer was complete
        self.min_kv_tokens: int | None = None  # --min-kv-tokens: the least a resize may leave
        self.max_kv_tokens: int | None = None  # the cache of phase 2, taken at the first resize
        self.resizing = asyncio.Lock()
        # Phase stamps on CLOCK_MONOTONIC, which lessord shares: its load timeline subtracts them
        # from its own marks (daemon/models/timeline.py), so a cold start shows the engine's share apart.
        self.times: dict[str, float] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20, middlewares=[_errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/lessor/v1/state", self.state)
        app.router.add_post("/lessor/v1/kv", self.allocate)
        app.router.add_post("/lessor/v1/kv/resize", self.resize)
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
        return web.json_response({**state, "requests_in_flight": busy, "requests_cancelled": self.cancelled,
                                  "times": self.times})

    async def allocate(self, request: web.Request) -> web.Response:
        body = parse_body(await request.read())
        try:
            tokens, batch = _positive(body, "context_tokens"), _positive(body, "max_batch_size")
            self.times["kv_start"] = time.monotonic()
            await asyncio.to_thread(self.engine.allocate_kv, tokens, batch, body.get("memory_limit_bytes"))
            self.times["kv_allocated"] = time.monotonic()
        except BadRequest as exc:
            return _error(409 if exc.param == "phase" else 400, str(exc), exc.param)
        except Exception as exc:  # CUDA OOM above the cap: lessor rolls the load back
            self.engine.error = f"{type(exc).__name__}: {exc}"
            return _error(507, f"allocating the KV cache failed: {self.engine.error}", "context_tokens", "server_error")
        self.decoding = ThreadPoolExecutor(max_workers=batch, thread_name_prefix="decode")
        self.free_slots = asyncio.Queue()
        for slot in range(batch):
            self.free_slots.put_nowait(slot)
        return web.json_response({**self.engine.measure(), "times": self.times})

    async def resize(self, request: web.Request) -> web.Response:
        """Elastic KV: the cache again at `kv_tokens` (all slots together; the slots kept), between
        --min-kv-tokens and the size phase 2 allocated. It waits up to `wait_s` for the running
        requests to end (new ones wait for it), then reallocates. The answer: what it now holds."""
        body = parse_body(await request.read())
        free = self.free_slots
        if self.engine.phase != "ready" or free is None:
            return _error(409, f"the KV cache is resized once the model is ready; phase is {self.engine.phase}", "phase")
        tokens, wait_s, limit = _resize_request(body)
        low, high = self._kv_bounds()
        if not low <= tokens <= high:
            side = (f"below this engine's minimum of {low} (--min-kv-tokens: the model's plan.min_kv_tokens)"
                    if tokens < low else f"above the {high} tokens it was allocated at load (a larger cache "
                    "needs a new load)")
            raise BadRequest("kv_tokens", f"{tokens} tokens is {side}; ask for {low} to {high}")
        batch = len(self.engine.slots)
        async with self.resizing:
            held = await self._hold_slots(wait_s)
            if isinstance(held, web.Response):
                return held
            try:
                await asyncio.to_thread(self.engine.resize_kv, tokens // batch, limit)
            except Exception as exc:  # CUDA OOM growing under the cap: the old size is back
                log.exception("resizing the KV cache to %d tokens failed", tokens)
                return _error(507, f"resizing the KV cache failed ({type(exc).__name__}: {exc}); it holds "
                              f"{self.engine.context_tokens * batch} tokens, as before", "kv_tokens", "server_error")
            finally:
                for slot in held:
                    free.put_nowait(slot)
        log.info("KV cache resized to %d tokens (%d per sequence)", self.engine.context_tokens * batch,
                 self.engine.context_tokens)
        return web.json_response({**self.engine.measure(), "kv_tokens": self.engine.context_tokens * batch,
                                  "min_kv_tokens": low, "max_kv_tokens": high})

    def _kv_bounds(self) -> tuple[int, int]:
        batch = len(self.engine.slots)
        if self.max_kv_tokens is None:
            self.max_kv_tokens = self.engine.context_tokens * batch
        return min(max(self.min_kv_tokens or 0, batch * MIN_CONTEXT), self.max_kv_tokens), self.max_kv_tokens

    async def _hold_slots(self, wait_s: float) -> list[int] | web.Response:
        """Every slot, once the requests in them ended (those waiting for one go first), or the
        409 to answer when some still run after `wait_s`."""
        free = self.free_slots
        assert free is not None  # made by phase 2; resize answered 409 before it
        held: list[int] = []
        deadline = asyncio.get_running_loop().time() + wait_s
        try:
            while len(held) < len(self.engine.slots):
                if not free.empty():  # wait_for with no time left fails even a ready get
                    held.append(free.get_nowait())
                    continue
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise asyncio.TimeoutError
                held.append(await asyncio.wait_for(free.get(), left))
        except asyncio.TimeoutError:
            running = len(self.engine.slots) - len(held)
            for slot in held:
                free.put_nowait(slot)
            return _error(409, f"{running} request(s) still ran after waiting {wait_s:g} s to resize the KV cache; "
                          "retry when it is idle, or with a longer wait_s", "wait_s")
        return held

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": 0, "owned_by": "lessor"}]})

    async def _ready_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the 503 to answer while the model is not ready."""
        if self.engine.phase != "ready" or self.free_slots is None:
            return _error(503, f"the model is not ready (phase {self.engine.phase})", kind="server_error")
        return parse_body(await request.read())

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._ready_body(request)
        if isinstance(body, web.Response):
            return body
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise BadRequest("input", "must be a non-empty string or a non-empty list of non-empty strings")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format", f"must be 'float' or 'base64'; got {encoding!r}")
        vectors, tokens = await asyncio.to_thread(self.engine.embed, texts)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": self.served_name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat_request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, completion_request)

    async def _complete(self, request: web.Request, read: Callable[[dict[str, Any]], Generate]) -> web.StreamResponse:
        body = await self._ready_body(request)
        if isinstance(body, web.Response):
            return body
        wanted = read(body)
        prompt = await asyncio.to_thread(self.engine.prompt_ids, wanted.messages, wanted.prompt)
        sampling = wanted.sampling(len(prompt), self.engine.context_tokens)
        free, decoding = self.free_slots, self.decoding
        assert free is not None and decoding is not None  # made by phase 2; _ready_body answered 503 before it
        slot = await free.get()
        try:  # a resize may have changed the context while it waited
            sampling = wanted.sampling(len(prompt), self.engine.context_tokens)
        except BadRequest:
            free.put_nowait(slot)
            raise
        decoder = self.engine.decoder(slot, prompt, sampling)
        steps = Steps(free, decoding, decoder)
        try:
            completion = Completion(self, wanted.messages is not None, len(prompt), wanted.stream)
            return await completion.run(request, steps, sampling)
        except (ConnectionResetError, asyncio.CancelledError):  # the client left: stop generating
            self.cancelled += 1
            raise
        finally:
            steps.release(slot)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # OpenAI's base64: float32 LE


def _positive(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(name, f"must be a positive integer; got {value!r}")
    return value


def _resize_request(body: dict[str, Any]) -> tuple[int, float, int | None]:
    """(kv_tokens, wait_s, memory_limit_bytes) of a resize's body, each checked."""
    tokens, wait_s, limit = body.get("kv_tokens"), body.get("wait_s", 30.0), body.get("memory_limit_bytes")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise BadRequest("kv_tokens", f"must be a positive integer (tokens of all sequences together); got {tokens!r}")
    if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or not 0 <= wait_s <= 3600:
        raise BadRequest("wait_s", f"must be a number of seconds from 0 to 3600; got {wait_s!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest("memory_limit_bytes", f"must be a positive integer or null; got {limit!r}")
    return tokens, float(wait_s), limit


def loaded_in_words(measured: dict[str, Any], read_s: float) -> str:
    """The "weights loaded:" line (lessor's readiness marker, and an exit's quoted last lines): words,
    not the state answer's dict, which stays on /lessor/v1/state."""
    held = measured["measured"]["weights_bytes"]
    return (f"{measured['weights_tensor_bytes'] / 2**20:.1f} MiB of tensors on {measured['device']}"
            + ("" if held is None else f", {held / 2**20:.1f} MiB held") + f", read in {read_s:.2f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lessor.engines.torch_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="HF-format folder: config.json, safetensors, tokenizer")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N (N among the visible devices)")
    parser.add_argument("--memory-limit-bytes", type=int, default=None, help="CUDA cap while loading (the lease)")
    parser.add_argument("--min-kv-tokens", type=int, default=None,
                        help="the smallest KV cache (all sequences) a resize may leave: the plan's min_kv_tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per decode step)")
    parser.add_argument("--fail-at-step", type=int, default=None, metavar="N",
                        help="tests only: decode step N of every request raises, to exercise the error path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    problem = model_path_problem(args.model_path)
    if problem is not None:  # one line the operator can act on, not transformers' traceback
        log.error("%s", problem)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    engine = Engine(args.model_path, args.dtype, args.device, args.memory_limit_bytes)
    engine.fail_at_step = args.fail_at_step
    server = Server(engine, args.served_model_name or os.path.basename(os.path.normpath(args.model_path)))
    server.min_kv_tokens = args.min_kv_tokens

    def load() -> None:
        try:
            server.times["weights_start"] = time.monotonic()
            engine.load_weights()
            # Stamped as the phase turns (a probe may see it from now), the line after: lessor's wake.
            server.times["weights_loaded"] = time.monotonic()
            server.times["weights_read_start"] = engine.read_started
            log.info("weights loaded: %s", loaded_in_words(engine.measure(),
                                                           server.times["weights_loaded"] - engine.read_started))
        except CorruptCheckpoint as exc:  # the operator's file: its name and what is wrong, not a traceback
            log.error("cannot read the weights: %s", exc)
            os._exit(3)
        except Exception as exc:
            log.exception("loading the weights failed")
            engine.error = f"{type(exc).__name__}: {exc}"
            # The last line is the cause: lessor quotes an exit's last log lines, and a traceback's
            # last lines are its frames.
            log.error("loading the weights failed: %s", engine.error)
            os._exit(3)  # the supervisor sees the exit and rolls the load back

    async def start(app: web.Application) -> None:
        threading.Thread(target=load, name="load-weights", daemon=True).start()

    app = server.app()
    app.on_startup.append(start)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
