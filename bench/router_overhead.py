#!/usr/bin/env python3
"""Router overhead: the same requests sent straight to an engine and through lessor's router,
side by side in one run, at concurrency 1, 16 and 64, non-streaming and streaming.

It starts a real `lessord` (simulated device) whose one model is a stand-in engine
(bench/upstream.py, started by lessord as a `vllm` engine), loads it, then measures with a
small keep-alive HTTP/1.1 client on uvloop (one connection per concurrent client; the same
client for both paths). Prints req/s, p50/p99 latency and, for streams, time to first chunk,
with the ratio router/direct.

    .venv/bin/python bench/router_overhead.py            # --seconds 3 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Hello, how are you today?"}],
                   "max_tokens": 16}).encode()
STREAM_BODY = BODY[:-1] + b', "stream": true}'
# A model whose engine serves under one name (kind sglang): the router writes its alias over.
ONE_NAME, ALIAS = BODY.replace(b'"bench"', b'"bench1"'), BODY.replace(b'"bench"', b'"bench1-alias"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a lean HTTP/1.1 keep-alive client: the load generator must cost less than what it measures ----

class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future | None = None
        self.first_ns = 0
        self.header_end = -1
        self.length = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.header_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.header_end = end + 4
            head = bytes(self.buf[:end]).lower()
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    self.length = int(line[15:])
            if not head.startswith(b"http/1.1 200"):
                self.done.set_exception(RuntimeError(bytes(self.buf[:200]).decode(errors="replace")))
                return
        body = len(self.buf) - self.header_end
        if body > 0 and not self.first_ns:
            self.first_ns = time.perf_counter_ns()
        if (self.length >= 0 and body >= self.length) or (self.length < 0 and self.buf.endswith(b"0\r\n\r\n")):
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))

    async def request(self, raw: bytes) -> tuple[int, int]:
        """(ns to the end of the answer, ns to its first body bytes)."""
        self.buf.clear()
        self.header_end, self.length, self.first_ns = -1, -1, 0
        self.done = asyncio.get_running_loop().create_future()
        start = time.perf_counter_ns()
        self.transport.write(raw)
        await self.done
        return time.perf_counter_ns() - start, self.first_ns - start


@dataclass
class Result:
    latencies_ns: list[int] = field(default_factory=list)
    first_ns: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def rate(self) -> float:
        return len(self.latencies_ns) / self.seconds

    @staticmethod
    def pct(values: list[int], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def measure(port: int, path: str, body: bytes, concurrency: int, seconds: float, warmup: float) -> Result:
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(Connection, "127.0.0.1", port))[1] for _ in range(concurrency)]
    result = Result()
    t0 = time.perf_counter()
    measure_from, stop_at = t0 + warmup, t0 + warmup + seconds

    async def client(conn: Connection) -> None:
        while (now := time.perf_counter()) < stop_at:
            total, first = await conn.request(raw)
            if now >= measure_from:
                result.latencies_ns.append(total)
                result.first_ns.append(first)

    await asyncio.gather(*(client(c) for c in conns))
    result.seconds = seconds
    for conn in conns:
        conn.transport.close()
    return result


# -- lessord with the stand-in engine ----------------------------------------------------------

def start_lessord(workdir: Path) -> tuple[subprocess.Popen, str, int, int]:
    admin, router = free_port(), free_port()
    config = {
        "state_dir": str(workdir / "state"),
        "devices": {"probe": "sim", "simulated": [{"name": "sim", "total": "24GiB"}]},
        "models": [{"name": "bench", "engine": {"kind": "vllm", "model_path": str(workdir),
                                                "command": [sys.executable, str(ROOT / "bench" / "upstream.py")]},
                    "memory": {"weights": "1GiB", "kv_bytes_per_token": 65536}, "keep_alive": -1,
                    "plan": {"max_kv_tokens": 16384}},
                   {"name": "bench1", "aliases": ["bench1-alias"],
                    "engine": {"kind": "sglang", "model_path": str(workdir),
                               "command": [sys.executable, str(ROOT / "bench" / "upstream.py")]},
                    "memory": {"weights": "1GiB", "kv_bytes_per_token": 65536}, "keep_alive": -1,
                    "plan": {"max_kv_tokens": 16384}}],
    }
    (workdir / "lessor.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(workdir / "lessor.yaml"), "--sim",
                             "--admin-listen", f"127.0.0.1:{admin}", "--router-listen", f"127.0.0.1:{router}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{admin}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"lessord did not start: {proc.stderr.read()}")
            time.sleep(0.1)
    token = (workdir / "state" / "admin.token").read_text().strip()
    endpoints = []
    for model in ("bench", "bench1"):
        request = urllib.request.Request(url + f"/admin/v1/models/{model}", data=b'{"action": "load"}', method="POST",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            endpoints.append(json.loads(r.read())["endpoint"])
    return proc, endpoints[0], int(endpoints[0].rsplit(":", 1)[1]), router


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2, help="direct/router alternations per case (results pooled)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run

    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint, direct_port, router_port = start_lessord(Path(tmp))
        try:
            print(f"router overhead: {os.cpu_count()} cores; lessord router on :{router_port}, stand-in engine "
                  f"at {endpoint}; {args.rounds} x {args.seconds:g} s per case, results pooled")
            print(f"{'case':<18}{'path':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ttfc p50':>10}{'ttfc p99':>10}")
            summary = {}
            for stream in (False, True):
                for conc in args.concurrency:
                    pooled = {"direct": Result(), "router": Result()}
                    for _ in range(args.rounds):  # alternate, so drift hits both paths alike
                        for name, port in (("direct", direct_port), ("router", router_port)):
                            r = run(measure(port, "/v1/chat/completions", STREAM_BODY if stream else BODY, conc,
                                            args.seconds, args.warmup))
                            pooled[name].latencies_ns += r.latencies_ns
                            pooled[name].first_ns += r.first_ns
                            pooled[name].seconds += r.seconds
                    case = f"{'stream' if stream else 'plain'} c={conc}"
                    for name, r in pooled.items():
                        ttfc = (f"{r.pct(r.first_ns, 0.5):>10.3f}{r.pct(r.first_ns, 0.99):>10.3f}" if stream else "")
                        print(f"{case:<18}{name:<8}{r.rate():>9.0f}{r.pct(r.latencies_ns, 0.5):>9.3f}"
                              f"{r.pct(r.latencies_ns, 0.99):>9.3f}{ttfc}")
                    d, rt = pooled["direct"], pooled["router"]
                    summary[(stream, conc)] = (d, rt)
                    print(f"{case:<18}{'ratio':<8}{rt.rate() / d.rate():>8.2f}x"
                          f"{rt.pct(rt.latencies_ns, 0.5) / d.pct(d.latencies_ns, 0.5):>8.2f}x"
                          f"{rt.pct(rt.latencies_ns, 0.99) / d.pct(d.latencies_ns, 0.99):>8.2f}x")
            report_goals(summary, args.concurrency)
            aliases(run, router_port, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def aliases(run, router_port: int, args) -> None:
    """The alias's cost, through the router both ways: its name as given, and an alias the router
    writes over (the body parsed, `model` replaced, serialized again)."""
    print("alias rewrite (engine serving one name), router only:")
    for conc in (1, 16):
        pooled = {"name": Result(), "alias": Result()}
        for _ in range(args.rounds):
            for name, body in (("name", ONE_NAME), ("alias", ALIAS)):
                r = run(measure(router_port, "/v1/chat/completions", body, conc, args.seconds, args.warmup))
                pooled[name].latencies_ns += r.latencies_ns
                pooled[name].seconds += r.seconds
        for name, r in pooled.items():
            print(f"{'plain c=' + str(conc):<18}{name:<8}{r.rate():>9.0f}{r.pct(r.latencies_ns, 0.5):>9.3f}"
                  f"{r.pct(r.latencies_ns, 0.99):>9.3f}")
        n, a = pooled["name"], pooled["alias"]
        print(f"{'plain c=' + str(conc):<18}{'ratio':<8}{a.rate() / n.rate():>8.2f}x"
              f"{a.pct(a.latencies_ns, 0.5) / n.pct(n.latencies_ns, 0.5):>8.2f}x"
              f"{a.pct(a.latencies_ns, 0.99) / n.pct(n.latencies_ns, 0.99):>8.2f}x")
    rewrite_cost()


def rewrite_cost(requests: int = 200_000) -> None:
    """The rewrite alone, in this process (the HTTP rows above are noisier than it is small): the
    router's parse of the body, without and with the alias written over, side by side."""
    from lessor.api.router import parse_body, renamed

    def parse() -> None:
        parse_body(ALIAS)

    def parse_and_rename() -> None:
        renamed(parse_body(ALIAS)[2], "bench1")
    costs = {}
    for _ in range(3):  # alternate, best of three
        for name, step in (("parse", parse), ("parse+rename", parse_and_rename)):
            start = time.perf_counter_ns()
            for _ in range(requests):
                step()
            costs[name] = min(costs.get(name, 1 << 62), (time.perf_counter_ns() - start) / requests / 1000)
    print(f"body parse {costs['parse']:.2f} us, with the alias written over {costs['parse+rename']:.2f} us: "
          f"the rewrite adds {costs['parse+rename'] - costs['parse']:.2f} us a request ({len(ALIAS)}-byte body)")


def report_goals(summary, concurrency: list[int]) -> None:
    low, high = min(concurrency), max(concurrency)
    d, r = summary[(False, low)]
    added = r.pct(r.latencies_ns, 0.5) - d.pct(d.latencies_ns, 0.5)
    print(f"added p50 latency at c={low}: {added:.3f} ms (goal <= 0.3 ms)")
    d, r = summary[(False, high)]
    print(f"router/direct throughput at c={high}: {r.rate() / d.rate():.2f} (goal >= 0.60)")
    d, r = summary[(True, low)]
    added = r.pct(r.first_ns, 0.5) - d.pct(d.first_ns, 0.5)
    print(f"added time to first chunk (p50) at c={low}: {added:.3f} ms (goal <= 0.5 ms)")


if __name__ == "__main__":
    main()
