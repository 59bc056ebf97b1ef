"""Policies are pure: hand-written snapshots in, decisions out."""

from lessor.policies import (Admit, AdmissionRequest, DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot, fit,
                             lru_idle, priority)

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
    decision = priority(want(9, prio=20), s)
    assert isinstance(decision, Rejected)


def test_models_on_other_devices_are_not_victims():
    other = ModelView("elsewhere", "ready", 0, False, 0, 0.0, {"gpu1": 20 * G})
    s = snap(2, other, model("here", 3))
    assert lru_idle(want(4), s) == Evict(("here",))


def test_unknown_device_is_a_rejection_not_a_crash():
    decision = lru_idle(AdmissionRequest("x", {"gpu9": G}), snap(10))
    assert isinstance(decision, Rejected) and decision.short_bytes == {"gpu9": G}
