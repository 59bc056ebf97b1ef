"""Property: no device is ever granted more than its budget, whatever the interleaving of
concurrent grants, releases, resizes (elastic KV), foreign-usage changes and crash-restarts."""

import asyncio
import itertools
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lessor.daemon.config.schema import DevicesConfig, HostPool, SimulatedGpu
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.leases import Granted, Lease, LeaseKind, LeaseWant
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.units import GiB, MiB

HEADROOM = {"gpu0": GiB, "gpu1": GiB, "host": 4 * GiB}
TOTAL = {"gpu0": 24 * GiB, "gpu1": 16 * GiB, "host": 64 * GiB}
DEVICES = DevicesConfig(headroom=GiB, host=HostPool(headroom=4 * GiB, simulated_total=64 * GiB))
MODELS = ["a", "b", "c", "d"]

sizes = st.integers(0, 12 * 1024).map(lambda mib: mib * MiB)
wants = st.builds(LeaseWant, st.sampled_from(["gpu0", "gpu1", "host", "gpu9"]), st.sampled_from(list(LeaseKind)), sizes)
grant_batches = st.lists(st.tuples(st.sampled_from(MODELS), st.lists(wants, min_size=1, max_size=3)), min_size=1, max_size=6)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="lessor-ledger-")
        self.url = f"sqlite+aiosqlite:///{self.dir}/ledger.db"
        self.probe = SimProbe([SimulatedGpu(total=TOTAL["gpu0"]), SimulatedGpu(total=TOTAL["gpu1"])], TOTAL["host"])
        self.foreign = {"gpu0": 0, "gpu1": 0, "host": 0}
        self.expected: dict[str, tuple[str, str, int]] = {}  # lease id -> (model, device, bytes)
        self.attempts = itertools.count()
        self.ledger = self.run(Ledger.open(self.url, self.probe, DEVICES))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def free(self, device: str) -> int:
        leased = sum(b for _, d, b in self.expected.values() if d == device)
        return TOTAL[device] - HEADROOM[device] - self.foreign[device] - leased

    @rule(batch=grant_batches)
    def concurrent_grants(self, batch):
        async def all_at_once():
            return await asyncio.gather(*(self.ledger.grant(model, ws, str(next(self.attempts))) for model, ws in batch))

        results = self.run(all_at_once())
        # The lock is fair, so the grants were decided in arrival order: replay them on the model.
        for (model, ws), result in zip(batch, results):
            need: dict[str, int] = {}
            for w in ws:
                need[w.device] = need.get(w.device, 0) + w.bytes
            fits = all(d in TOTAL and b <= self.free(d) for d, b in need.items())
            assert isinstance(result, Granted) == fits, (model, ws, result)
            if fits:
                for lease in result.leases:
                    self.expected[lease.id] = (model, lease.device, lease.bytes)

    @rule(model=st.sampled_from(MODELS), kind=st.none() | st.sampled_from(list(LeaseKind)))
    def release(self, model, kind):
        released = self.run(self.ledger.release_model(model, "test", kinds=None if kind is None else [kind]))
        for lease in released:
            del self.expected[lease.id]

    @rule(device=st.sampled_from(["gpu0", "gpu1"]), foreign=st.integers(0, 20 * 1024).map(lambda m: m * MiB))
    def foreign_usage_changes(self, device, foreign):
        self.probe.set_foreign(device, foreign)
        self.foreign[device] = foreign

    @rule()
    def crash_and_restart(self):
        # Dispose without releasing anything, as after kill -9; reopen from the same file.
        self.run(self.ledger.database.dispose())
        self.ledger = self.run(Ledger.open(self.url, self.probe, DEVICES))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def release_one_lease(self, data):
        # Lease ids are random uuids: pick by position (insertion order replays exactly).
        lease_id = list(self.expected)[data.draw(st.integers(0, len(self.expected) - 1))]
        self.run(self.ledger.release([lease_id], "test"))
        del self.expected[lease_id]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def concurrent_resizes(self, data):
        """Shrinks and grows of some leases at once: a shrink always goes; a grow only where the
        device's free memory covers the difference, and a refused one changes nothing."""
        ids = data.draw(st.lists(st.sampled_from(list(self.expected)), min_size=1, max_size=4, unique=True))
        new = [data.draw(sizes) for _ in ids]

        async def all_at_once():
            return await asyncio.gather(*(self.ledger.resize(i, b, "test") for i, b in zip(ids, new)))

        for lease_id, wanted, result in zip(ids, new, self.run(all_at_once())):
            model, device, held = self.expected[lease_id]
            fits = wanted <= held or wanted - held <= self.free(device)
            assert isinstance(result, Lease) == fits, (lease_id, held, wanted, result)
            if fits:
                assert result.bytes == wanted
                self.expected[lease_id] = (model, device, wanted)

    @invariant()
    def ledger_matches_the_model(self):
        got = {lease.id: (lease.model, lease.device, lease.bytes) for lease in self.ledger.snapshot().leases}
        assert got == self.expected

    @invariant()
    def no_device_is_granted_more_than_capacity_minus_headroom(self):
        for device, budget in self.ledger.budgets().items():
            assert budget.leased_bytes <= TOTAL[device] - HEADROOM[device]

    def teardown(self):
        self.run(self.ledger.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestLedgerInvariant = LedgerMachine.TestCase
