"""The `value` policy: pure, over hand-written snapshots with learned traffic in them."""

from dataclasses import replace

import pytest

from lessor.daemon.config.schema import PolicyConfig
from lessor.daemon.traffic.stats import TrafficStats
from lessor.policies import AdmissionRequest, Admit, DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot, Value

G = 1 << 30
NOW = 10_000.0
POLICY = Value(horizon_s=600, margin=0.5, churn_age_s=60, starvation_s=3600)


def snap(free_gib: float, *models: ModelView) -> Snapshot:
    capacity = 80 * G
    leased = sum(m.held_bytes.get("gpu0", 0) for m in models)
    device = DeviceBudget("gpu0", capacity, capacity, G, capacity - G - leased - int(free_gib * G), leased)
    return Snapshot({"gpu0": device}, {m.name: m for m in models}, now_s=NOW)


def loaded(name, gib, rate, in_flight=0, age_s=3600.0, load_s=5.0, pinned=False, spare_gib=0.0) -> ModelView:
    return ModelView(name, "ready", 50, pinned, in_flight, NOW - 1, {"gpu0": int(gib * G)}, request_rate=rate,
                     load_cost_s=load_s, size_bytes=int(gib * G), ready_since_s=NOW - age_s,
                     kv_spare_bytes={"gpu0": int(spare_gib * G)} if spare_gib else {})


def wanting(name, rate, starved_s=0.0, load_s=5.0) -> ModelView:
    return ModelView(name, "unloaded", request_rate=rate, load_cost_s=load_s, starved_s=starved_s, waiting=1)


def want(gib, name="new", cause="request") -> AdmissionRequest:
    return AdmissionRequest(name, {"gpu0": int(gib * G)}, 50, cause)


def test_what_fits_is_admitted_whatever_the_rates():
    assert POLICY(want(10), snap(20, loaded("a", 30, rate=5.0), wanting("new", 0.0))) == Admit()


def test_a_popular_newcomer_evicts_the_model_that_serves_least_per_byte():
    s = snap(0, loaded("busy-small", 10, rate=1.0), loaded("cold-big", 30, rate=0.01), loaded("warm", 20, rate=0.5),
             wanting("new", 1.0))
    assert POLICY(want(25), s) == Evict(("cold-big",))


def test_a_newcomer_rarer_than_a_busy_victim_waits_and_ageing_lets_it_in():
    s = snap(0, loaded("a", 30, rate=1.0, in_flight=1), wanting("new", 0.5))
    decision = POLICY(want(25), s)
    assert isinstance(decision, Queue) and decision.blockers == ()
    assert "would lose more requests" in decision.reason and "a (60/min)" in decision.reason
    assert decision.recheck_s == 60.0  # looked at again within a churn age: by then "a" may be quiet
    # gain 0.5/s × (600 − 5) s × ageing must pass 1.5 × 1.0/s × (600 + 5) s: ageing 3.05, 2.05 × 3600 s starved
    needed_s = (1.5 * 605 / (0.5 * 595) - 1) * 3600
    for starved_s, evicted in ((needed_s - 1, False), (needed_s + 1, True)):
        aged = snap(0, loaded("a", 30, rate=1.0), wanting("new", 0.5, starved_s=starved_s))  # "a" idle, not quiet
        assert (POLICY(want(25), aged) == Evict(("a",))) is evicted


def test_the_margin_keeps_a_model_against_a_newcomer_just_as_popular():
    s = snap(0, loaded("a", 30, rate=1.0), wanting("new", 1.2))
    assert isinstance(POLICY(want(25), s), Queue)  # until "a" is quiet
    s = snap(0, loaded("a", 30, rate=1.0), wanting("new", 1.6))
    assert POLICY(want(25), s) == Evict(("a",))


def test_a_model_younger_than_the_churn_age_is_not_evicted_and_the_wait_ends_when_it_matures():
    s = snap(0, loaded("young", 30, rate=1.0, in_flight=1, age_s=20), wanting("new", 5.0))
    decision = POLICY(want(25), s)
    assert isinstance(decision, Queue) and "loaded less than 60 s ago" in decision.reason
    assert decision.recheck_s == pytest.approx(40.0)
    s = snap(0, loaded("young", 30, rate=1.0, age_s=61), wanting("new", 5.0))
    assert POLICY(want(25), s) == Evict(("young",))


def test_busy_victims_worth_evicting_are_named_as_blockers_and_idle_ones_go_first():
    s = snap(0, loaded("busy", 30, rate=0.1, in_flight=2), wanting("new", 5.0))
    assert POLICY(want(25), s) == Queue("the models it would evict are busy", ("busy",))
    s = snap(0, loaded("busy", 30, rate=0.1, in_flight=2), loaded("idle", 30, rate=0.2), wanting("new", 5.0))
    assert POLICY(want(25), s) == Evict(("idle",))


def test_pinned_models_never_go_and_what_could_never_fit_is_rejected():
    s = snap(0, loaded("pinned", 60, rate=0.0, pinned=True), loaded("b", 10, rate=0.0), wanting("new", 9.0))
    decision = POLICY(want(25), s)
    assert isinstance(decision, Rejected) and decision.short_bytes == {"gpu0": 15 * G}


def test_elastic_kv_comes_before_any_eviction():
    s = snap(0, loaded("a", 30, rate=0.0, spare_gib=10), wanting("new", 5.0))
    assert POLICY(want(8), s) == Evict((), {"a": {"gpu0": 8 * G}})


def test_an_operators_load_and_a_give_back_are_not_weighed():
    s = snap(0, loaded("popular", 30, rate=9.0), loaded("rare", 30, rate=0.1), wanting("new", 0.0))
    assert isinstance(POLICY(want(25), s), Queue)
    assert POLICY(want(25, cause="operator"), s) == Evict(("rare",))
    assert POLICY(want(25, cause="restart"), s) == Evict(("rare",))
    short = snap(-5, loaded("popular", 30, rate=9.0), loaded("rare", 30, rate=0.1))
    assert POLICY(AdmissionRequest.give_back("gpu0"), short) == Evict(("rare",))


def test_a_newcomer_nobody_asked_for_never_ages_past_a_busy_model():
    s = snap(0, loaded("a", 30, rate=1.0, in_flight=1), wanting("new", 0.0, starved_s=1e9))
    decision = POLICY(want(25), s)
    assert isinstance(decision, Queue) and "would lose more" in decision.reason and decision.recheck_s == 60.0


def test_the_config_builds_it_with_its_parameters_and_it_is_the_default():
    config = PolicyConfig()
    assert config.name == "value"
    assert config.build() == Value(churn_age_s=60.0, starvation_s=7200.0)
    assert PolicyConfig(name="value", churn_age="5m", starvation="1h").build() == Value(churn_age_s=300.0,
                                                                                          starvation_s=3600.0)
    built = PolicyConfig(name="priority", churn_age="2m").build()
    assert built.func.__name__ == "priority" and built.keywords == {"churn_age_s": 120.0}


def test_a_model_its_bursts_swamp_is_worth_the_requests_it_starts_at_once():
    swamped = ModelView("swamped", "ready", 50, False, 0, NOW - 1, {"gpu0": 30 * G}, request_rate=1.0,
                        load_cost_s=5.0, ready_since_s=NOW - 3600, started_share=0.2, kept_up_share=0.2)
    s = snap(0, swamped, wanting("new", 0.5))
    assert POLICY(want(25), s) == Evict(("swamped",))  # 0.5 × 595 > 1.5 × 0.2 × 605
    assert isinstance(replace(POLICY, weigh_share=False)(want(25), s), Queue)  # by rates alone it stays


# -- issue 34: models in use now are protected, a first-time model gets a prior, the busiest is not cheap --

def test_a_model_asked_for_the_first_time_is_worth_an_idle_model_that_was_merely_used_before():
    used_before = loaded("used", 30, rate=2.0)  # idle, asked for a second ago: not quiet yet
    first = replace(wanting("first", rate=0.001), first_time=True)
    assert POLICY(want(25, "first"), snap(0, used_before, first)) == Evict(("used",))
    # The same rate with a history here is weighed: it waits until "used" turns quiet.
    assert isinstance(POLICY(want(25, "first"), snap(0, used_before, replace(first, first_time=False))), Queue)
    # Against a model busy now, the prior gives nothing: its rate is weighed.
    busy = loaded("used", 30, rate=2.0, in_flight=1)
    assert isinstance(POLICY(want(25, "first"), snap(0, busy, first)), Queue)


def test_a_model_busy_an_hour_ago_yields_to_a_waiting_one_whatever_its_learned_rate():
    stats = TrafficStats()
    for i in range(3600):  # a request a second for an hour, an hour ago
        stats.record_request("was-busy", i)
    stats.record_request("new", 7200.0)
    was_busy = replace(loaded("was-busy", 30, rate=0.0), last_used_s=3600.0, ready_since_s=0.0,
                       **{k: v for k, v in stats.view("was-busy", 7200.0, 30 * G).items() if k != "load_cost_s"})
    assert was_busy.request_rate > stats.rate("new", 7200.0)  # the rate alone would keep it
    newcomer = replace(wanting("new", 0.0), **stats.view("new", 7200.0, 25 * G))
    s = replace(snap(0, was_busy, newcomer), now_s=7200.0)
    assert POLICY(want(25), s) == Evict(("was-busy",))


def test_the_busiest_model_keeping_its_batch_full_is_not_the_cheapest():
    """A model that fills every one of its 16 slots and keeps up: most of its requests queue for
    a slot (few start at once), fewer than a batch ahead of them. It keeps its place; the model
    asked for least goes."""
    stats = TrafficStats()
    for i in range(500):
        stats.record_request("hot", i * 0.2)  # 5/s
        stats.record_ready_arrival("hot", started=i % 20 == 0, ahead=i % 8, batch=16)
        if i % 10 == 0:
            stats.record_request("cold", i * 0.2)  # 0.5/s
            stats.record_ready_arrival("cold", started=True)
        stats.record_start("hot")
        stats.record_start("cold")
    assert stats.started_share("hot") < 0.1 < 0.95 < stats.kept_up_share("hot")
    now = 100.0

    def view(name):
        return replace(loaded(name, 20, rate=0.0), **{k: v for k, v in stats.view(name, now, 20 * G).items()
                                                        if k != "load_cost_s"})
    hot, cold = view("hot"), view("cold")
    assert hot.request_rate > 5 * cold.request_rate
    s = snap(0, hot, cold, wanting("new", rate=1.0))
    assert POLICY(want(15), s) == Evict(("cold",))


def test_a_model_behind_its_backlog_is_worth_at_least_the_requests_it_starts():
    """Loaded with a backlog (its requests piled up while it loaded), it kept up with none of them
    yet; it still starts 4 a second, more than the model asked for least serves."""
    behind = replace(loaded("behind", 20, rate=4.5), kept_up_share=0.0, start_rate=4.0)
    cold = replace(loaded("cold", 20, rate=0.5), start_rate=0.5)
    s = snap(0, behind, cold, wanting("new", rate=1.0))
    assert POLICY(want(15), s) == Evict(("cold",))


def test_a_busy_model_that_yields_once_idle_is_named_so_the_load_starts_the_moment_it_idles():
    """Young and busy, but asked for so rarely (0.2/min, a 5 s reload) that it yields the moment it
    idles: the load waits for it by name (the router asks again when it idles), not for a recheck."""
    s = snap(0, loaded("rare", 30, rate=0.2 / 60, in_flight=1, age_s=5), wanting("new", 0.2 / 60))
    assert POLICY(want(25), s) == Queue("the models that could make room are busy; they yield once idle", ("rare",))
