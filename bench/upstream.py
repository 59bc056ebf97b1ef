#!/usr/bin/env python3
"""A stand-in engine for the router benchmark: an aiohttp + uvloop server that answers chat
completions at once, so what is measured is HTTP and the router, not a model.

lessord starts it as a `vllm` engine (`command: [python, bench/upstream.py]`), so it accepts
vLLM's flags and uses only --host and --port. Non-streaming: one ~400-byte JSON answer.
Streaming: the first SSE chunk at once, then after --gap-ms, eight more and [DONE].
"""

import argparse
import asyncio
import json

from aiohttp import web

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23}}).encode()


def chunk(content: str) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


FIRST, REST = chunk(""), b"".join(chunk(f" word{i}") for i in range(8)) + b"data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args, _ = parser.parse_known_args()  # vLLM's other flags are accepted and ignored
    gap = args.gap_ms / 1000

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body and b'"stream":true' not in body:
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(FIRST)
        await asyncio.sleep(gap)
        await response.write(REST)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
