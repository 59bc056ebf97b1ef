"""The router's per-model statistics: decayed rates, load costs, and their survival of a restart."""

import math

import pytest

from lessor.daemon.traffic.stats import DEFAULT_READ_BYTES_PER_S, DEFAULT_START_S, STARVING_GAP_S, TrafficStats


def test_a_steady_stream_reads_as_its_rate():
    stats = TrafficStats(half_life_s=60)
    for i in range(6000):  # 2 requests a second for 50 minutes: many half-lives
        stats.record_request("a", i * 0.5)
    assert stats.rate("a", 3000) == pytest.approx(2.0, rel=0.02)
    assert stats.rate("b", 3000) == 0.0


def test_the_rate_halves_every_half_life_without_traffic():
    stats = TrafficStats(half_life_s=100)
    stats.record_request("a", 0.0)
    first = stats.rate("a", 0.0)
    assert first == pytest.approx(math.log(2) / 100)
    assert stats.rate("a", 100.0) == pytest.approx(first / 2)
    assert stats.rate("a", 300.0) == pytest.approx(first / 8)


def test_a_load_costs_its_bytes_over_bandwidth_until_one_is_measured():
    stats = TrafficStats()
    assert stats.load_cost_s("a", 4_000_000_000) == pytest.approx(DEFAULT_START_S + 4e9 / DEFAULT_READ_BYTES_PER_S)
    stats.record_load("a", 10.0)
    assert stats.load_cost_s("a", 4_000_000_000) == 10.0
    stats.record_load("a", 20.0)
    assert 10.0 < stats.load_cost_s("a", 0) < 20.0
    stats.record_load("a", -1.0)  # a clock that went back is no measurement
    assert stats.measured_load_s("a") == stats.load_cost_s("a", 0)


def test_what_was_saved_comes_back_decayed_by_the_downtime():
    stats = TrafficStats(half_life_s=50)
    for i in range(100):
        stats.record_request("a", float(i))
    stats.record_load("a", 7.0)
    stats.record_ready_arrival("a", started=False)
    saved = stats.to_dict(now=100.0)
    again = TrafficStats(half_life_s=50)
    again.restore(saved, now=5.0, elapsed_s=50.0)  # a new process's clock starts anew
    assert again.rate("a", 5.0) == pytest.approx(stats.rate("a", 100.0) / 2)
    assert again.load_cost_s("a", 0) == 7.0
    assert again.started_share("a") == stats.started_share("a") < 1.0


def test_the_share_started_at_once_follows_the_latest_requests():
    stats = TrafficStats()
    assert stats.started_share("a") == 1.0  # nothing seen: no reason to think less of it
    for _ in range(200):
        stats.record_ready_arrival("a", started=False)  # a burst its slots cannot take
    assert stats.started_share("a") < 0.05
    for _ in range(200):
        stats.record_ready_arrival("a", started=True)
    assert stats.started_share("a") > 0.95


def test_a_half_life_must_be_positive():
    with pytest.raises(ValueError, match="half_life_s"):
        TrafficStats(half_life_s=0)


def test_a_model_starves_while_its_requests_wait_counting_quiet_spells_as_a_minute_at_most():
    stats = TrafficStats()
    assert stats.starved_s("a", 100.0) == 0.0
    stats.record_wait("a", 100.0)
    assert stats.starved_s("a", 130.0) == 30.0
    stats.record_wait("a", 130.0)
    stats.record_wait("a", 1000.0)  # a quiet spell of 870 s between two unserved requests counts 60 s
    assert stats.starved_s("a", 1000.0) == pytest.approx(30.0 + STARVING_GAP_S)
    assert stats.starved_s("a", 5000.0) == pytest.approx(30.0 + 2 * STARVING_GAP_S)
    stats.record_start("a")
    assert stats.starved_s("a", 5000.0) == 0.0


def test_a_saturated_model_keeps_up_while_a_swamped_one_falls_behind():
    stats = TrafficStats()
    for i in range(300):
        stats.record_ready_arrival("saturated", started=False, ahead=i % 16, batch=16)  # waits for a slot
        stats.record_ready_arrival("swamped", started=False, ahead=16 + i, batch=16)  # a backlog grows
        stats.record_ready_arrival("unknown", started=False)  # a driver that says nothing of its queue
    assert stats.started_share("saturated") < 0.01 and stats.kept_up_share("saturated") == 1.0
    assert stats.kept_up_share("swamped") < 0.01 and stats.kept_up_share("unknown") < 0.01
    assert stats.view("saturated", 0.0, 0)["kept_up_share"] == 1.0


def test_a_model_is_first_time_until_one_of_its_requests_starts_or_a_load_is_measured():
    stats = TrafficStats()
    stats.record_request("a", 0.0)
    stats.record_wait("a", 0.0)
    assert stats.first_time("a") and stats.view("a", 1.0, 0)["first_time"] is True
    stats.record_start("a")
    stats.record_load("b", 5.0)
    assert not stats.first_time("a") and not stats.first_time("b")
    again = TrafficStats()
    again.restore(stats.to_dict(now=1.0), now=0.0)
    assert not again.first_time("a") and not again.first_time("b") and again.first_time("c")
