"""Ledger and admission benchmark: SQLite file vs PostgreSQL, measured side by side in one run.

    .venv/bin/python bench/ledger_bench.py [--cycles 2000] [--concurrency 64]

Prints per-backend grant+release latency (p50/p99), concurrent grant throughput, and the cost of
one pure admission decision over a 32-model snapshot; ratios are PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.pgcluster import pg_bindir, postgres_cluster  # noqa: E402
from lessor.daemon.config import DevicesConfig, HostPool, SimulatedGpu  # noqa: E402
from lessor.daemon.devices import SimProbe  # noqa: E402
from lessor.daemon.ledger import Granted, LeaseKind, LeaseWant, Ledger  # noqa: E402
from lessor.daemon.units import GiB, MiB  # noqa: E402
from lessor.policies import POLICIES, AdmissionRequest, DeviceBudget, ModelView, Snapshot  # noqa: E402

DEVICES = DevicesConfig(headroom=GiB, host=HostPool(headroom=4 * GiB, simulated_total=64 * GiB))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def sequential(url: str, cycles: int) -> list[float]:
    probe = SimProbe([SimulatedGpu(total=80 * GiB)], 64 * GiB)
    ledger = await Ledger.open(url, probe, DEVICES)
    wants = [LeaseWant("gpu0", LeaseKind.WEIGHTS, 8 * GiB), LeaseWant("gpu0", LeaseKind.LOAD_PEAK, GiB)]
    times = []
    try:
        for i in range(cycles):
            start = time.perf_counter()
            granted = await ledger.grant("m", wants, str(i))
            await ledger.release_attempt(str(i), "bench")
            times.append(time.perf_counter() - start)
            assert isinstance(granted, Granted)
    finally:
        await ledger.close()
    return times


async def concurrent(url: str, tasks: int, rounds: int) -> tuple[float, int]:
    probe = SimProbe([SimulatedGpu(total=80 * GiB)], 64 * GiB)
    ledger = await Ledger.open(url, probe, DEVICES)
    granted = 0
    try:
        start = time.perf_counter()
        for r in range(rounds):
            results = await asyncio.gather(*(ledger.grant(f"m{i}", [LeaseWant("gpu0", LeaseKind.KV, 2 * GiB)], f"{r}-{i}")
                                             for i in range(tasks)))
            granted += sum(isinstance(x, Granted) for x in results)
            await ledger.release([lease.id for lease in ledger.snapshot().leases], "bench")
        elapsed = time.perf_counter() - start
    finally:
        await ledger.close()
    return tasks * rounds / elapsed, granted // rounds


def policy_cost(n_models: int = 32, repeats: int = 20000) -> dict[str, float]:
    models = {f"m{i}": ModelView(f"m{i}", "ready", i % 5 * 20, i % 7 == 0, 0, float(i), {"gpu0": 2 * GiB})
              for i in range(n_models)}
    device = DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 0, n_models * 2 * GiB)
    snapshot = Snapshot({"gpu0": device}, models, 0.0)
    request = AdmissionRequest("new", {"gpu0": 20 * GiB + 512 * MiB}, 60)
    out = {}
    for name, policy in POLICIES.items():
        start = time.perf_counter()
        for _ in range(repeats):
            policy(request, snapshot)
        out[name] = (time.perf_counter() - start) / repeats
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        urls = {"sqlite": f"sqlite+aiosqlite:///{tmp}/ledger.db"}
        bindir = pg_bindir()
        if bindir:
            urls["postgresql"] = stack.enter_context(postgres_cluster(bindir))
        rows = {}
        for name, url in urls.items():
            times = await sequential(url, args.cycles)
            rate, per_round = await concurrent(url, args.concurrency, args.rounds)
            rows[name] = (pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3, statistics.mean(times) * 1e3, rate, per_round)
    print(f"ledger: {args.cycles} sequential grant+release cycles; {args.rounds} rounds of {args.concurrency} concurrent grants on one 80 GiB device")
    print(f"{'backend':<12}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'grants/s':>11}{'granted/round':>15}")
    for name, (p50, p99, mean, rate, per_round) in rows.items():
        print(f"{name:<12}{p50:>9.3f}{p99:>9.3f}{mean:>9.3f}{rate:>11.0f}{per_round:>15}")
    if len(rows) == 2:
        s, p = rows["sqlite"], rows["postgresql"]
        print(f"ratio postgresql/sqlite: p50 {p[0] / s[0]:.2f}x, grants/s {p[3] / s[3]:.2f}x")
    print("admission decision over a 32-model snapshot (pure policy):")
    for name, seconds in policy_cost().items():
        print(f"  {name:<10}{seconds * 1e6:8.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
