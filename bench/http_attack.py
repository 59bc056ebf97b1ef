#!/usr/bin/env python3
"""Latency under a huge-header attack: a control client's GET latency on each of lessord's
listeners (admin `/healthz`, router `/v1/models`), first alone, then while another process throws
128 MB request heads at the same port, connection after connection, for the whole window.

It starts a real `lessord` (simulated device, no models) from the lessor this Python imports, so
PYTHONPATH picks the tree measured. The control client is one keep-alive connection, one request
at a time; the attacker is a separate process (its sending must not slow the control client's
loop). Prints p50/p99/max per listener and phase, and how much of each attack head the server took.

    .venv/bin/python -m bench.http_attack            # --seconds 5 --header-mb 128
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

PATHS = {"admin": "/healthz", "router": "/v1/models"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_lessord(workdir: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"admin": free_port(), "router": free_port()}
    config = {"state_dir": str(workdir / "state"), "models": [],
              "devices": {"probe": "sim", "simulated": [{"name": "sim", "total": "24GiB"}]}}
    (workdir / "lessor.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "lessor.api.service", "--config", str(workdir / "lessor.yaml"),
                             "--sim", "--admin-listen", f"127.0.0.1:{ports['admin']}",
                             "--router-listen", f"127.0.0.1:{ports['router']}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=1).close()
            return proc, ports
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("lessord did not start") from None
            time.sleep(0.1)
    raise SystemExit("lessord did not answer /readyz in 30 s")


def attack(port: int, header_mb: int, stop_at: float, taken, heads) -> None:
    """Head after head of `header_mb` MB, each on a new connection, until `stop_at`; counts the
    heads begun and the bytes that went out before the server refused (kernel buffers included)."""
    piece = b"a" * (1 << 20)
    while time.time() < stop_at:
        sent = 0
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(header_mb):
                    sock.sendall(piece)
                    sent += len(piece)
                    if time.time() >= stop_at:
                        break
                sock.sendall(b"\r\n\r\n")
                sock.settimeout(max(0.1, stop_at - time.time()))
                sock.recv(65536)
        except OSError:
            pass
        with taken.get_lock():
            taken.value += sent
            heads.value += 1


async def control(port: int, path: str, seconds: float) -> list[float]:
    """Latencies (ms) of sequential GETs on one keep-alive connection for `seconds`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    latencies, stop_at = [], time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
        await reader.readexactly(length)
        latencies.append((time.perf_counter() - start) * 1000)
    writer.close()
    return latencies


def row(side: str, phase: str, latencies: list[float], extra: str = "") -> str:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return (f"{side:<7}{phase:<10}{len(ordered):>8}{pct(0.5):>9.2f}{pct(0.99):>9.2f}{ordered[-1]:>10.2f}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (default 5)")
    parser.add_argument("--header-mb", type=int, default=128, help="size of each attack head (default 128)")
    args = parser.parse_args()
    import lessor
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = start_lessord(Path(tmp))
        try:
            print(f"lessor from {Path(lessor.__file__).parent}; {args.header_mb} MB heads, {args.seconds:g} s a phase")
            print(f"{'port':<7}{'phase':<10}{'requests':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>10}")
            for side, path in PATHS.items():
                print(row(side, "alone", asyncio.run(control(ports[side], path, args.seconds))), flush=True)
                taken, heads = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
                attacker = multiprocessing.Process(target=attack, args=(ports[side], args.header_mb,
                                                                        time.time() + args.seconds, taken, heads))
                attacker.start()
                latencies = asyncio.run(control(ports[side], path, args.seconds))
                attacker.join()
                print(row(side, "attacked", latencies, f"{heads.value} heads, {taken.value / 2**20 / max(1, heads.value):.1f} MiB out each"), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
