#!/usr/bin/env python3
"""A stand-in for an engine's server (vLLM, SGLang, ktransformers, llama-server): it records the
argv, environment and working folder it was started with into $LESSOR_STANDIN_RECORD, then serves
/health, /v1/models and /v1/chat/completions on the --port it was given. Standard library only, so
it runs under any python3 as the real engines would run under theirs."""

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def flag(argv, *names, default=None):
    for i, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[i + 1]
    return default


def served_names(argv) -> list[str]:
    """vLLM's --served-model-name takes several names (the rest one): the values up to the next flag."""
    for i, arg in enumerate(argv):
        if arg in ("--served-model-name", "--alias", "--model_alias", "--model_name"):
            names = []
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                names.append(value)
            return names
    return ["standin"]


def escape(pid_file: str) -> None:
    """Leave a worker behind the way engines that daemonise them do (Ray-style): a child that
    calls setsid() (out of the engine's process group) and forks again, then exits, so the
    grandchild is orphaned; it sleeps for ever, with the engine's environment and output pipe.
    Its pid is in `pid_file` before this returns. LESSOR_STANDIN_ESCAPE_IGNORE_TERM: it ignores
    SIGTERM (only SIGKILL ends it)."""
    child = os.fork()
    if child == 0:
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            if os.environ.get("LESSOR_STANDIN_ESCAPE_IGNORE_TERM"):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                signal.pause()
        with open(pid_file + ".tmp", "w") as f:  # whole, or not there: the test reads it once it is
            f.write(str(grandchild))
        os.rename(pid_file + ".tmp", pid_file)
        os._exit(0)
    os.waitpid(child, 0)


def main() -> None:
    argv = sys.argv[1:]
    record = os.environ.get("LESSOR_STANDIN_RECORD")
    if record:
        with open(record, "w") as f:
            json.dump({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}, f)
    starts = os.environ.get("LESSOR_STANDIN_STARTS")
    if starts:  # one line per start: how many times lessor tried
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("LESSOR_STANDIN_PRINT_ARGS"):  # print what it was given, as vLLM prints its non-default args
        print(f"stand-in: args: {' '.join(argv)}", flush=True)
        print(f"stand-in: environment: {dict(os.environ)}", flush=True)
    if os.environ.get("LESSOR_STANDIN_OOM"):  # behave like vLLM when its profile run does not fit
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
              "capacity of 23.55 GiB of which 1.02 GiB is free.", flush=True)
        sys.exit(1)
    if os.environ.get("LESSOR_STANDIN_ESCAPE"):  # a worker that escapes the process group
        escape(os.environ["LESSOR_STANDIN_ESCAPE"])
    if os.environ.get("LESSOR_STANDIN_EXIT"):  # behave like an engine that dies at start
        print("stand-in: exiting as asked", flush=True)
        sys.exit(int(os.environ["LESSOR_STANDIN_EXIT"]))
    names = served_names(argv)
    name = names[0]
    # LESSOR_STANDIN_CRASH_ON_REQUEST=N: exit with code N at the first request, after /health said
    # ok, as vLLM 0.32's CPU build does for a head size its attention lacks.
    crash = os.environ.get("LESSOR_STANDIN_CRASH_ON_REQUEST")
    # An engine slow to load (or, with a large value, one that never becomes ready).
    ready_at = time.monotonic() + float(os.environ.get("LESSOR_STANDIN_READY_AFTER_S", "0"))
    # LESSOR_STANDIN_ANSWER: how a POST is answered, for the router's bounds: "stall" (never: the
    # request is read, then nothing), "stall_stream" (an event stream's head and first event, then
    # nothing), "flood" (an event stream that never ends, as fast as it can be written). Each ends
    # only when its client leaves, and then appends a line to $LESSOR_STANDIN_ENDS.
    answer = os.environ.get("LESSOR_STANDIN_ANSWER", "")

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body, status=200):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                if time.monotonic() < ready_at:
                    self._send({"status": "loading"}, 503)
                else:
                    self._send({"status": "ok"})
            elif self.path == "/v1/models":
                self._send({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            else:
                self._send({"error": "not found"}, 404)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if crash is not None:
                print("stand-in: crashing at the first request, as asked", flush=True)
                os._exit(int(crash))
            if answer:
                self._misbehave(answer)
                return
            if body.get("model", name) not in names:  # as vLLM: a name it was not given does not exist
                self._send({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                      "type": "NotFoundError", "code": 404}}, 404)
                return
            self._send({"id": "standin", "object": "chat.completion", "model": name, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"stand-in for {name}"},
                 "finish_reason": "stop"}]})

        def _misbehave(self, how):
            try:
                if how != "stall":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()  # no length: the answer ends with the connection (HTTP/1.0)
                    self.wfile.write(b'data: {"n": 0}\n\n')
                    self.wfile.flush()
                while how == "flood":
                    self.wfile.write(b"data: " + b"x" * 16384 + b"\n\n")
                self.rfile.read(1)  # blocks until the client leaves (it sends nothing more)
            except OSError:  # a write to a client that left
                pass
            ends = os.environ.get("LESSOR_STANDIN_ENDS")
            if ends:
                with open(ends, "a") as f:
                    f.write(f"{how}: client gone\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((flag(argv, "--host", default="127.0.0.1"), int(flag(argv, "--port"))), Handler)
    print(f"stand-in serving {name}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
