"""The router's decisions (daemon/traffic/lanes.py) alone: synchronous, against a fake of its effects and
a clock the test moves. The supervisor's part (what a load does) is played by the test."""

import re
from collections import deque

import pytest

from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.traffic.estimates import RECHECK_CAP_S
from lessor.daemon.traffic.lanes import Lane, keep_alive_over
from lessor.daemon.traffic.request_errors import NotServedInTime, QueueFull, WaitTimedOut

from ..support.lanes import LOADING, READY, UNLOADED, Record, World


def test_a_ready_model_with_room_starts_requests_at_once_and_queues_the_rest_in_order():
    world = World()
    lane = world.lane("a")
    world.lanes.set_slots(lane, 2)
    world.records["a"].state = READY
    assert world.request("a", 1) and world.request("a", 2) and not world.request("a", 3)
    assert not world.request("a", 4)  # something waits ahead of it: it waits too
    assert lane.in_flight == 4 and world.admitted == []
    world.lanes.finish(lane)
    assert world.admitted == [3] and lane.in_flight == 3
    world.lanes.set_slots(lane, 3)
    assert world.admitted == [3, 4] and world.loads == []


def test_waiting_requests_ask_for_one_load_and_go_when_it_is_ready():
    world = World()
    for r in range(3):
        world.request("a", r)
    assert world.loads == ["a"] and world.lanes.loads_wanted() == {"a": "asking"}
    world.set("a", LOADING)
    world.set("a", READY)  # the load's own steps, then its outcome
    world.lanes.loaded(world.lane("a"))
    assert world.admitted == [0, 1, 2] and world.lanes.loads_wanted() == {}


def test_a_load_waits_its_patience_then_drains_its_blockers_and_undrains_when_it_ends():
    world = World(drain_after_s=30)
    world.records["b"] = Record(READY)
    assert world.request("b", "b1")
    world.request("a", "a1")
    world.lanes.must_wait(world.lane("a"), ("b",))
    assert world.request("b", "b2")  # within the patience: b serves as usual
    world.advance(30)  # patience over: a is asked again
    assert world.loads == ["a", "a"]
    world.lanes.must_wait(world.lane("a"), ("b",))
    b = world.lane("b")
    assert b.drained and not world.request("b", "b3") and b.in_flight == 2  # b3 is held
    world.lanes.finish(b)
    assert world.loads == ["a", "a"]  # b still busy
    world.lanes.finish(b)
    assert world.loads == ["a", "a", "a"]  # b idle: a asks again at once
    world.set("b", UNLOADED)  # evicted for a
    world.set("a", READY)
    world.lanes.loaded(world.lane("a"))
    assert world.admitted == ["a1"] and not b.drained
    assert world.loads[-1] == "b"  # b's held request wants b back


def test_with_drain_after_none_a_load_never_drains_and_waits_for_idle_blockers():
    world = World(drain_after_s=None)
    world.records["b"] = Record(READY)
    world.request("b", "b1")
    world.request("a", "a1")
    world.lanes.must_wait(world.lane("a"), ("b",))
    world.advance(3600)
    assert not world.lane("b").drained and world.request("b", "b2") and world.loads == ["a"]


def test_a_waiting_request_fails_at_its_deadline_and_the_queue_is_bounded():
    world = World(wait_timeout_s=10, max_queue=2)
    world.request("a", 1)
    world.advance(4)
    world.request("a", 2)
    with pytest.raises(QueueFull) as err:
        world.request("a", 3)
    assert err.value.retry_after_s == 5.0  # not ready: retry_after_loading_s
    world.advance(6)
    assert world.failed == [(1, "WaitTimedOut")]
    world.advance(4)
    assert world.failed == [(1, "WaitTimedOut"), (2, "WaitTimedOut")] and world.lane("a").in_flight == 0
    assert world.lanes.loads_wanted() == {"a": "asking"}  # the driver's load still reports its end


def test_a_failed_load_fails_every_waiting_request_and_the_next_one_asks_again():
    world = World()
    world.request("a", 1)
    world.request("a", 2)
    world.lanes.load_failed(world.lane("a"), LoadFailed("a", "start", "no such folder"))
    assert world.failed == [(1, "LoadFailed"), (2, "LoadFailed")] and world.lanes.loads_wanted() == {}
    world.request("a", 3)
    assert world.loads == ["a", "a"]


def test_a_load_waiting_without_named_blockers_asks_again_when_another_model_changes():
    world = World()
    world.records["c"] = Record(LOADING)
    world.request("a", 1)
    world.lanes.must_wait(world.lane("a"), ())
    world.request("b", 2)  # b's own load steps are not a change that frees memory
    world.set("b", LOADING)
    world.set("b", UNLOADED)
    assert world.loads == ["a", "b"]
    world.set("c", READY)  # the load under way ended: a asks again
    assert world.loads == ["a", "b", "a"]


def test_a_request_that_leaves_frees_its_place():
    world = World()
    world.request("a", 1)
    world.request("a", 2)
    world.lanes.leave(world.lane("a"), 1)
    assert world.lanes.queued() == {"a": 1} and world.lanes.in_flight("a") == 1


def test_keep_alive_counts_from_the_last_use():
    assert keep_alive_over(30, idle_since_s=100, now_s=130) and not keep_alive_over(30, 100, 129.9)
    assert not keep_alive_over(-1, 0, 1e9)


def test_wait_timed_out_says_what_it_waited_for():
    world = World(wait_timeout_s=1)
    world.records["a"] = Record(READY)
    world.lanes.set_slots(world.lane("a"), 1)
    world.request("a", 1)
    world.request("a", 2)
    errors = []
    world.fail = lambda request, error: errors.append(error)
    world.advance(1)
    assert isinstance(errors[0], WaitTimedOut) and errors[0].waiting_for == "a free slot (max_concurrency 1)"


def test_a_waiting_load_keeps_one_retry_timer_however_often_it_is_told_to_wait():
    world = World(retry_s=1.0)
    world.request("a", 1)
    assert world.loads == ["a"]
    world.lanes.must_wait(world.lane("a"), ())
    armed = len(world.timers)  # its wait deadline and its retry
    for _ in range(4):  # asked again by other causes (memory changed, a blocker idled): told to wait each time
        world.lanes.must_wait(world.lane("a"), ())
    assert len(world.timers) == armed
    world.advance(1.0)  # the one retry asks again
    assert world.loads == ["a", "a"]


@pytest.mark.parametrize("retry_s,recheck_s,asks_at", [(1.0, 12.0, 12.0), (None, 12.0, 12.0), (1.0, 0.2, 1.0),
                                                        (None, 3600.0, RECHECK_CAP_S), (1.0, None, 1.0)])
def test_a_load_the_policy_weighs_again_later_asks_at_its_recheck_not_every_retry(retry_s, recheck_s, asks_at):
    world = World(retry_s=retry_s, drain_after_s=None)
    world.request("a", 1)
    world.lanes.must_wait(world.lane("a"), (), recheck_s)
    world.advance(asks_at - 0.01)
    assert world.loads == ["a"]
    world.advance(0.01)
    assert world.loads == ["a", "a"]


def _serve(world: World, lane: Lane, count: int, seconds: float) -> None:
    """`count` requests one after another on a ready lane, each holding its slot `seconds`."""
    for _ in range(count):
        assert world.lanes.try_start(lane)
        world.advance(seconds)
        world.lanes.finish(lane)


def test_a_full_queue_of_a_ready_model_says_when_its_turn_would_come_from_measured_requests():
    def ready_world() -> tuple[World, Lane]:
        world = World(max_queue=3)
        lane = world.lane("a")
        world.records["a"].state = READY
        world.lanes.set_slots(lane, 2)
        return world, lane

    world, lane = ready_world()
    for r in range(5):  # two run, three wait
        world.request("a", r)
    with pytest.raises(QueueFull) as err:
        world.request("a", 9)
    assert err.value.retry_after_s == 1.0  # nothing measured yet: router.retry_after_busy_s
    world, lane = ready_world()
    _serve(world, lane, 10, 4.0)  # a request holds a slot 4 s
    assert lane.service_s() == pytest.approx(4.0)
    for r in range(5):
        world.request("a", r)
    with pytest.raises(QueueFull) as err:
        world.request("a", 9)
    assert err.value.retry_after_s == pytest.approx(4 * 4.0 / 2)  # three ahead and itself, over 2 slots


def test_a_full_queue_of_a_loading_model_says_what_is_left_of_its_measured_load():
    world = World(max_queue=1, wait_timeout_s=600)
    world.request("a", 1)
    world.advance(30)  # the load took 30 s from the first ask
    world.set("a", READY)
    world.lanes.loaded(world.lane("a"))
    world.lanes.finish(world.lane("a"))
    assert world.lane("a").load_s == pytest.approx(30.0)
    world.set("a", UNLOADED)
    world.request("a", 2)  # asks for a new load
    world.advance(10)
    with pytest.raises(QueueFull) as err:
        world.request("a", 3)
    # 20 s of the load left, then the one ahead and itself at the 0 s the first request held its slot
    assert err.value.retry_after_s == pytest.approx(20.0)


def test_a_timed_out_request_is_told_the_predicted_wait_never_more_than_the_timeout():
    world = World(wait_timeout_s=10)
    world.request("a", 1)
    world.advance(100)
    world.set("a", READY)
    world.lanes.loaded(world.lane("a"))  # a 100 s load
    world.lanes.finish(world.lane("a"))
    world.set("a", UNLOADED)
    world.request("a", 2)
    errors = []
    world.fail = lambda request, error: errors.append(error)
    world.advance(10)
    assert isinstance(errors[0], WaitTimedOut) and errors[0].retry_after_s == 10.0  # 90 s left, capped at the timeout


# -- never left waiting on nothing -------------------------------------------------------------

def late_world(**rules) -> World:
    rules = {"wait_timeout_s": 300.0, "refuse_late": True, "retry_s": 1.0, **rules}
    return World(**rules)


def test_a_request_its_load_would_reach_after_its_timeout_is_answered_at_once_with_when_to_retry():
    world = late_world()
    world.request("b", 1)
    errors = []
    world.fail = lambda request, error: errors.append((request, error))
    world.lanes.must_wait(world.lane("b"), (), recheck_s=14387.0, reason="b is not worth a yet")
    ((request, error),) = errors
    assert request == 1 and isinstance(error, NotServedInTime) and isinstance(error, WaitTimedOut)
    assert error.retry_after_s == 300.0 and error.expected_s == pytest.approx(14387.0)  # Retry-After: at most the timeout
    assert "b is not worth a yet" in str(error) and "router.wait_timeout (300 s)" in str(error)
    assert world.lanes.loads_wanted() == {} and world.lane("b").waiting == deque()  # nothing left waiting


def test_a_request_waits_when_what_it_waits_for_changes_within_its_patience_or_is_unknown():
    world = late_world()
    world.request("b", 1)
    world.lanes.must_wait(world.lane("b"), (), recheck_s=45.0)  # a young model matures in 45 s
    assert world.failed == [] and world.lanes.loads_wanted() == {"b": "queued"}
    assert world.lanes.waiting("b") == {"requests": 1, "recheck_in_s": 30.0}  # looked at again within RECHECK_CAP_S
    world.lane("a")
    world.records["a"].state = READY
    assert world.lanes.try_start(world.lane("a"))  # a is busy, its service time never measured
    world.request("c", 2)
    world.lanes.must_wait(world.lane("c"), ("a",))
    assert world.failed == [] and world.lanes.waiting("c") == {"requests": 1, "recheck_in_s": 30.0}  # drain_after


def test_a_load_behind_a_busy_model_measured_slower_than_the_patience_is_refused_at_once():
    world = late_world(drain_after_s=30.0)
    lane_a = world.lane("a")
    world.records["a"].state = READY
    world.lanes.set_slots(lane_a, 1)
    _serve(world, lane_a, 3, 600.0)  # a's requests hold it 10 minutes each
    assert world.lanes.try_start(lane_a)  # and one runs now
    world.request("b", 1)
    errors = []
    world.fail = lambda request, error: errors.append(error)
    world.lanes.must_wait(world.lane("b"), ("a",))
    (error,) = errors
    assert isinstance(error, NotServedInTime) and error.expected_s == pytest.approx(600.0)
    assert "a to finish their requests" in str(error) and not world.lane("a").drained


def test_a_load_someone_else_is_admitting_is_asked_again_at_a_state_change_or_after_retry_after_busy():
    world = late_world(retry_after_busy_s=2.0)
    world.request("a", 1)
    assert world.loads == ["a"]
    world.lanes.busy(world.lane("a"))  # an operator's load of it is being admitted: no state of its own yet
    assert world.loads == ["a"]  # not asked again at once (that would spin)
    world.advance(2.0)
    assert world.loads == ["a", "a"]
    world.lanes.busy(world.lane("a"))
    world.set("a", LOADING)  # the operator's load was admitted
    assert world.loads == ["a", "a"]  # held for the state, as before


def test_the_lanes_say_when_a_wish_ends_so_a_waiting_model_can_stop_waiting():
    ended = []
    world = late_world()
    world.lanes._wish_ended = lambda lane: ended.append((lane.name, lane.load))
    world.request("a", 1)
    world.lanes.must_wait(world.lane("a"), (), recheck_s=45.0)
    world.lanes.leave(world.lane("a"), 1)  # its only request left
    assert ended == [("a", None)]


def _weigh_until_answered(world: World, name: str, rechecks, errors: list, until_s: float) -> None:
    """The driver's part: each time the load is asked, the policy answers "wait" with the next
    recheck; the clock moves a second at a time until a request is answered."""
    asked = len(world.loads)
    while not errors and world.now < until_s:
        world.advance(1.0)
        if len(world.loads) > asked:
            asked = len(world.loads)
            world.lanes.must_wait(world.lane(name), (), recheck_s=next(rechecks), reason=f"{name} is not worth a yet")


def test_a_recheck_that_moves_each_time_it_comes_due_is_answered_at_the_first_broken_estimate():
    """The finding: a is asked all the time, so each weighing says "again in 60 s" and b's request
    was refused only near its deadline (262 s). The estimate came due at 60 s and was not kept:
    a moving target, answered then, in whole seconds, saying what changed."""
    world = late_world()
    world.request("b", 1)
    errors = []
    world.fail = lambda request, error: errors.append((world.now, error))
    world.lanes.must_wait(world.lane("b"), (), recheck_s=60.0, reason="b is not worth a yet")
    _weigh_until_answered(world, "b", iter(lambda: 60.0, None), errors, until_s=300.0)
    ((at_s, error),) = errors
    assert at_s == 60.0 and isinstance(error, NotServedInTime) and error.missed_s == 60.0  # not at 270 s
    assert error.retry_after_s == 60 and isinstance(error.retry_after_s, int)
    message = str(error)
    assert "to be possible in about 60 s, and weighed again then it still waits" in message
    assert "instead of waiting out the 240 s left of router.wait_timeout (300 s); retry after 60 s" in message
    assert not re.search(r"\d\.\d", message)  # seconds in whole numbers


def test_a_recheck_that_comes_true_is_waited_for():
    world = late_world()
    world.request("b", 1)
    world.lanes.must_wait(world.lane("b"), (), recheck_s=45.0)
    world.advance(30.0)  # looked at within RECHECK_CAP_S: 15 s more, as said
    world.lanes.must_wait(world.lane("b"), (), recheck_s=15.0)
    world.advance(15.0)
    assert world.failed == [] and world.loads == ["b", "b", "b"]  # asked at 0, 30 and 45 s
    world.set("b", READY)
    assert world.admitted == [1]


def test_a_late_refusal_says_how_much_of_the_patience_was_left_in_whole_seconds():
    world = late_world()
    world.request("b", 1)
    world.advance(261.9)  # it has waited; the policy answers for the first time now
    errors = []
    world.fail = lambda request, error: errors.append(error)
    world.lanes.must_wait(world.lane("b"), (), recheck_s=59.9817, reason="b is not worth a yet")
    (error,) = errors
    assert error.retry_after_s == 60 and error.left_s == pytest.approx(38.1)
    assert str(error) == ("model 'b' cannot be served within the 38 s left of router.wait_timeout (300 s): "
                          "b is not worth a yet; it could be served in about 60 s at the soonest; retry after 60 s")
