"""Ledger and admission benchmark: SQLite file vs PostgreSQL, measured side by side in one run.

    .venv/bin/python -m bench.ledger_bench [--cycles 2000] [--concurrency 64] [--quick-check-leases 100000]

Prints per-backend grant+release latency (p50/p99), concurrent grant throughput, and the cost of
one pure admission decision over a 32-model snapshot; ratios are PostgreSQL / SQLite. The SQLite
rows are measured twice: with the ledger's record (daemon/ledger/record.py: as lessord runs) and
without. Last, the integrity check lessord runs at start (`PRAGMA quick_check`) on a file of that
many leases, and the whole open of that file.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `bench` from the repo root

from bench.pgcluster import pg_bindir, postgres_cluster
from lessor.daemon.config.schema import DevicesConfig, HostPool, SimulatedGpu
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.leases import Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.database import inspect_sqlite
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.ledger.record import LedgerRecord
from lessor.daemon.units import GiB, MiB
from lessor.policies import POLICIES, AdmissionRequest, DeviceBudget, ModelView, Snapshot

DEVICES = DevicesConfig(headroom=GiB, host=HostPool(headroom=4 * GiB, simulated_total=64 * GiB))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def sequential(url: str, cycles: int, record: LedgerRecord | None = None) -> list[float]:
    probe = SimProbe([SimulatedGpu(total=80 * GiB)], 64 * GiB)
    ledger = await Ledger.open(url, probe, DEVICES, record=record)
    wants = [LeaseWant("gpu0", LeaseKind.WEIGHTS, 8 * GiB), LeaseWant("gpu0", LeaseKind.LOAD_PEAK, GiB)]
    times = []
    # Another model stays loaded meanwhile, as in a daemon that serves: the ledger is never empty.
    await ledger.grant("standing", [LeaseWant("gpu0", LeaseKind.WEIGHTS, GiB)], "standing")
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


async def concurrent(url: str, tasks: int, rounds: int, record: LedgerRecord | None = None) -> tuple[float, int]:
    probe = SimProbe([SimulatedGpu(total=80 * GiB)], 64 * GiB)
    ledger = await Ledger.open(url, probe, DEVICES, record=record)
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


async def quick_check_cost(folder: Path, leases: int, repeats: int = 5) -> tuple[int, float, float]:
    """A SQLite ledger of `leases` released leases (a week of history is what makes the file grow),
    then the median of `repeats`: quick_check alone, and Ledger.open with its record (all checks,
    migration, the granted leases read). (file bytes, quick_check s, open s)."""
    path = folder / "big.db"
    url = f"sqlite+aiosqlite:///{path}"
    probe = SimProbe([SimulatedGpu(total=80 * GiB)], 64 * GiB)
    await (await Ledger.open(url, probe, DEVICES)).close()
    connection = sqlite3.connect(path)
    connection.executemany("INSERT INTO lessor_leases VALUES (?, ?, 'gpu0', 'kv', ?, 'released', ?, 1, 1.0, ?, ?, 'bench')",
                           ((f"{i:036d}", f"m{i % 32}", GiB, f"{i:036d}", float(i), float(i + 1)) for i in range(leases)))
    connection.commit()
    connection.close()
    record = LedgerRecord(folder / "big-record.json")
    checks, opens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        inspect_sqlite(path)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        await (await Ledger.open(url, probe, DEVICES, record=record)).close()
        opens.append(time.perf_counter() - start)
    return path.stat().st_size, statistics.median(checks), statistics.median(opens)


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
    parser.add_argument("--quick-check-leases", type=int, default=100_000)
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        record = LedgerRecord(Path(tmp) / "ledger-record.json")
        urls = {"sqlite": (f"sqlite+aiosqlite:///{tmp}/ledger.db", None),
                "sqlite+record": (f"sqlite+aiosqlite:///{tmp}/ledger2.db", record)}
        bindir = pg_bindir()
        if bindir:
            urls["postgresql"] = (stack.enter_context(postgres_cluster(bindir)), None)
        rows = {}
        for name, (url, kept) in urls.items():
            times = await sequential(url, args.cycles, kept)
            rate, per_round = await concurrent(url, args.concurrency, args.rounds, kept)
            rows[name] = (pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3, statistics.mean(times) * 1e3, rate, per_round)
        size, check_s, open_s = await quick_check_cost(Path(tmp), args.quick_check_leases)
    print(f"ledger: {args.cycles} sequential grant+release cycles; {args.rounds} rounds of {args.concurrency} concurrent grants on one 80 GiB device")
    print(f"{'backend':<12}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'grants/s':>11}{'granted/round':>15}")
    for name, (p50, p99, mean, rate, per_round) in rows.items():
        print(f"{name:<12}{p50:>9.3f}{p99:>9.3f}{mean:>9.3f}{rate:>11.0f}{per_round:>15}")
    s, r = rows["sqlite"], rows["sqlite+record"]
    print(f"ratio sqlite+record/sqlite (the record kept as lessord keeps it): p50 {r[0] / s[0]:.2f}x, "
          f"grants/s {r[3] / s[3]:.2f}x")
    if "postgresql" in rows:
        p = rows["postgresql"]
        print(f"ratio postgresql/sqlite: p50 {p[0] / s[0]:.2f}x, grants/s {p[3] / s[3]:.2f}x")
    print(f"start-up check of a SQLite ledger of {args.quick_check_leases} leases ({size / 2**20:.1f} MiB): "
          f"quick_check {check_s * 1e3:.0f} ms, whole open {open_s * 1e3:.0f} ms")
    print("admission decision over a 32-model snapshot (pure policy):")
    for name, seconds in policy_cost().items():
        print(f"  {name:<10}{seconds * 1e6:8.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
