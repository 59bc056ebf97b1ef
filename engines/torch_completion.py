"""The built-in torch engine's answers to a completion (engines/torch_server.py serves them): a
request's decode steps on the decoding workers, and one response, streamed (SSE) or whole, in
OpenAI's shapes. The engine's own failure during a stream ends the stream with an error event and
`[DONE]`, never cut short; its traceback goes to the log only (`failed`). Runs in the engine's own
process, as torch_server does."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .torch_engine import Decoder
from .torch_requests import Sampling

if TYPE_CHECKING:
    from .torch_server import Server

log = logging.getLogger("lessor.torch_server")


def failed(what: str, exc: BaseException) -> dict[str, Any]:
    """The error a client is told of the engine's own failure: its kind, not its traceback nor its
    paths (the log, which lessor's operator reads, has both)."""
    return {"message": f"the engine failed {what} ({type(exc).__name__}); its log has the details",
            "type": "server_error", "param": None, "code": None}


class Steps:
    """A request's decode steps on the decoding workers. Its slot goes back only once no step of
    it runs: a client that leaves mid-step must not hand the slot's cache to the next request
    while the step still writes into it."""

    def __init__(self, free: asyncio.Queue[int], decoding: ThreadPoolExecutor, decoder: Decoder) -> None:
        self.free, self.decoding, self.decoder = free, decoding, decoder  # the server's slots and workers
        self.running: Future | None = None

    async def next(self) -> int | None:
        self.running = self.decoding.submit(self.decoder.step)
        return await asyncio.wrap_future(self.running)

    def release(self, slot: int) -> None:
        free = self.free
        if self.running is None or self.running.done():
            free.put_nowait(slot)
        else:
            loop = asyncio.get_running_loop()
            self.running.add_done_callback(lambda _: loop.call_soon_threadsafe(free.put_nowait, slot))


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

    async def run(self, request: web.Request, steps: Steps, sampling: Sampling) -> web.StreamResponse:
        response = None
        if self.stream:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            if self.chat:
                await _send(response, self._body(self._choice("", None, first=True)))
        try:
            text, tokens, finish = await self._generate(steps, sampling, response)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the engine's fault: the client is told, the stream is ended, not cut
            log.exception("%s failed after %d tokens", self.id, steps.decoder.tokens)
            return await self._fail(response, exc)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                 "total_tokens": self.prompt_tokens + tokens}
        if response is None:
            return web.json_response(self._body(self._choice(text, finish), usage))
        await _send(response, self._body(self._choice(None, finish), usage))
        return await _done(response)

    async def _generate(self, steps: Steps, sampling: Sampling,
                        response: web.StreamResponse | None) -> tuple[str, int, str]:
        """(the text, its tokens, the finish reason); each new piece of text sent as it comes when streaming."""
        ids: list[int] = []
        text = ""
        decode = self.server.engine.tokenizer.decode
        while (token := await steps.next()) is not None:
            ids.append(token)
            new_text = decode(ids, skip_special_tokens=True)
            if new_text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            hit = next((s for s in sampling.stop if s in new_text), None)
            if hit:
                new_text = new_text[:new_text.index(hit)]
            if response is not None and len(new_text) > len(text):
                await _send(response, self._body(self._choice(new_text[len(text):], None)))
            text = new_text
            if hit:
                return text, len(ids), "stop"
        return text, len(ids), "length" if len(ids) >= sampling.max_tokens else "stop"  # or eos ended it

    async def _fail(self, response: web.StreamResponse | None, exc: Exception) -> web.StreamResponse:
        error = failed("while generating", exc)
        if response is None:
            return web.json_response({"error": error}, status=500)
        await _send(response, {"error": error})  # what OpenAI's clients raise as an APIError mid-stream
        return await _done(response)


async def _done(response: web.StreamResponse) -> web.StreamResponse:
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(body)}\n\n".encode())
