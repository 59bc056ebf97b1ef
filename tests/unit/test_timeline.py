"""A load's timeline: each interval counted once, under the step and side it belongs to."""

import itertools

from lessor.daemon.models.timeline import LoadTimeline


def ticking(*moments: float):
    it = iter(moments)
    return lambda: next(it)


ONE_PHASE = ("requested", "admitted", "granted", "spawned", "weights_noticed", "weights_measured", "ready_noticed",
             "verified", "done")


def one_phase_load(step_s: float) -> LoadTimeline:
    """A one-phase engine's marks, `step_s` apart from 0."""
    clock = itertools.count(0.0, step_s)
    timeline = LoadTimeline(clock=lambda: next(clock))
    for mark in ONE_PHASE:
        timeline.mark(mark)
    return timeline


def test_a_two_phase_load_with_engine_stamps():
    timeline = LoadTimeline(clock=ticking(0.0, 0.001, 0.004, 0.010, 5.000, 5.001, 5.002, 5.300, 5.301, 5.302, 5.303,
                                          5.305))
    for mark in ("requested", "admitted", "granted", "spawned", "weights_noticed", "weights_measured", "kv_granted",
                 "kv_allocated", "kv_measured", "ready_noticed", "verified", "done"):
        timeline.mark(mark)
    timeline.add_engine({"weights_start": 2.0, "weights_loaded": 4.998, "kv_start": 5.01,
                         "bogus": "x", "flag": True})
    out = timeline.to_dict()
    steps = {s["step"]: (s["whose"], s["seconds"]) for s in out["steps"]}
    assert steps["interpreter and imports"] == ("engine", 1.99)
    assert steps["weights in"] == ("engine", 2.998)
    assert steps["weights noticed"] == ("notice", 0.002)
    assert steps["kv allocated"] == ("engine", 0.298)
    assert "engine start and weights, to its health answering" not in steps and "ready checked" not in steps
    assert "e:bogus" not in out["marks"] and "e:flag" not in out["marks"]
    # Every interval from requested to done is in exactly one step.
    assert round(sum(out["totals"].values()), 6) == out["seconds"] == 5.305
    assert out["totals"]["lessor"] == round(0.001 + 0.003 + 0.006 + 0.001 + 0.002, 6)
    assert out["totals"]["measure"] == round(0.001 + 0.001 + 0.001, 6)


def test_a_one_phase_engine_without_stamps():
    out = one_phase_load(0.5).to_dict()
    assert [s["step"] for s in out["steps"]] == ["admit", "plan and grant weights", "spawn",
                                                 "engine start and weights, to its health answering",
                                                 "measure at weights", "ready checked", "measure at ready and verify",
                                                 "record ready"]
    assert round(sum(out["totals"].values()), 6) == out["seconds"] == 4.0


def test_an_unfinished_load_has_no_total():
    timeline = LoadTimeline(clock=ticking(1.0, 2.0))
    timeline.mark("requested")
    timeline.mark("admitted")
    assert timeline.to_dict()["seconds"] is None and timeline.to_dict()["steps"][0]["step"] == "admit"


def test_an_engine_that_only_logs_its_ready_line_is_split_there():
    timeline = one_phase_load(1.0)
    timeline.add_engine({"ready_line": 3.75})  # seen in its log between spawn (3) and its health answering (4)
    steps = {s["step"]: (s["whose"], s["seconds"]) for s in timeline.to_dict()["steps"]}
    assert steps["engine start to its ready line"] == ("engine", 0.75)
    assert steps["health after its ready line"] == ("notice", 0.25)
    assert "engine start and weights, to its health answering" not in steps
