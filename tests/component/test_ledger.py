"""The ledger suite, run against SQLite and a real PostgreSQL server."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from lessor.daemon.config.schema import DevicesConfig, HostPool
from lessor.daemon.leases import EnginePhase, EngineRecord, Granted, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.units import GiB
from lessor.policies import Rejected

from ..support.ledger import DEVICES, make_probe

W, KV, PEAK = LeaseKind.WEIGHTS, LeaseKind.KV, LeaseKind.LOAD_PEAK


@pytest.fixture
def probe():
    """The simulated devices under the `ledger` fixture, for the tests to move."""
    return make_probe()


@pytest.fixture
async def ledger(ledger_url, probe):
    events = []
    ledger = await Ledger.open(ledger_url, probe, DEVICES, publish=events.append)
    ledger.events = events
    yield ledger
    await ledger.close()


async def test_budget_is_capacity_minus_headroom_foreign_and_leases(ledger):
    budgets = ledger.budgets()
    assert budgets["gpu0"].free_bytes == 15 * GiB
    assert budgets["gpu1"].free_bytes == 15 * GiB
    assert budgets["host"].free_bytes == 60 * GiB
    await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB)], "t1")
    assert ledger.budgets()["gpu0"].free_bytes == 5 * GiB


async def test_grant_is_all_or_nothing_across_devices(ledger):
    result = await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB), LeaseWant("gpu1", W, 16 * GiB)], "t1")
    assert isinstance(result, Rejected)
    assert result.short_bytes == {"gpu1": GiB}
    assert "gpu1: wanted 16.0 GiB, free 15.0 GiB" in result.reason
    assert ledger.snapshot().leases == ()


async def test_wants_on_one_device_are_summed(ledger):
    result = await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB), LeaseWant("gpu0", PEAK, 6 * GiB)], "t1")
    assert isinstance(result, Rejected) and result.short_bytes == {"gpu0": GiB}


async def test_unknown_device_is_rejected(ledger):
    result = await ledger.grant("a", [LeaseWant("gpu7", W, 1)], "t1")
    assert isinstance(result, Rejected) and "no device 'gpu7'" in result.reason


async def test_concurrent_grants_never_exceed_the_budget(ledger):
    wants = [[LeaseWant("gpu0", W, 4 * GiB)] for _ in range(8)]
    results = await asyncio.gather(*(ledger.grant(f"m{i}", w, f"t{i}") for i, w in enumerate(wants)))
    assert sum(isinstance(r, Granted) for r in results) == 3  # 15 GiB free / 4 GiB each
    assert ledger.budgets()["gpu0"].free_bytes == 3 * GiB


async def test_foreign_growth_shrinks_the_budget(ledger, probe):
    probe.set_foreign("gpu0", 20 * GiB)
    assert ledger.budgets()["gpu0"].free_bytes == 3 * GiB
    assert isinstance(await ledger.grant("a", [LeaseWant("gpu0", W, 4 * GiB)], "t1"), Rejected)


async def test_managed_process_usage_is_not_counted_as_foreign(ledger, probe):
    await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB)], "t1", owner_pid=4242)
    probe.set_process_usage("gpu0", 4242, 10 * GiB)
    budget = ledger.budgets()["gpu0"]
    assert budget.foreign_bytes == 8 * GiB and budget.free_bytes == 5 * GiB


async def test_an_engines_worker_processes_are_managed_not_foreign(ledger, probe):
    """vLLM and SGLang hold GPU memory in child processes of the engine's process group: NVML lists
    them under their own pids. They count as the engine's, never as foreign usage."""
    engine = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                               "print('up', flush=True); time.sleep(60)"], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert engine.stdout.readline() == b"up\n"
        worker = next(int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != engine.pid
                      and _pgid(int(e)) == engine.pid)
        await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB)], "t1", owner_pid=engine.pid)
        probe.set_process_usage("gpu0", worker, 9 * GiB)
        probe.set_process_usage("gpu0", engine.pid, GiB)
        budget = ledger.budgets()["gpu0"]
        assert budget.foreign_bytes == 8 * GiB and budget.free_bytes == 5 * GiB
        assert ledger.snapshot().readings["gpu0"].usage_of(engine.pid) == 10 * GiB
    finally:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def test_release_by_model_kind_and_attempt(ledger):
    await ledger.grant("a", [LeaseWant("gpu0", W, 2 * GiB), LeaseWant("gpu0", PEAK, GiB)], "t1")
    await ledger.grant("b", [LeaseWant("gpu1", W, 2 * GiB)], "t2")
    released = await ledger.release_model("a", "weights in", kinds=[PEAK])
    assert [lease.kind for lease in released] == [PEAK]
    await ledger.release_attempt("t2", "rollback")
    assert [(lease.model, lease.kind) for lease in ledger.snapshot().leases] == [("a", W)]
    kinds = [e.type for e in ledger.events]
    assert kinds.count("lease_granted") == 3 and kinds.count("lease_released") == 2


async def test_leases_survive_a_restart(ledger_url):
    first = await Ledger.open(ledger_url, make_probe(), DEVICES)
    granted = await first.grant("a", [LeaseWant("gpu0", W, 3 * GiB), LeaseWant("host", W, 30 * GiB)], "t1")
    engine = EngineRecord("a", "t1", 1234, "boot:42", 8123, EnginePhase.READY, {"context_tokens": 4096}, 4096, 99.5)
    await first.record_engine(engine)
    await first.grant("b", [LeaseWant("gpu1", KV, GiB)], "t2")
    await first.release_model("b", "done")
    await first.close()  # as after kill -9: nothing but what was committed remains

    second = await Ledger.open(ledger_url, make_probe(), DEVICES)
    try:
        leases = {lease.id: lease for lease in second.snapshot().leases}
        assert set(leases) == {lease.id for lease in granted.leases}
        assert all(lease.owner_pid == 1234 and lease.owner_started_at == 99.5 for lease in leases.values())
        assert second.engines() == {"a": engine}
        assert second.budgets()["gpu0"].free_bytes == 12 * GiB
        assert second.budgets()["host"].free_bytes == 30 * GiB
    finally:
        await second.close()


async def test_prune_keeps_granted_rows(ledger):
    await ledger.grant("a", [LeaseWant("gpu0", W, GiB)], "t1")
    await ledger.grant("b", [LeaseWant("gpu0", W, GiB)], "t2")
    await ledger.release_model("b", "done")
    assert await ledger.prune_released(older_than_s=-1) == 1
    assert len(ledger.snapshot().leases) == 1


async def test_capacity_cap_and_per_device_headroom(ledger_url):
    devices = DevicesConfig(headroom=GiB, gpus=[{"index": 0, "capacity": "20GiB"}, {"index": 1, "headroom": "3GiB"}],
                            host=HostPool(capacity=32 * GiB, headroom=4 * GiB, simulated_total=64 * GiB))
    ledger = await Ledger.open(ledger_url, make_probe(), devices)
    try:
        budgets = ledger.budgets()
        assert budgets["gpu0"].capacity_bytes == 20 * GiB and budgets["gpu0"].free_bytes == 11 * GiB
        assert budgets["gpu1"].headroom_bytes == 3 * GiB and budgets["gpu1"].free_bytes == 13 * GiB
        assert budgets["host"].free_bytes == 28 * GiB
        assert isinstance(await ledger.grant("a", [LeaseWant("gpu0", W, 12 * GiB)], "t"), Rejected)
    finally:
        await ledger.close()


async def test_in_memory_ledger_grants_and_checks_the_same_without_a_database():
    """The policy simulator's ledger: the same budget check and all-or-nothing grants, nothing written."""
    ledger = Ledger.in_memory(make_probe(), DEVICES)
    granted = await ledger.grant("a", [LeaseWant("gpu0", W, 10 * GiB), LeaseWant("gpu0", PEAK, 4 * GiB)], "t1")
    assert isinstance(granted, Granted)
    refused = await ledger.grant("b", [LeaseWant("gpu1", W, GiB), LeaseWant("gpu0", KV, 2 * GiB)], "t2")
    assert isinstance(refused, Rejected) and refused.short_bytes == {"gpu0": GiB}
    assert {lease.model for lease in ledger.leases()} == {"a"}
    await ledger.release_model("a", "done", kinds=[PEAK])
    assert ledger.budgets()["gpu0"].free_bytes == 5 * GiB
    assert await ledger.flush() == 0 and await ledger.prune_released(0) == 0
    await ledger.close()


async def test_resize_shrinks_always_and_grows_only_within_the_budget(ledger):
    granted = await ledger.grant("a", [LeaseWant("gpu0", W, 4 * GiB), LeaseWant("gpu0", KV, 8 * GiB)], "t1")
    kv = granted.leases[1]
    shrunk = await ledger.resize(kv.id, 2 * GiB, "let b through")
    assert (shrunk.id, shrunk.bytes, shrunk.kind) == (kv.id, 2 * GiB, KV)
    assert ledger.budgets()["gpu0"].free_bytes == 9 * GiB
    await ledger.grant("b", [LeaseWant("gpu0", W, 8 * GiB)], "t2")
    refused = await ledger.resize(kv.id, 4 * GiB, "grow back")  # 2 GiB more; 1 GiB free
    assert isinstance(refused, Rejected) and refused.short_bytes == {"gpu0": GiB}
    assert "gpu0: wanted 2.0 GiB, free 1.0 GiB" in refused.reason
    assert {lease.id: lease.bytes for lease in ledger.leases()}[kv.id] == 2 * GiB
    assert (await ledger.resize(kv.id, 3 * GiB, "grow back")).bytes == 3 * GiB
    assert ledger.budgets()["gpu0"].free_bytes == 0
    resized = [e for e in ledger.events if e.type == "lease_resized"]
    assert [(e.from_bytes, e.bytes, e.reason) for e in resized] == [(8 * GiB, 2 * GiB, "let b through"),
                                                                     (2 * GiB, 3 * GiB, "grow back")]


async def test_resize_of_a_released_lease_names_it(ledger):
    granted = await ledger.grant("a", [LeaseWant("gpu0", KV, GiB)], "t1")
    await ledger.release_model("a", "done")
    with pytest.raises(KeyError, match=granted.leases[0].id):
        await ledger.resize(granted.leases[0].id, 0, "shrink")
    with pytest.raises(ValueError, match="negative"):
        await ledger.resize(granted.leases[0].id, -1, "shrink")


async def test_a_resize_survives_a_restart_and_keeps_the_record_true(ledger_url, tmp_path):
    from lessor.daemon.ledger.record import LedgerRecord

    record = LedgerRecord(tmp_path / "record.json")
    first = await Ledger.open(ledger_url, make_probe(), DEVICES, record=record)
    granted = await first.grant("a", [LeaseWant("gpu1", KV, 6 * GiB)], "t1")
    await first.record_engine(EngineRecord("a", "t1", 1234, "boot:42", 8123, EnginePhase.READY, {}, 4096, 99.5))
    await first.resize(granted.leases[0].id, 2 * GiB, "shrink")
    generation = first.generation
    await first.close()
    found = record.read()
    assert found.generation == generation and found.engines["a"]["leases"][0]["bytes"] == 2 * GiB

    second = await Ledger.open(ledger_url, make_probe(), DEVICES, record=record)  # the damage checks pass
    try:
        assert [lease.bytes for lease in second.leases()] == [2 * GiB]
        assert second.budgets()["gpu1"].free_bytes == 13 * GiB
    finally:
        await second.close()
