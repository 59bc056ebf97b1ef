"""What a load measures, in-process: the real runtime (ledger, supervisor, policies) with the engine
faked at the process boundary and the GPUs simulated (a probe that can keep a stopped engine's
memory, as a zombie would)."""

import asyncio
import os
from dataclasses import replace

from lessor.daemon.config.schema import SimulatedGpu
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.ledger.fingerprints import Outcome
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB

from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.waiting import drain_events, until


async def test_a_load_is_sampled_from_spawn_to_ready_and_its_peak_remembered(env):
    controller, adapter, events = await env([torch_model("qwen", "4GiB")])
    adapter.gate = asyncio.Event()
    load = asyncio.ensure_future(controller.load("qwen"))
    await until(lambda: adapter.loading == 1, "the weights loading")
    # The weights are loading (weights + the 1 GiB peak in use): wait for the sampler to look once more.
    seen = adapter.measures
    await until(lambda: adapter.measures > seen + 1, "a sample while the weights load")
    adapter.gate.set()
    await load
    [fingerprint] = controller.fingerprints("qwen")
    m = fingerprint["measured"][0]
    assert fingerprint["outcome"] == Outcome.READY and fingerprint["applies"] and fingerprint["loads"] == 1
    assert m["loading_peak_bytes"] == m["peak_bytes"] == 5 * GiB  # weights + load peak, seen by the 20 Hz samples
    assert m["weights_bytes"] == 4 * GiB  # at the "weights" step: the peak was gone
    assert m["steady_bytes"] == 4 * GiB + m["kv_bytes"] and m["kv_tokens"] > 0
    assert m["kv_bytes"] == m["kv_tokens"] * 65536  # what allocating the KV cache added
    assert [e.outcome for e in drain_events(events, "fingerprint_recorded")] == [Outcome.READY]
    # The next plan of the same key uses it: nothing measured above the config's figures, so it says so and changes nothing.
    plan = controller.plan("qwen")
    assert plan["fingerprint"]["used"]["outcome"] == Outcome.READY and plan["fits"]
    assert not [c for c in plan["memory"] if c["source"] == "measured"]


async def test_an_engine_above_its_leases_is_retried_once_planned_from_what_it_measured(env):
    controller, adapter, events = await env([torch_model("qwen", "4GiB")])
    adapter.measured = {"gpu0": 7 * GiB}  # the engine reports 7 GiB where the config said 4 (a newer engine, a driver)
    model = await controller.load("qwen")
    assert model["state"] == "ready" and len(adapter.handles) == 2, "one overrun, one retry"
    seen = drain_events(events, None)
    [retried] = [e for e in seen if e.type == "load_retried"]
    assert retried.outcome == Outcome.OVERRUN and "the engine uses 7" in retried.reason
    # The retry reserved what the engine held beyond the weights and the KV cache (+3 %): 7 - 4 - 1 GiB.
    held = {lease["kind"]: lease["bytes"] for lease in controller.leases("qwen")}
    assert held["weights"] == 4 * GiB and held["kv"] == GiB and held["reserve"] == -(-2 * GiB * 103 // 100)
    assert [e.outcome for e in seen if e.type == "fingerprint_recorded"] == [Outcome.OVERRUN, Outcome.READY]
    plan = controller.plan("qwen")
    assert any(c["name"] == "workspace_measured" and c["source"] == "measured" for c in plan["memory"])


class LingeringProbe(SimProbe):
    """Simulated GPUs where a stopped engine's processes can keep their memory (a zombie holding
    VRAM, as in Ollama #9625) until the test lets it go."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stuck: set[int] = set()

    def set_process_usage(self, device: str, pid: int, used_bytes: int) -> None:
        if used_bytes == 0 and pid in self.stuck:
            return
        super().set_process_usage(device, pid, used_bytes)

    def let_go(self, pid: int) -> None:
        self.stuck.discard(pid)
        self.set_process_usage("gpu0", pid, 0)


async def test_memory_a_stopped_engine_keeps_is_announced_counted_as_foreign_until_gone(tmp_path):
    config = sim_config(tmp_path, [torch_model("qwen", "4GiB")], timeouts={"unload_verify_s": 0})
    probe = LingeringProbe([SimulatedGpu(name="sim24", total=24 * GiB, foreign=8 * GiB)], 64 * GiB)
    engines = FakeEngines()
    async with runtime(config, engines=engines, probe=probe) as controller:
        events = controller.bus.subscribe()
        await controller.load("qwen")
        pid = engines.adapter.handles[0].pid
        probe.stuck.add(pid)
        used = probe.read()[0].processes[pid]
        await controller.unload("qwen")
        [lingering] = drain_events(events, "memory_lingering")
        assert (lingering.device, lingering.bytes, lingering.pids, lingering.gone) == ("gpu0", used, (pid,), False)
        gpu = next(d for d in controller.devices() if d["id"] == "gpu0")
        assert gpu["lingering_bytes"] == used and gpu["foreign_bytes"] == 8 * GiB + used  # no lease, still counted
        assert controller.ledger.leases() == ()
        probe.let_go(pid)
        await controller.reconciler.check()
        [gone] = drain_events(events, "memory_lingering")
        assert gone.gone and next(d for d in controller.devices() if d["id"] == "gpu0")["lingering_bytes"] == 0


async def test_an_unload_whose_memory_comes_back_says_nothing(env):
    controller, adapter, events = await env([torch_model("qwen", "4GiB")])
    await controller.load("qwen")
    await controller.unload("qwen")
    assert drain_events(events, "memory_lingering") == []
    assert controller.supervisor.lingering.unverified == 0


async def test_a_measurement_under_another_engine_version_is_shown_not_used(env):
    controller, adapter, _ = await env([torch_model("qwen", "4GiB")])
    adapter.measured = {"gpu0": 7 * GiB}
    await controller.load("qwen")  # overruns, then loads from its measurement
    supervisor = controller.supervisor
    spec = supervisor.resolve("qwen").spec
    [mine] = supervisor.fingerprinting.store.all()
    older = replace(mine.key, engine_version="torch 2.12.0, transformers 5.0.0")
    await supervisor.fingerprinting.store.record(older, mine.devices, Outcome.READY)
    plan = controller.plan("qwen")
    assert plan["fingerprint"]["key"] == supervisor.fingerprinting.key(spec).digest == mine.digest
    assert plan["fingerprint"]["used"]["loads"] == mine.loads
    [other] = plan["fingerprint"]["not_used"]
    assert other["key"] == older.digest and "engine version 'torch 2.12.0, transformers 5.0.0', now" in other["why"][0]
    listed = {f["key"]: f["applies"] for f in controller.fingerprints("qwen")}
    assert listed == {mine.digest: True, older.digest: False}
    # Forgotten, the plan goes back to the memory model (the config's 4 GiB of weights).
    await controller.forget_fingerprint(mine.digest)
    weights = [m for m in controller.plan("qwen")["memory"] if m["part"] == "weights"]
    assert [(m["name"], m["source"]) for m in weights] == [("weights", "given")]


async def test_lessor_plan_shows_which_numbers_were_measured_and_which_measurements_it_left(env):
    from lessor.api.cli import render_plan

    controller, adapter, _ = await env([torch_model("qwen", "4GiB")])
    adapter.measured = {"gpu0": 7 * GiB}
    await controller.load("qwen")
    supervisor = controller.supervisor
    [mine] = supervisor.fingerprinting.store.all()
    await supervisor.fingerprinting.store.record(replace(mine.key, devices=("NVIDIA H200",)), mine.devices, Outcome.READY)
    text = render_plan(controller.plan("qwen"))
    assert f"measured: fingerprint {mine.digest[:8]}" in text and "used, ready on" in text and "+3% margin" in text
    assert "not used: fingerprint" in text and "devices NVIDIA H200, now sim24" in text
    assert "workspace_measured" in text and "measured " in text


class _Reporting:
    """A handle whose engine is this test process: it reports what it is told, or cannot answer yet."""

    def __init__(self, reports) -> None:
        self.pid, self._reports = os.getpid(), list(reports)

    async def measure(self):
        report = self._reports.pop(0)
        if report is None:
            raise ConnectionRefusedError("not listening yet")
        return report


def _sampler(handle):
    from lessor.daemon.devices.usage import UsageMeter
    from lessor.daemon.models.sampling import LoadSampler

    probe = SimProbe([SimulatedGpu(name="sim24", total=24 * GiB)], 64 * GiB)
    return LoadSampler(UsageMeter(probe, lambda: {r.device: r for r in probe.read()}), handle, ["gpu0"], nvml=False)


async def test_an_engine_that_reports_is_measured_by_its_report_never_its_interpreter():
    sampler = _sampler(_Reporting([None, {"gpu0": 0}, {"gpu0": 300 * 2**20}, {"gpu0": 340 * 2**20}]))
    await sampler.sample()  # not listening: no figure, not the PSS of a starting interpreter
    await sampler.sample()  # listening, its weights not in yet: 0
    await sampler.mark("weights")
    await sampler.mark("kv")
    [m] = sampler.measurements(1024, {"gpu0": GiB}, two_phase=True)
    assert (m.method, m.loading_peak_bytes, m.weights_bytes, m.kv_bytes) == ("engine", 300 * 2**20, 300 * 2**20, 40 * 2**20)


async def test_an_engine_without_a_report_is_measured_by_the_pss_of_its_processes():
    sampler = _sampler(_Reporting([{}, {}]))
    await sampler.mark("weights")
    [m] = sampler.measurements(0, {}, two_phase=False)
    assert m.method == "pss" and m.peak_bytes > 10 * 2**20  # this test process's own RAM
