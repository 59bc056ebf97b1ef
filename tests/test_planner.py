"""The planner against the seed case and its engine rules."""

from pathlib import Path

from lessor.daemon.config import load_config
from lessor.daemon.planner import plan, with_overrides
from lessor.daemon.errors import PlanRejected
from lessor.daemon.units import GiB
from lessor.policies import DeviceBudget

import pytest

SEED = load_config(Path(__file__).resolve().parent.parent / "examples" / "seed.yaml")
R1 = SEED.model("deepseek-r1")


def seed_budgets(foreign=8 * GiB):
    return {"gpu0": DeviceBudget("gpu0", 24 * GiB, 24 * GiB, GiB, foreign, 0),
            "host": DeviceBudget("host", 512 * GiB, 512 * GiB, 8 * GiB, 0, 0)}


def gpu_bytes(result, transient):
    return sum(w.bytes for w in result.all_leases() if w.device == "gpu0" and (w.kind.value == "load_peak") == transient)


def test_seed_plan_fits_in_fifteen_gib_at_every_moment():
    result = plan(R1, seed_budgets())
    assert result.fits, result.reasons
    assert gpu_bytes(result, transient=False) <= 15 * GiB  # steady: weights + kv + reserve
    assert result.peak_need()["gpu0"] <= 15 * GiB  # loading: weights + load peak
    assert result.params["cache_lens"] % 256 == 0
    assert result.params["max_batch_size"] == 3 and result.params["chunk_size"] == 128
    assert result.kv_tokens == result.params["cache_lens"]
    kv = next(w for w in result.steady_leases if w.kind.value == "kv")
    assert kv.bytes == result.kv_tokens * 70272


def test_max_batch_size_two_is_rejected_with_the_engine_rule():
    with pytest.raises(PlanRejected) as info:
        with_overrides(R1, {"max_batch_size": 2})
    assert info.value.field == "engine.max_batch_size"
    assert "The size of tensor a (4) must match the size of tensor b (5)" in str(info.value)


def test_no_room_says_how_much_to_free():
    result = plan(R1, seed_budgets(foreign=20 * GiB))
    assert not result.fits
    assert "load needs" in result.reasons[0] and "free" in result.reasons[0]


def test_configured_kv_that_does_not_fit_names_the_value_that_would():
    spec = with_overrides(R1, {"cache_lens": 65536})
    result = plan(spec, seed_budgets())
    assert not result.fits
    assert "lower cache_lens to" in result.reasons[0]


def test_too_small_a_kv_cache_is_refused():
    spec = R1.model_copy(update={"plan": R1.plan.model_copy(update={"min_kv_tokens": 100_000})})
    result = plan(spec, seed_budgets())
    assert not result.fits and "below plan.min_kv_tokens 100000" in result.reasons[0]
