#!/usr/bin/env python3
"""Router overhead: the same requests sent straight to an engine, through lessor's router and
through nginx, side by side in one run, at concurrency 1, 16 and 64, non-streaming and streaming.

It starts a real `lessord` (simulated device) whose one model is a stand-in engine
(bench/upstream.py, started by lessord as a `vllm` engine), loads it, and Debian's nginx (when
installed; tests/support/install-system-deps.sh installs it) as a keep-alive reverse proxy to the same
engine, with its own config on a free port. Then it measures with a small keep-alive HTTP/1.1
client on uvloop (one connection per concurrent client; the same client for every path). Prints
req/s, p50/p99 latency, for streams the time to first chunk, and each proxy's CPU per request
(utime+stime from /proc/PID/stat before and after each cell: lessord's own process, where the
router runs, not its engine; nginx's master and workers), with the ratios to direct and to nginx.

    .venv/bin/python -m bench.router_overhead            # --seconds 3 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    transport: asyncio.Transport  # connection_made's, before create_connection returns the protocol

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done: asyncio.Future | None = None
        self.first_ns = 0
        self.header_end = -1
        self.length = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        done = self.done
        assert done is not None, "request() makes the future before it writes"
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
                done.set_exception(RuntimeError(bytes(self.buf[:200]).decode(errors="replace")))
                return
        body = len(self.buf) - self.header_end
        if body > 0 and not self.first_ns:
            self.first_ns = time.perf_counter_ns()
        if (self.length >= 0 and body >= self.length) or (self.length < 0 and self.buf.endswith(b"0\r\n\r\n")):
            done.set_result(None)

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
    sent: int = 0  # requests answered in the cell, warm-up included (what the CPU was spent on)

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
            result.sent += 1
            if now >= measure_from:
                result.latencies_ns.append(total)
                result.first_ns.append(first)

    await asyncio.gather(*(client(c) for c in conns))
    result.seconds = seconds
    for conn in conns:
        conn.transport.close()
    return result


# -- lessord with the stand-in engine ----------------------------------------------------------

def spawn_lessord(workdir: Path, config: dict) -> tuple[subprocess.Popen, str, int]:
    """lessord on `config` (written to workdir/lessor.yaml), simulated devices, free ports; once
    its /readyz answers: (process, admin URL, router port). bench/cold_start.py uses it too."""
    admin, router = free_port(), free_port()
    (workdir / "lessor.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(workdir / "lessor.yaml"), "--sim",
                             "--admin-listen", f"127.0.0.1:{admin}", "--router-listen", f"127.0.0.1:{router}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{admin}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1).close()
            return proc, url, router
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"lessord did not start: {proc.communicate()[1]}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("lessord did not answer /readyz within 60 s")


def start_lessord(workdir: Path) -> tuple[subprocess.Popen, str, int, int]:
    # Two models of the same stand-in engine: one served under its names, one whose alias is rewritten.
    engine = {"model_path": str(workdir), "command": [sys.executable, str(ROOT / "bench" / "upstream.py")]}
    sizes = {"memory": {"weights": "1GiB", "kv_bytes_per_token": 65536}, "keep_alive": -1,
             "plan": {"max_kv_tokens": 16384}}
    config = {"state_dir": str(workdir / "state"),
              "devices": {"probe": "sim", "simulated": [{"name": "sim", "total": "24GiB"}]},
              "models": [{"name": "bench", "engine": {"kind": "vllm", **engine}, **sizes},
                         {"name": "bench1", "aliases": ["bench1-alias"], "engine": {"kind": "sglang", **engine}, **sizes}]}
    proc, url, router = spawn_lessord(workdir, config)
    token = (workdir / "state" / "admin.token").read_text().strip()
    endpoints = []
    for model in ("bench", "bench1"):
        request = urllib.request.Request(url + f"/admin/v1/models/{model}", data=b'{"action": "load"}', method="POST",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            endpoints.append(json.loads(r.read())["endpoint"])
    return proc, endpoints[0], int(endpoints[0].rsplit(":", 1)[1]), router


NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream engine {{ server 127.0.0.1:{engine}; keepalive 128; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, engine_port: int) -> tuple[subprocess.Popen | None, int]:
    """nginx as a keep-alive reverse proxy to the engine, one worker (lessor's router is one
    thread); (None, 0) with a line saying why when there is no nginx here."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        print("nginx: not installed (tests/support/install-system-deps.sh installs nginx-light): skipped")
        return None, 0
    port, ndir = free_port(), workdir / "nginx"
    ndir.mkdir()
    (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, engine=engine_port, port=port))
    proc = subprocess.Popen([binary, "-p", str(ndir), "-c", str(ndir / "nginx.conf"), "-e", str(ndir / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                print(f"nginx: did not start ({proc.communicate()[1].strip()[:300]}): skipped")
                return None, 0
            time.sleep(0.1)
    proc.terminate()
    print("nginx: not listening after 10 s: skipped")
    return None, 0


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    """utime+stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total * TICK_S


def tree(pid: int) -> list[int]:
    """pid and its children (nginx's master and its workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [int(c) for c in children]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2, help="direct/router alternations per case (results pooled)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    run: Callable[..., Any]
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run

    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint, direct_port, router_port = start_lessord(Path(tmp))
        nginx, nginx_port = start_nginx(Path(tmp), direct_port)
        try:
            paths = {"direct": (direct_port, lambda: []), "lessor": (router_port, lambda: [proc.pid])}
            if nginx is not None:
                paths["nginx"] = (nginx_port, lambda: tree(nginx.pid))
            print(f"router overhead: {os.cpu_count()} cores; lessord router on :{router_port}, stand-in engine "
                  f"at {endpoint}" + (f", nginx on :{nginx_port} (1 worker)" if nginx else "") +
                  f"; {args.rounds} x {args.seconds:g} s per cell, rounds interleaved, results pooled")
            print("cpu us/req: lessord's own process (the router; not its engine); nginx's master + workers")
            print(f"{'case':<18}{'path':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ttfc p50':>10}{'ttfc p99':>10}"
                  f"{'cpu us/req':>12}")
            summary = {}
            for stream in (False, True):
                for conc in args.concurrency:
                    pooled = {name: Result() for name in paths}
                    cpu = dict.fromkeys(paths, 0.0)
                    for _ in range(args.rounds):  # alternate, so drift hits every path alike
                        for name, (port, pids) in paths.items():
                            before = cpu_s(pids())
                            r = run(measure(port, "/v1/chat/completions", STREAM_BODY if stream else BODY, conc,
                                            args.seconds, args.warmup))
                            cpu[name] += cpu_s(pids()) - before
                            pooled[name].latencies_ns += r.latencies_ns
                            pooled[name].first_ns += r.first_ns
                            pooled[name].seconds += r.seconds
                            pooled[name].sent += r.sent
                    case = f"{'stream' if stream else 'plain'} c={conc}"
                    for name, r in pooled.items():
                        ttfc = (f"{r.pct(r.first_ns, 0.5):>10.3f}{r.pct(r.first_ns, 0.99):>10.3f}" if stream
                                else " " * 20)
                        per = f"{cpu[name] / r.sent * 1e6:>12.1f}" if name != "direct" else ""
                        print(f"{case:<18}{name:<8}{r.rate():>9.0f}{r.pct(r.latencies_ns, 0.5):>9.3f}"
                              f"{r.pct(r.latencies_ns, 0.99):>9.3f}{ttfc}{per}")
                    d = pooled["direct"]
                    for name in paths:
                        if name == "direct":
                            continue
                        rt = pooled[name]
                        print(f"{case:<18}{name[:2] + '/dir':<8}{rt.rate() / d.rate():>8.2f}x"
                              f"{rt.pct(rt.latencies_ns, 0.5) / d.pct(d.latencies_ns, 0.5):>8.2f}x"
                              f"{rt.pct(rt.latencies_ns, 0.99) / d.pct(d.latencies_ns, 0.99):>8.2f}x")
                    summary[(stream, conc)] = (pooled, {n: cpu[n] / pooled[n].sent * 1e6 for n in paths})
            report_goals(summary, args.concurrency)
            aliases(run, router_port, args)
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(30)
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
    costs: dict[str, float] = {}
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
    pooled, _ = summary[(False, low)]
    d, r = pooled["direct"], pooled["lessor"]
    added = r.pct(r.latencies_ns, 0.5) - d.pct(d.latencies_ns, 0.5)
    print(f"added p50 latency at c={low}: {added:.3f} ms (goal <= 0.3 ms)")
    pooled, _ = summary[(True, low)]
    d, r = pooled["direct"], pooled["lessor"]
    added = r.pct(r.first_ns, 0.5) - d.pct(d.first_ns, 0.5)
    print(f"added time to first chunk (p50) at c={low}: {added:.3f} ms (goal <= 0.5 ms)")
    for stream in (False, True):
        pooled, cpu = summary[(stream, high)]
        kind = "stream" if stream else "plain"
        d, r = pooled["direct"], pooled["lessor"]
        line = f"{kind} c={high}: lessor/direct throughput {r.rate() / d.rate():.2f} (goal >= 0.85)"
        if "nginx" in pooled:
            n = pooled["nginx"]
            line += (f", nginx/direct {n.rate() / d.rate():.2f}; lessor/nginx cpu per request "
                     f"{cpu['lessor'] / cpu['nginx']:.2f} (goal <= 1.25)")
        print(line)


if __name__ == "__main__":
    main()
