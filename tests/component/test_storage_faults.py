"""The ledger's database failing under lessor: the SQLite file's disk full, the PostgreSQL server
restarted under load. Defined outcome: a write the database refuses grants nothing (503
ledger_unavailable, the load rolled back), a release still frees the memory and is written once the
database is back, and afterwards the database and lessor's memory hold the same leases."""

import asyncio
import random
import threading

import pytest
from sqlalchemy import event, text

from lessor.daemon.config.schema import DevicesConfig
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.leases import Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.ledger.ledger_errors import LedgerUnavailable
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.clocks import Clock, SteppedSleep
from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.ledger import rows
from ..support.waiting import HANG_S


async def on_disk(url: str, devices: DevicesConfig) -> set[str]:
    """The granted lease ids as a freshly started lessord would read them."""
    fresh = await Ledger.open(url, SimProbe(devices.simulated, 0), devices)
    try:
        return {lease.id for lease in fresh.leases()}
    finally:
        await fresh.close()


def limit_pages(ledger: Ledger, pages: int) -> None:
    """SQLite's own cap on the file's size: past it, writes fail with SQLITE_FULL, exactly as on a
    full disk. Applied to every new connection of the ledger's pool."""
    event.listen(ledger.database.sync_engine, "connect",
                 lambda conn, _: conn.cursor().execute(f"PRAGMA max_page_count = {pages}"))


async def fill_up(ledger: Ledger) -> None:
    async with ledger.database.begin() as conn:
        pages = (await conn.execute(text("PRAGMA page_count"))).scalar()
    limit_pages(ledger, pages + 4)
    await ledger.database.dispose()
    async with ledger.database.connect() as conn:  # another tenant of the disk takes what is left
        await conn.execute(text("CREATE TABLE IF NOT EXISTS filler (b BLOB)"))
        await conn.commit()
        with pytest.raises(Exception, match="full"):
            for _ in range(100):
                await conn.execute(text("INSERT INTO filler VALUES (zeroblob(2000))"))
                await conn.commit()
        await conn.rollback()


async def test_a_full_disk_refuses_the_load_and_loses_nothing(tmp_path):
    config = sim_config(tmp_path, [torch_model("a"), torch_model("b", "2GiB")])
    engines = FakeEngines()
    async with runtime(config, engines=engines) as controller:
        adapter = engines.adapter
        await controller.load("a")
        a_leases = controller.leases("a")
        await fill_up(controller.ledger)

        refused = None
        for _ in range(50):  # each load and unload adds rows; the file's last free bytes run out
            try:
                await controller.load("b")
            except LedgerUnavailable as exc:
                refused = exc
                break
            await controller.unload("b")
        assert refused is not None, "the full disk was never hit"
        assert "full" in str(refused) and "nothing was granted" in str(refused)
        assert controller.model("b")["state"] == "unloaded" and controller.leases("b") == []
        assert all(h.stopped for h in adapter.handles if h.spec.name == "b")
        assert controller.model("a")["state"] == "ready" and controller.leases("a") == a_leases

        # Space comes back: pending releases are written, and disk and memory agree exactly.
        limit_pages(controller.ledger, 1 << 30)
        await controller.ledger.database.dispose()
        assert await controller.ledger.flush() == 0
        memory = {lease.id for lease in controller.ledger.leases()}
        assert await on_disk(config.ledger_url(), config.devices) == memory
        await controller.load("b")
        assert controller.model("b")["state"] == "ready"


async def until(condition, what: str, outcomes: dict) -> None:
    """Wait for a state the workers reach; the limit only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + HANG_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {outcomes}"
        await asyncio.sleep(0.05)


async def test_postgresql_restarted_under_load_loses_no_lease_and_grants_no_byte_twice(pg_server):
    devices = DevicesConfig.model_validate({"probe": "sim", "headroom": 0, "simulated": [
        {"name": "sim16", "total": "16GiB"}, {"name": "sim16", "total": "16GiB"}]})
    probe = SimProbe(devices.simulated, 0)
    ledger = await Ledger.open(pg_server.url, probe, devices)
    outcomes = {"granted": 0, "refused": 0, "unavailable": 0, "released": 0}
    over_budget = []
    stop = asyncio.Event()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[str] = []
        while not stop.is_set():
            if held and rng.random() < 0.5:
                await ledger.release([held.pop(rng.randrange(len(held)))], "done")
                outcomes["released"] += 1
            else:
                want = LeaseWant(f"gpu{rng.randrange(2)}", LeaseKind.KV, rng.randrange(1, 4) * GiB)
                try:
                    result = await ledger.grant(f"m{seed}", [want], f"t{seed}")
                except LedgerUnavailable:
                    outcomes["unavailable"] += 1
                    await asyncio.sleep(0.02)
                    continue
                if isinstance(result, Granted):
                    held.append(result.leases[0].id)
                    outcomes["granted"] += 1
                else:
                    outcomes["refused"] += 1
            for device, budget in ledger.budgets().items():
                if device != "host" and budget.leased_bytes > budget.leasable_bytes:
                    over_budget.append((device, budget))
            await asyncio.sleep(0)

    workers = [asyncio.ensure_future(worker(i)) for i in range(4)]
    await until(lambda: outcomes["granted"] >= 50, "no grants before the restart", outcomes)
    before = dict(outcomes)
    restart = threading.Thread(target=pg_server.restart)
    restart.start()
    await until(lambda: not restart.is_alive(), "the restart never ended", outcomes)
    restarted = outcomes["granted"]
    # Keep going on the restarted server: workers that came back grant again.
    await until(lambda: outcomes["granted"] >= restarted + 50, "no grant after the restart", outcomes)
    stop.set()
    await asyncio.gather(*workers)
    try:
        print(f"postgres restarted under load: {outcomes}")
        assert outcomes["unavailable"] > 0, "the restart was never seen"
        assert outcomes["granted"] > before["granted"], "no grant after the restart"
        assert over_budget == []
        assert await ledger.flush() == 0
        assert await on_disk(pg_server.url, devices) == {lease.id for lease in ledger.leases()}
    finally:
        await ledger.close()


async def test_a_pruning_round_the_database_refuses_is_tried_again_the_next_round(pg_server, caplog):
    devices = DevicesConfig.model_validate({"probe": "sim", "headroom": 0, "simulated": [{"total": "16GiB"}]})
    clock = Clock()
    ledger = await Ledger.open(pg_server.url, SimProbe(devices.simulated, 0), devices, clock=clock)
    sleep = SteppedSleep()
    pruning = asyncio.ensure_future(ledger.run_pruning(history_s=100, sleep=sleep))
    try:
        await sleep.asleep.get()
        for n in range(3):
            assert isinstance(await ledger.grant("m", [LeaseWant("gpu0", LeaseKind.KV, GiB)], f"t{n}"), Granted)
            await ledger.release_attempt(f"t{n}", "done")
        clock.now += 200
        await asyncio.to_thread(pg_server.pg_ctl, "-m", "fast", "stop")
        await sleep.one_round()
        assert "released leases not pruned" in caplog.text and not pruning.done()

        await asyncio.to_thread(pg_server.pg_ctl, "start")
        await sleep.one_round()
        assert await rows(pg_server.url) == {}
    finally:
        pruning.cancel()
        await asyncio.gather(pruning, return_exceptions=True)
        await ledger.close()
