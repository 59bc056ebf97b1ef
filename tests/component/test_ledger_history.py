"""Released leases do not pile up: lessord keeps them `ledger.history` long, pruned in the
background, on SQLite and a real PostgreSQL server. Time is an injected clock; the pruning loop's
sleep is stepped by the test, so nothing here waits on the wall clock."""

import asyncio

import pytest

from lessor.daemon.config.schema import DevicesConfig, HostPool, LedgerConfig, SimulatedGpu
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.errors import ConfigError
from lessor.daemon.leases import Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.units import GiB

from ..support.clocks import Clock, SteppedSleep
from ..support.configs import sim_config
from ..support.ledger import rows

DEVICES = DevicesConfig(headroom=GiB, host=HostPool(headroom=4 * GiB, simulated_total=64 * GiB))
WANT = [LeaseWant("gpu0", LeaseKind.WEIGHTS, GiB)]


def make_probe() -> SimProbe:
    return SimProbe([SimulatedGpu(total=24 * GiB)], host_total_bytes=64 * GiB)


async def cycle(ledger: Ledger, clock: Clock, n: int, step_s: float) -> None:
    """One lease granted and released, `step_s` after the previous one."""
    clock.now += step_s
    granted = await ledger.grant("m", WANT, f"cycle-{n}")
    assert isinstance(granted, Granted)
    await ledger.release_attempt(f"cycle-{n}", "done")


@pytest.fixture
async def clocked(ledger_url):
    clock = Clock()
    ledger = await Ledger.open(ledger_url, make_probe(), DEVICES, clock=clock)
    yield ledger, clock, ledger_url
    await ledger.close()


@pytest.fixture
async def pruning(clocked):
    """The ledger with its pruning loop running (history 100 s, a round every 100 s), asleep after
    its first round."""
    ledger, clock, url = clocked
    sleep = SteppedSleep()
    task = asyncio.ensure_future(ledger.run_pruning(history_s=100, sleep=sleep))
    assert await sleep.asleep.get() == 100  # the history is shorter than an hour: a round per history
    yield ledger, clock, url, sleep
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_released_rows_older_than_the_history_go_newer_ones_and_live_leases_stay(pruning):
    ledger, clock, url, sleep = pruning
    live = await ledger.grant("live", WANT, "live")
    assert isinstance(live, Granted)
    for n in range(3):
        await cycle(ledger, clock, n, step_s=0)  # released at t0
    clock.now += 60
    await cycle(ledger, clock, 3, step_s=0)  # released at t0 + 60
    assert await rows(url) == {"granted": 1, "released": 4}

    clock.now += 100
    await sleep.one_round()  # at t0 + 160 the three from t0 are 160 s old, the last one 100 s
    assert await rows(url) == {"granted": 1, "released": 1}
    assert ledger.leases() == live.leases

    clock.now += 100
    await sleep.one_round()  # t0 + 260: the last release is 200 s old; the live lease is older still
    assert await rows(url) == {"granted": 1}
    assert ledger.leases() == live.leases


async def test_the_table_stays_bounded_across_many_grant_and_release_cycles(pruning):
    ledger, clock, url, sleep = pruning
    step_s, history_s = 10, 100
    largest = 0
    for n in range(120):
        await cycle(ledger, clock, n, step_s)
        if n % 10 == 9:  # 100 s of cycles have passed: the loop's next round is due
            await sleep.one_round()
        largest = max(largest, sum((await rows(url)).values()))
    # A round keeps the releases of the last 100 s; the next adds a round's worth before it prunes.
    assert largest <= 2 * history_s // step_s + 1
    assert (await rows(url)).get("released", 0) <= history_s // step_s + 1


async def test_the_first_round_runs_at_start_and_prunes_what_piled_up_before(clocked):
    ledger, clock, url = clocked
    for n in range(5):
        await cycle(ledger, clock, n, step_s=1)
    clock.now += 8 * 86400
    sleep = SteppedSleep()
    task = asyncio.ensure_future(ledger.run_pruning(history_s=7 * 86400, sleep=sleep))
    try:
        assert await sleep.asleep.get() == 3600  # the first round runs at once, then hourly
        assert await rows(url) == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_in_memory_ledger_has_no_history_to_prune():
    """The simulator's ledger: a release frees the lease at once and nothing is kept, so the loop
    returns at once instead of waking every hour for nothing."""
    clock = Clock()
    ledger = Ledger.in_memory(make_probe(), DEVICES, clock=clock)

    async def never(seconds: float) -> None:
        raise AssertionError("the in-memory ledger's pruning loop slept")

    await cycle(ledger, clock, 0, step_s=1)
    await ledger.run_pruning(history_s=60, sleep=never)
    assert ledger.leases() == () and await ledger.prune_released(0) == 0


def test_history_is_a_duration_of_seven_days_by_default_within_bounds(tmp_path):
    assert LedgerConfig().history == 7 * 86400
    assert sim_config(tmp_path, ledger={"history": "12h"}).ledger.history == 12 * 3600
    for bad in ("30s", "-1", "3651d"):
        with pytest.raises(ConfigError, match="ledger.history"):
            sim_config(tmp_path, ledger={"history": bad})
