"""The policy simulator (bench/sim): its workload, the baseline policies, and what it must never
get wrong (a grant beyond a budget, a request counted twice or lost, a peak-aware OOM)."""

from dataclasses import replace

import numpy as np
import pytest

from bench.sim import all_strategies, make_trace, run_scenario, scenarios
from bench.sim.loads import SimSupervisor, _now
from bench.sim.report import markdown_table, per_model_table, plot, text_table
from bench.sim.simulator import Simulator
from bench.sim.strategies import llama_swap_like, ollama_like
from bench.sim.workload import Trace, Workload, zipf_shares
from lessor.daemon.leases import Granted
from lessor.policies import AdmissionRequest, Admit, DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot

G = 1 << 30
SCENARIOS = scenarios()


# -- the workload ---------------------------------------------------------------------------------

def test_popularity_is_zipf_and_arrivals_are_in_order():
    trace = make_trace(Workload(requests=200_000, zipf_s=1.0, seed=3), 8)
    shares = np.bincount(trace.model, minlength=8) / len(trace)
    assert np.allclose(shares, zipf_shares(8, 1.0), atol=0.005)
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert abs(trace.prompt_tokens.mean() / 600 - 1) < 0.03 and abs(trace.output_tokens.mean() / 250 - 1) < 0.03


@pytest.mark.parametrize("arrivals,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_gaps_between_one_models_requests_have_the_chosen_variation(arrivals, cv):
    trace = make_trace(Workload(requests=100_000, rate=5.0, arrivals=arrivals, cv=cv, zipf_s=0.0, seed=5), 2)
    gaps = np.diff(trace.arrival_s[trace.model == 0])
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv
    assert abs(gaps.mean() - 1 / 2.5) < 0.02  # half of 5 requests/s


def test_shifting_popularity_reshuffles_the_ranks_every_period():
    trace = make_trace(Workload(requests=120_000, rate=10.0, shift_every_s=600.0, seed=2), 8)
    period = (trace.arrival_s // 600).astype(int)
    assert np.all(np.diff(trace.arrival_s) >= 0) and len(trace) == 120_000
    first = np.bincount(trace.model[period == 0], minlength=8) / np.count_nonzero(period == 0)
    assert np.allclose(first, zipf_shares(8, 1.0), atol=0.02)  # the first period keeps model 0 the most popular
    top = [np.bincount(trace.model[period == p], minlength=8).argmax() for p in range(1, 15)]
    assert len(set(top)) >= 4  # the most popular model changes from period to period
    total = np.bincount(trace.model, minlength=8) / len(trace)
    assert total.max() < 2 * total.min() + 0.1  # over many periods, no model keeps the lead


def test_models_used_together_arrive_in_bursts_of_their_group():
    workload = Workload(requests=100_000, rate=6.0, groups=4, burst_s=120.0, duty=0.25, seed=4)
    trace = make_trace(workload, 16)
    group = trace.model % 4
    shares = np.bincount(group, minlength=4) / len(trace)
    assert np.allclose(shares, zipf_shares(4, 1.0), rtol=0.25)  # about 35 bursts per group: their count varies
    minute = (trace.arrival_s // 60).astype(int)
    # Members of a group are busy in the same minutes: model 0's busy minutes are model 4's.
    busy0 = set(minute[trace.model == 0])
    busy4 = set(minute[trace.model == 4])
    assert len(busy0 & busy4) > 0.8 * min(len(busy0), len(busy4))
    # A group is quiet most of the time: its busy minutes are about its duty plus the edges of bursts.
    assert len(busy0) / (minute.max() + 1) < 0.5


def test_a_workload_without_requests_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        Workload(requests=0)


# -- the baselines are policies over the same snapshot ---------------------------------------------

def _snapshot(free_gib: float, *models: ModelView) -> Snapshot:
    leased = sum(m.held_bytes.get("gpu0", 0) for m in models)
    capacity = 80 * G
    budget = DeviceBudget("gpu0", capacity, capacity, G, capacity - G - leased - int(free_gib * G), leased)
    return Snapshot({"gpu0": budget}, {m.name: m for m in models}, 100.0)


def _model(name, gib, in_flight=0, last_used=0.0, state="ready") -> ModelView:
    return ModelView(name, state, 50, False, in_flight, last_used, {"gpu0": int(gib * G)} if gib else {})


def test_ollama_like_keeps_three_models_per_gpu_evicting_the_one_whose_keep_alive_ends_first():
    policy = ollama_like(3)
    three = [_model("a", 5, last_used=50), _model("b", 5, last_used=10), _model("c", 5, last_used=90)]
    want = AdmissionRequest("d", {"gpu0": 5 * G})
    assert policy(want, _snapshot(60, *three)) == Evict(("b",))  # memory is plenty: the count decides
    assert policy(want, _snapshot(60, *three[:2])) == Admit()
    busy = [replace(m, in_flight=1) for m in three]
    assert isinstance(policy(want, _snapshot(60, *busy)), Queue)
    assert isinstance(policy(AdmissionRequest("d", {"gpu0": 90 * G}), _snapshot(60, *three)), Rejected)


def test_llama_swap_like_swaps_within_a_group_and_never_looks_at_memory():
    policy = llama_swap_like({"a": "g1", "b": "g1", "c": "g2"})
    assert policy(AdmissionRequest("b", {"gpu0": 70 * G}), _snapshot(1, _model("a", 5))) == Evict(("a",))
    assert policy(AdmissionRequest("b", {"gpu0": 5 * G}), _snapshot(1, _model("a", 5, in_flight=2))) == \
        Queue("swap group 'g1' is busy", ("a",))  # it waits for a, and names it
    assert policy(AdmissionRequest("c", {"gpu0": 70 * G}), _snapshot(1, _model("a", 5))) == Admit()


# -- the simulation -------------------------------------------------------------------------------

def _results(name: str, requests: int):
    return {r.strategy: r for r in run_scenario(SCENARIOS[name], requests=requests)}


@pytest.fixture(scope="module")
def seed_results():
    return _results("seed", 3000)


@pytest.fixture(scope="module")
def box_results():
    return _results("box-gamma", 20_000)


def test_every_request_is_served_or_counted_as_failed_once(seed_results, box_results):
    for result in [*seed_results.values(), *box_results.values()]:
        failed = result.refused + result.failed_loads + result.timed_out
        assert result.served + failed == result.requests, result.strategy
        assert 0 <= result.slo_attainment <= result.served / result.requests


def test_the_seed_case_loads_only_with_a_peak_aware_plan(seed_results):
    """Weights (4.5 GiB) + load peak (10 GiB) fit the 15 GiB left; weights + KV cache + peak do not."""
    for name, result in seed_results.items():
        if "lessor" in name or "lru_idle" in name or "value" in name:
            assert result.ooms == 0, name
            assert result.ooms_avoided >= 1, name
        else:
            assert result.ooms > 0, name
            assert result.by_model["deepseek-r1"] == 0.0, name
    assert seed_results["lessor priority"].by_model["deepseek-r1"] > 0.5


def test_no_grant_ever_exceeds_a_budget_whatever_the_strategy(monkeypatch):
    """The ledger's invariant, watched at every grant of every strategy on a crowded box."""
    scenario = SCENARIOS["box-poisson"]
    trace = make_trace(replace(scenario.workload, requests=5000, seed=11), len(scenario.models))
    original = SimSupervisor._grant
    grants = []

    def checked(self, record, wants):
        granted = original(self, record, wants)
        if isinstance(granted, Granted):
            grants.append(record.name)
            assert all(b.free_bytes >= 0 for b in self.ledger.budgets().values())
        return granted

    monkeypatch.setattr(SimSupervisor, "_grant", checked)
    for strategy in all_strategies(scenario.options):
        Simulator(scenario.hardware, scenario.models, strategy, scenario.slo_ttft_s, scenario.wait_timeout_s).run(trace)
    assert len(grants) > 100


def test_a_two_phase_load_sizes_the_kv_cache_after_the_weights_and_drops_the_peak():
    scenario = SCENARIOS["seed"]
    lessor = next(s for s in all_strategies(scenario.options) if s.name == "lessor lru_idle")
    sim = Simulator(scenario.hardware, scenario.models, lessor, scenario.slo_ttft_s, scenario.wait_timeout_s)
    one = Trace(np.array([0.0]), np.array([0], dtype=np.int32), np.array([500], dtype=np.int32),
                np.array([10], dtype=np.int32))
    result = sim.run(one)
    kinds = {(lease.kind.value, lease.bytes) for lease in sim.ledger.leases() if lease.device == "gpu0"}
    assert {k for k, _ in kinds} == {"weights", "kv", "reserve"}  # the load peak was released
    assert ("kv", 152_000 * 70_272) in kinds  # min = max = 152 000 tokens (a whole number of pages)
    assert result.served == 1 and result.loads == 1
    # cold load from disk: engine start + (4.5 GiB + 373 GiB of experts) / 3 GB/s, then prefill
    assert result.ttft[0] == pytest.approx(2.0 + (4.5 * G + 400_222_993_121) / 3e9 + 500 / 250.0)


def test_the_same_seed_gives_the_same_run():
    scenario = SCENARIOS["box-gamma"]
    first = run_scenario(scenario, requests=3000, seed=7)
    again = run_scenario(scenario, requests=3000, seed=7)
    for a, b in zip(first, again):
        assert np.array_equal(a.ttft, b.ttft, equal_nan=True) and a.loads == b.loads


def test_draining_at_once_swaps_most_and_patience_swaps_less(box_results):
    """What the simulator found about lessor's router: draining busy models at once so a rare
    model gets its turn costs many loads; router.drain_after's patience saves most of them."""
    at_once, patient = box_results["lru_idle, drain_after 0"], box_results["lessor lru_idle"]
    never = box_results["lru_idle, never drain"]
    assert at_once.loads > patient.loads > never.loads
    assert patient.slo_attainment > at_once.slo_attainment


def test_a_ledger_call_that_would_wait_is_an_error():
    async def waits():
        import asyncio
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="must not do I/O"):
        _now(waits())


def test_report_table_and_plot(box_results, tmp_path):
    results = list(box_results.values())
    table = markdown_table(results)
    assert table.count("\n") == len(results) + 1 and "| lessor priority |" in table
    assert "SLO met" in text_table(results)
    assert per_model_table(results).count("\n") == len(results) + 1
    plot(results, "test", tmp_path / "box.png")
    assert (tmp_path / "box.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_simulator_runs_the_routers_own_lanes_and_a_wait_ends_at_its_deadline():
    """The router's decisions are daemon.lanes, as in lessord: a request waiting past
    wait_timeout fails at its deadline (a 503 in lessord), while the load it asked for goes on."""
    from lessor.daemon.traffic.lanes import Lanes

    scenario = SCENARIOS["seed"]
    lessor = next(s for s in all_strategies(scenario.options) if s.name == "lessor lru_idle")
    sim = Simulator(scenario.hardware, scenario.models, lessor, scenario.slo_ttft_s, wait_timeout_s=10.0)
    assert isinstance(sim.lanes, Lanes)
    one = Trace(np.array([0.0]), np.array([0], dtype=np.int32), np.array([500], dtype=np.int32),
                np.array([10], dtype=np.int32))
    result = sim.run(one)  # R1's first load takes over 2 minutes from disk
    assert (result.timed_out, result.served, result.loads) == (1, 0, 1)
    assert sim.sup.by_name["deepseek-r1"].state.value == "ready"
    assert result.longest_wait_s == 10.0  # it waited out its deadline: the longest wait is that


# -- issue 34: the two-model box and the busiest model saturating its batch ----------------------

def test_the_two_model_box_is_served_as_ollama_serves_it_and_an_idle_model_never_strands_the_other():
    """The newcomer's box: chat and coder never fit together, one person alternates. The default
    swaps an idle model out for the waiting one; weighing rates alone (an idle model keeps its place
    until its rate says otherwise) left requests to time out beside a model nobody was using."""
    results = _results("two-model", 2000)
    value, ollama, ablation = results["lessor value"], results["ollama-like"], results["value, idle never yields"]
    assert value.timed_out == 0 and value.worst_model[1] >= 0.9
    assert value.slo_attainment >= ollama.slo_attainment - 0.01
    assert ablation.timed_out > 0 and ablation.worst_model[1] < 0.6
    assert value.worst_model[1] >= max(r.worst_model[1] for r in results.values()) - 0.01
    assert "| worst model | longest wait |" in markdown_table(list(results.values()))


def test_the_busiest_model_filling_its_batch_keeps_its_place():
    """qwen2.5-32b-awq takes 55 % of the requests and keeps its 16 slots full: most of its
    requests wait for a slot. Weighed by the share that started at once (the signal before
    issue 34), it looked the cheapest, was evicted and stayed out; weighed by the share it kept up
    with and what it starts, it stays."""
    from lessor.policies import Value

    class StartedAtOnce(Value):
        def _served_rate(self, model):
            return model.request_rate * model.started_share

    scenario = SCENARIOS["saturated"]
    value = next(s for s in all_strategies(scenario.options) if s.name == "lessor value")
    now, before = run_scenario(scenario, requests=3000,
                               strategies=[value, replace(value, name="before", policy=StartedAtOnce())])
    busiest = "qwen2.5-32b-awq"
    assert before.by_model[busiest] < 0.1 and now.by_model[busiest] > 0.5
    assert now.slo_attainment > before.slo_attainment


def test_the_simulator_admits_through_lessords_own_decide(monkeypatch):
    """One admission (issue 35 item 2): the function the supervisor and the reconciler's
    give-back call is the very object the simulator calls, and a run goes through it."""
    from bench.sim import loads as sim_loads
    from lessor.daemon import reconciler
    from lessor.daemon.models import loads as supervisor_loads
    from lessor.daemon.planning import admission

    assert sim_loads.decide is admission.decide is supervisor_loads.decide is reconciler.decide
    asked = []

    def counted(spec, *args, **kwargs):
        asked.append(spec.name)
        return admission.decide(spec, *args, **kwargs)

    monkeypatch.setattr(sim_loads, "decide", counted)
    scenario = SCENARIOS["box-poisson"]
    trace = make_trace(replace(scenario.workload, requests=500, seed=11), len(scenario.models))
    lessor_value = next(s for s in all_strategies(scenario.options) if s.lessor)
    Simulator(scenario.hardware, scenario.models, lessor_value, scenario.slo_ttft_s, scenario.wait_timeout_s).run(trace)
    assert asked
