"""Policies are pure: hand-written snapshots in, decisions out; and what the daemon says of them."""

import re
from dataclasses import replace

import pytest

from lessor.policies import (
    POLICIES,
    AdmissionRequest,
    Admit,
    DeviceBudget,
    Evict,
    ModelView,
    Queue,
    Rejected,
    Snapshot,
    fit,
    lru_idle,
    priority,
)

G = 1 << 30


def snap(free_gib: float, *models: ModelView) -> Snapshot:
    capacity = 24 * G
    leased = sum(m.held_bytes.get("gpu0", 0) for m in models)
    foreign = capacity - G - leased - int(free_gib * G)
    device = DeviceBudget("gpu0", capacity, capacity, G, foreign, leased)
    return Snapshot({"gpu0": device}, {m.name: m for m in models}, now_s=100.0)


def model(name, gib, state="ready", prio=50, pinned=False, in_flight=0, last_used=0.0) -> ModelView:
    return ModelView(name, state, prio, pinned, in_flight, last_used, {"gpu0": int(gib * G)})


def want(gib, prio=50, name="new") -> AdmissionRequest:
    return AdmissionRequest(name, {"gpu0": int(gib * G)}, prio)


def test_everything_admits_what_fits():
    for policy in (fit, lru_idle, priority):
        assert policy(want(4), snap(5)) == Admit()


def test_fit_never_evicts():
    decision = fit(want(8), snap(2, model("a", 10)))
    assert isinstance(decision, Rejected) and decision.short_bytes == {"gpu0": 6 * G}
    assert "never evicts" in decision.reason


def test_lru_idle_evicts_least_recently_used_first_and_only_as_many_as_needed():
    s = snap(2, model("old", 4, last_used=10), model("newer", 4, last_used=50), model("newest", 4, last_used=90))
    assert lru_idle(want(9), s) == Evict(("old", "newer"))


def test_pinned_models_are_never_evicted():
    s = snap(2, model("pinned", 10, pinned=True, last_used=0), model("b", 2, last_used=5))
    decision = lru_idle(want(8), s)
    assert isinstance(decision, Rejected)
    assert decision.short_bytes == {"gpu0": 4 * G}


def test_busy_models_make_the_request_queue():
    s = snap(2, model("busy", 10, in_flight=3))
    assert isinstance(lru_idle(want(8), s), Queue)
    s = snap(2, model("loading", 10, state="loading"))
    assert isinstance(lru_idle(want(8), s), Queue)


def test_priority_evicts_only_lower_priority_lowest_first():
    s = snap(1, model("low", 5, prio=10, last_used=90), model("mid", 5, prio=40, last_used=1), model("high", 5, prio=90))
    assert priority(want(9, prio=50), s) == Evict(("low", "mid"))
    busy = snap(1, model("low", 5, prio=10, last_used=90), model("mid", 5, prio=40, in_flight=1),
                model("high", 5, prio=90, in_flight=1))
    decision = priority(want(9, prio=20), busy)
    assert isinstance(decision, Rejected)


def test_models_on_other_devices_are_not_victims():
    other = ModelView("elsewhere", "ready", 0, False, 0, 0.0, {"gpu1": 20 * G})
    s = snap(2, other, model("here", 3))
    assert lru_idle(want(4), s) == Evict(("here",))


def test_unknown_device_is_a_rejection_not_a_crash():
    decision = lru_idle(AdmissionRequest("x", {"gpu9": G}), snap(10))
    assert isinstance(decision, Rejected) and decision.short_bytes == {"gpu9": G}


def test_a_give_back_that_evicting_would_not_cover_says_so():
    """Issue 20: foreign usage grew 3 GiB past the leases while 'b' (2 GiB) was idle: the policy
    evicts nothing, and says that evicting b would not have covered it."""
    s = snap(-3, model("b", 2))
    decision = lru_idle(AdmissionRequest.give_back("gpu0"), s)
    assert isinstance(decision, Rejected)
    assert decision.reason == "evicting b would free 2.0 GiB of the 3.0 GiB short on gpu0: not enough, nothing evicted"
    assert decision.victims == ("b",) and decision.freed_bytes == {"gpu0": 2 * G}


def test_a_rejection_with_nothing_to_evict_says_why():
    decision = lru_idle(want(8), snap(2, model("pinned", 10, pinned=True)))
    assert isinstance(decision, Rejected) and decision.victims == ()
    assert "no model this policy may evict holds memory there" in decision.reason


async def test_the_daemon_logs_why_foreign_growth_evicted_nothing(env, caplog):
    """`set-foreign gpu0 5GiB` with 'b' idle logged 'evicting nothing (no idle model may go)':
    the true reason was that evicting b would not cover the shortfall."""
    from lessor.daemon.units import GiB, MiB

    from ..support.configs import torch_model
    controller, _, _ = await env([torch_model("b", "256MiB", plan={"min_kv_tokens": 1024, "max_kv_tokens": 1024})])
    await controller.load("b")
    assert sum(controller.model("b")["leased_bytes"].values()) == 320 * MiB  # weights and 1024 tokens of 64 KiB
    # Within the headroom a card still has room for (1 GiB): 256 MiB more than b's leases give back.
    grown = controller.ledger.budgets()["gpu0"].free_bytes + 576 * MiB
    controller.probe.set_foreign("gpu0", 8 * GiB + grown)
    with caplog.at_level("WARNING", logger="lessor.reconciler"):
        await controller.reconciler.check()
    assert ("gpu0: foreign usage grew 576.0 MiB past the free memory; evicting nothing: evicting b would free "
            "320.0 MiB of the 576.0 MiB short on gpu0: not enough, nothing evicted") in caplog.text
    assert controller.model("b")["state"] == "ready"


# -- what an explicit load is answered when the policy rejects it (daemon/planning/admission.py) ---------

M = 1 << 20


def _budgets(**free_by_device):
    return {d: DeviceBudget(d, 24 * G, 24 * G, G, 24 * G - G - free, 0) for d, free in free_by_device.items()}


@pytest.mark.parametrize("need, free, device, wanted, free_text, short", [
    ({"gpu0": 3 * G}, {"gpu0": G}, "gpu0", "3.0 GiB", "1.0 GiB is free", "2.0 GiB"),
    ({"gpu0": G}, {"gpu0": 0}, "gpu0", "1.0 GiB", "0 B is free", "1.0 GiB"),
    # Issue 23: foreign usage grew past the leases: "needs -768.0 MiB on gpu0, -1.0 GiB is free".
    ({"gpu0": 256 * M}, {"gpu0": -G}, "gpu0", "256.0 MiB", "none is free (1.0 GiB over its budget)", "1.2 GiB"),
    ({"gpu0": 512 * M}, {"gpu0": -256 * M}, "gpu0", "512.0 MiB", "none is free (256.0 MiB over its budget)", "768.0 MiB"),
    # The device shortest of memory is named, not the one asked the most of.
    ({"gpu0": 10 * G, "gpu1": 2 * G}, {"gpu0": 9 * G, "gpu1": -G}, "gpu1", "2.0 GiB", "none is free", "3.0 GiB"),
])
def test_a_refusal_names_the_worst_shortfall_once_and_never_a_negative_figure(need, free, device, wanted,
                                                                              free_text, short):
    from lessor.daemon.planning.admission import refused
    snapshot = Snapshot(_budgets(**free), {"a": model("a", 2, pinned=True)})
    request = AdmissionRequest("new", need)
    message = refused(request, snapshot, lru_idle(request, snapshot), "lru_idle").message()
    assert message.startswith(f"model 'new' needs {wanted} on {device}, {free_text}")
    assert f"short by {short};" in message
    assert not re.search(r"-\d", message), message
    assert message.count("short") == 1 and message.count("needs") == 1  # the numbers said once


def test_a_refusal_says_what_evicting_would_have_freed_and_what_to_change():
    from lessor.daemon.planning.admission import refused
    snapshot = snap(1, model("b", 2))
    request = want(8)
    message = refused(request, snapshot, lru_idle(request, snapshot), "lru_idle").message()
    assert message == ("model 'new' needs 8.0 GiB on gpu0, 1.0 GiB is free: short by 7.0 GiB; evicting b (every "
                       "model policy 'lru_idle' may evict) would free only 2.0 GiB there; free memory on gpu0 or give "
                       "this model a smaller KV cache (plan.max_kv_tokens)")


async def test_a_load_refused_under_foreign_churn_says_consistent_figures(env):
    """Issue 23 saw "needs -768.0 MiB on gpu0, -1.0 GiB is free (short by 256.0 MiB)": the free
    figure was the device's, the short one what stayed short after evicting the idle model."""
    from lessor.daemon.planning.rejections import NotEnoughMemory

    from ..support.configs import torch_model
    small = {"min_kv_tokens": 1024, "max_kv_tokens": 1024}
    tiny = {"weights": "64MiB", "kv_bytes_per_token": 65536, "load_peak": 0}
    controller, _, _ = await env([torch_model("b", "256MiB", plan=small), {**torch_model("c", plan=small), "memory": tiny}])
    await controller.load("b")  # 320 MiB, idle: evicting it would not cover what is short
    free = controller.ledger.budgets()["gpu0"].free_bytes
    controller.probe.set_foreign("gpu0", 8 * G + free + 768 * M)  # 768 MiB over the budget
    with pytest.raises(NotEnoughMemory) as info:
        await controller.load("c")
    message = str(info.value)
    assert message.startswith("model 'c' needs 128.0 MiB on gpu0, none is free (768.0 MiB over its budget): "
                              "short by 896.0 MiB; evicting b"), message
    assert not re.search(r"-\d", message) and controller.model("b")["state"] == "ready"


def test_a_wait_after_failed_attempts_leads_with_what_they_said():
    from lessor.daemon.planning.admission import must_wait
    snapshot = snap(1, model("busy", 10, in_flight=1))
    waits = must_wait(want(4), snapshot, "the models that could make room are busy", ("busy",))
    after = waits.after("attempt 1: verify: over its leases")
    assert after.blockers == ("busy",)
    assert after.error.message() == ("model 'new' needs 4.0 GiB on gpu0, 1.0 GiB is free: short by 3.0 GiB; attempt 1: "
                                     "verify: over its leases; then: the models that could make room are busy; it "
                                     "loads once busy finish their requests")


# -- elastic KV: shrink before evicting ------------------------------------------------------------

def elastic(name, gib, spare_gib, **kw) -> ModelView:
    from dataclasses import replace

    return replace(model(name, gib, **kw), kv_spare_bytes={"gpu0": int(spare_gib * G)})


@pytest.mark.parametrize("policy", [lru_idle, priority])
def test_idle_models_give_back_kv_instead_of_being_evicted_when_that_covers_it(policy):
    s = snap(2, elastic("old", 6, 1, prio=10, last_used=10), elastic("newer", 6, 3, prio=10, last_used=50))
    decision = policy(want(5), s)  # 3 GiB short: old gives its 1, newer the 2 left, no more
    assert decision == Evict((), {"old": {"gpu0": G}, "newer": {"gpu0": 2 * G}})


@pytest.mark.parametrize("policy", [lru_idle, priority])
def test_when_shrinking_would_not_cover_it_models_are_evicted_and_none_shrunk(policy):
    s = snap(2, elastic("old", 6, 1, prio=10, last_used=10), elastic("newer", 6, 1, prio=10, last_used=50))
    assert policy(want(5), s) == Evict(("old",))


def test_busy_pinned_and_higher_priority_models_are_not_shrunk():
    busy = snap(2, elastic("busy", 6, 4, in_flight=1), model("idle", 4, last_used=5))
    assert lru_idle(want(4), busy) == Evict(("idle",))
    pinned = snap(2, elastic("pinned", 6, 4, pinned=True), model("idle", 4, last_used=5))
    assert lru_idle(want(4), pinned) == Evict(("idle",))
    higher = snap(2, elastic("high", 6, 4, prio=90), model("low", 4, prio=10))
    assert priority(want(4, prio=50), higher) == Evict(("low",))
    assert fit(want(4), snap(2, elastic("a", 6, 4))) == Rejected(
        "2.0 GiB on gpu0 short, and policy 'fit' never evicts: nothing evicted", {"gpu0": 2 * G})


def test_a_give_back_shrinks_an_idle_model_too():
    s = snap(0, elastic("a", 6, 2))
    over = Snapshot({"gpu0": DeviceBudget("gpu0", 24 * G, 24 * G, G, 17 * G + G // 2, 6 * G)}, s.models)
    assert lru_idle(AdmissionRequest.give_back("gpu0"), over) == Evict((), {"a": {"gpu0": G // 2}})


# -- issue 34: a request is served or answered, never left waiting on a model nobody uses ----------

TWO_MODEL_NOW = 10_000.0
MIN = 1 / 60  # a rate of one request a minute, in requests per second


def two_model_box(chat_idle_s: float, chat_in_flight: int = 0) -> Snapshot:
    """The newcomer's box: a 16 GiB card, `chat` (7 GiB) loaded and asked for five times, then
    idle; `coder` (6 GiB weights, 9 GiB at its load's peak) asked for: they do not fit together."""
    chat = ModelView("chat", "ready", 50, False, chat_in_flight, TWO_MODEL_NOW - chat_idle_s, {"gpu0": 7 * G},
                     request_rate=0.13 * MIN, load_cost_s=12.0, size_bytes=7 * G, ready_since_s=TWO_MODEL_NOW - 900)
    coder = ModelView("coder", "unloaded", request_rate=0.07 * MIN, load_cost_s=10.0, waiting=1,
                      starved_s=300.0)
    device = DeviceBudget("gpu0", 16 * G, 16 * G, G, 0, 7 * G)
    return Snapshot({"gpu0": device}, {"chat": chat, "coder": coder}, now_s=TWO_MODEL_NOW)


CODER = AdmissionRequest("coder", {"gpu0": 9 * G}, 50)


@pytest.mark.parametrize("name", ["value", "lru_idle", "priority"])
def test_a_model_idle_for_minutes_yields_to_the_one_whose_requests_wait_whatever_the_policy(name):
    assert POLICIES[name](CODER, two_model_box(chat_idle_s=240)) == Evict(("chat",))


def test_fit_never_evicts_so_it_answers_at_once_instead_of_leaving_the_request_waiting():
    decision = POLICIES["fit"](CODER, two_model_box(chat_idle_s=240))
    assert isinstance(decision, Rejected) and "never evicts" in decision.reason


@pytest.mark.parametrize("name", ["value", "priority"])
def test_a_model_asked_for_within_its_churn_age_holds_the_load_until_it_turns_quiet_and_says_when(name):
    box = two_model_box(chat_idle_s=20)
    busier = replace(box, models={**box.models, "chat": replace(box.models["chat"], request_rate=2 * MIN)})
    decision = POLICIES[name](CODER, busier)
    assert isinstance(decision, Queue) and decision.blockers == ()
    assert decision.recheck_s == pytest.approx(40.0) and "chat" in decision.reason
    assert "policy.churn_age" in decision.reason
    assert lru_idle(CODER, busier) == Evict(("chat",))  # lru_idle never waited for that


def test_value_evicts_at_once_an_idle_model_asked_for_so_rarely_that_a_reload_costs_it_little():
    """chat: 0.13 requests a minute, a 12 s reload: its requests come ~38 reloads apart, so idle
    even 20 s after its last request it is not in use; coder's request would wait for nothing."""
    assert POLICIES["value"](CODER, two_model_box(chat_idle_s=20)) == Evict(("chat",))
    assert isinstance(priority(CODER, two_model_box(chat_idle_s=20)), Queue)  # priority waits for the churn age


def test_value_holds_an_idle_model_asked_for_within_a_few_of_its_reloads_until_it_turns_quiet():
    """chat: once a minute, a 12 s reload: its requests come 5 reloads apart, so idle 20 s it may
    well be asked for again before a reload would pay off: it yields once quiet, not at once."""
    box = two_model_box(chat_idle_s=20)
    often = replace(box, models={**box.models, "chat": replace(box.models["chat"], request_rate=1 * MIN)})
    decision = POLICIES["value"](CODER, often)
    assert isinstance(decision, Queue) and decision.recheck_s == pytest.approx(40.0)


@pytest.mark.parametrize("name", ["value", "lru_idle", "priority"])
def test_a_busy_model_is_waited_for_or_refused_never_evicted(name):
    decision = POLICIES[name](CODER, two_model_box(chat_idle_s=0, chat_in_flight=1))
    assert isinstance(decision, (Queue, Rejected)), decision
    if isinstance(decision, Queue) and not decision.blockers:
        assert decision.recheck_s is not None and decision.recheck_s <= 60.0  # weighed again, not in hours


def test_a_quiet_model_yields_in_the_policys_own_order():
    """Priority still chooses which quiet model goes (lowest first); the quiet rule only widens
    the models it may choose from, and pinned models never go."""
    s = snap(2, model("keep", 4, prio=90, last_used=0), model("first", 4, prio=60, last_used=0),
             model("pinned", 10, prio=0, pinned=True, last_used=0))
    assert priority(want(5, prio=50), s) == Evict(("first",))
    assert priority(want(9, prio=50), s) == Evict(("first", "keep"))
    operator = AdmissionRequest("new", {"gpu0": 5 * G}, 50, "operator")
    assert isinstance(priority(operator, s), Rejected)  # nobody waits for an operator's load


def test_the_configured_churn_age_reaches_priority():
    """policy.churn_age is how long an idle model the policy would not evict (priority: a higher
    one) must go unasked before it yields to waiting requests: with 300 s configured, a model asked
    120 s ago holds its place; with 60 s it yields. lru_idle evicts any idle model at once."""
    from lessor.daemon.config.schema import PolicyConfig
    gib = 1 << 30
    snapshot = Snapshot({"gpu0": DeviceBudget("gpu0", 16 * gib, 16 * gib, 0, 0, 7 * gib + 6 * gib)},
                        {"chat": ModelView("chat", "ready", priority=90, last_used_s=880.0, ready_since_s=100.0,
                                           held_bytes={"gpu0": 13 * gib})}, now_s=1000.0)
    request = AdmissionRequest("coder", {"gpu0": 6 * gib}, priority=50)
    assert isinstance(PolicyConfig(name="priority", churn_age=60).build()(request, snapshot), Evict)
    assert isinstance(PolicyConfig(name="priority", churn_age=300).build()(request, snapshot), Queue)
    assert isinstance(PolicyConfig(name="lru_idle", churn_age=300).build()(request, snapshot), Evict)
