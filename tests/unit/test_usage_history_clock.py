"""The usage history against steps of the wall clock (issue 39, finding 10): it ran on the wall
clock, so after a step back each new sample overwrote the last one (the chart froze) and after a
step forward the hour was dropped. It runs on the monotonic clock; wall time only shows it."""

from lessor.api.schemas import HistoryOut
from lessor.daemon.devices.history import UsageHistory
from lessor.daemon.units import GiB

HOUR = 3600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reading(leased: int) -> list[dict]:
    return [{"id": "gpu0", "capacity_bytes": 24 * GiB, "headroom_bytes": GiB, "leased_bytes": leased,
             "foreign_bytes": 8 * GiB, "used_bytes": 8 * GiB + leased, "free_bytes": 15 * GiB - leased}]


def sampled(history: UsageHistory, readings: list, clocks: tuple[Clock, Clock], leased: int) -> None:
    monotonic, wall = clocks
    monotonic.now += 10
    wall.now += 10
    readings[:] = reading(leased)
    history.sample()


def test_a_step_back_of_the_wall_clock_neither_overwrites_samples_nor_freezes_the_chart():
    monotonic, wall, readings = Clock(500.0), Clock(1_700_000_000.0), reading(0)
    history = UsageHistory(lambda: readings, clock=monotonic, wall=wall, window_s=HOUR, interval_s=10, min_gap_s=1)
    for n in range(3):
        sampled(history, readings, (monotonic, wall), n * GiB)
    wall.now -= HOUR  # NTP or an operator steps the clock back an hour
    for n in range(3, 6):
        sampled(history, readings, (monotonic, wall), n * GiB)
    out = history.to_dict()
    HistoryOut.model_validate(out)
    shown = [sample["at_s"] for sample in out["samples"]]
    assert [s["devices"]["gpu0"]["leased_bytes"] for s in out["samples"]] == [n * GiB for n in range(6)]  # none lost
    assert shown == sorted(shown) and shown[-1] == out["now_s"] == wall.now  # the chart ends now, in order
    assert [b - a for a, b in zip(shown, shown[1:])] == [10.0] * 5  # as far apart as they were taken


def test_a_step_forward_of_the_wall_clock_keeps_the_hour():
    monotonic, wall, readings = Clock(500.0), Clock(1_700_000_000.0), reading(0)
    history = UsageHistory(lambda: readings, clock=monotonic, wall=wall, window_s=HOUR, interval_s=10, min_gap_s=1)
    for n in range(3):
        sampled(history, readings, (monotonic, wall), n * GiB)
    wall.now += 2 * HOUR
    sampled(history, readings, (monotonic, wall), 3 * GiB)
    assert len(history.to_dict()["samples"]) == 4


def test_lessord_orders_its_history_by_the_monotonic_clock():
    import time

    history = UsageHistory(lambda: reading(0))
    assert history._clock is time.monotonic and history._wall is time.time
