"""The planner against the seed case and its engine rules."""

import re
from pathlib import Path

import pytest

from lessor.daemon.config.schema import load_config
from lessor.daemon.planning.planner import plan, with_overrides
from lessor.daemon.planning.rejections import PlanRejected
from lessor.daemon.units import GiB
from lessor.policies import DeviceBudget

SEED = load_config(Path(__file__).resolve().parents[2] / "examples" / "seed.yaml")
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
    spec = with_overrides(R1, {"cache_lens": 262144})
    result = plan(spec, seed_budgets())
    assert not result.fits
    assert "lower cache_lens to" in result.reasons[0]


def test_too_small_a_kv_cache_is_refused():
    spec = R1.model_copy(update={"plan": R1.plan.model_copy(update={"min_kv_tokens": 100_000})})
    result = plan(spec, seed_budgets())
    assert not result.fits and "below plan.min_kv_tokens 100000" in result.reasons[0]


def test_a_plan_that_does_not_fit_asks_for_the_smallest_kv_cache_worth_loading():
    """The policy is asked to make room for weights + min_kv_tokens, never for the sliver of KV
    cache that fits now: evicting for a sliver would end in a load refused at step 4."""
    spec = R1.model_copy(update={"plan": R1.plan.model_copy(update={"min_kv_tokens": 100_000})})
    result = plan(spec, seed_budgets())
    assert not result.fits
    assert result.kv_tokens == 100_096  # min_kv_tokens, rounded up to whole 256-token pages
    steady = gpu_bytes(result, transient=False)
    assert result.peak_need()["gpu0"] >= steady > 15 * GiB  # more than is free: evict or refuse


def kt_spec(**engine):
    return with_overrides(R1, engine)


@pytest.mark.parametrize("override,field,text", [
    ({"page_size": 300}, "engine.page_size", "must be a multiple of 256 and at least 256"),
    ({"cache_lens": 200}, "engine.cache_lens", "must be at least 256 (page_size: the KV cache is made of whole pages)"),
    ({"chunk_size": 1500}, "engine.chunk_size", "must be at most 1024 or a multiple of 1024"),
    ({"max_batch_size": 2}, "engine.max_batch_size", "must be at least 3 for the balance_serve backend"),
])
def test_each_ktransformers_rule_rejects_with_its_text(override, field, text):
    with pytest.raises(PlanRejected) as info:
        kt_spec(**override)
    assert info.value.field == field and text in info.value.reasons[0]


def test_rules_that_pass():
    # A 2048-token chunk passes the rules; its graphs (sizes 1024 and 2048) no longer fit beside 28 160 tokens.
    wide = plan(kt_spec(chunk_size=2048, cache_lens=28160, page_size=512), seed_budgets())
    assert not [r for r in wide.reasons if r.startswith("engine.")]
    assert plan(kt_spec(chunk_size=1024, max_batch_size=2, backend="ktransformers"), seed_budgets()).fits


def test_small_cache_for_the_batch_warns_about_concurrency():
    result = plan(kt_spec(cache_lens=2048, max_new_tokens=1024), seed_budgets())
    assert any("cache_lens 2048 < max_batch_size 3 x max_new_tokens 1024" in w for w in result.warnings)


def test_seed_kv_is_61_x_576_x_2_per_token_and_activation_is_an_estimate():
    result = plan(R1, seed_budgets())
    kv = next(w for w in result.steady_leases if w.kind.value == "kv")
    assert kv.bytes == result.params["cache_lens"] * 61 * 576 * 2
    assert set(result.estimated) == {"cuda_graphs", "cuda_context"}  # the weights and the KV cache are formulas
    sources = {(m["name"], m["source"]) for m in result.memory}
    assert ("weights", "formula") in sources and ("kv_per_token", "formula") in sources


def _gqa_spec(kind, **engine):
    from lessor.daemon.config.model_spec import ModelSpec

    from ..support.paths import FIXTURES
    return ModelSpec.model_validate({"name": "q", "engine": {"kind": kind, "model_path": "/m", **engine},
                                     "architecture": {"hf_config": str(FIXTURES / "qwen2.5-7b.json")},
                                     "plan": {"max_kv_tokens": 32768}})


def test_vllm_gets_a_fraction_of_the_cards_total_memory():
    budgets = {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 40 * GiB, 0)}
    result = plan(_gqa_spec("vllm"), budgets)
    held = sum(w.bytes for w in result.all_leases() if w.kind.value in ("weights", "kv"))
    fraction = result.params["gpu_memory_utilization"]
    # Only the start gate (free >= fraction x total): weights and KV of the total, never above the lease.
    assert fraction * 80 * GiB <= held < (fraction + 0.001) * 80 * GiB
    assert result.params["kv_cache_memory_bytes"] == 32768 * 57344
    assert result.params["max_model_len"] * result.params["max_num_seqs"] == 32768


def test_sglang_and_llamacpp_flags():
    budgets = {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 0, 0),
               "host": DeviceBudget("host", 64 * GiB, 64 * GiB, GiB, 0, 0)}
    sg = plan(_gqa_spec("sglang"), budgets).params
    assert sg["max_total_tokens"] == 32768 and 0 < sg["mem_fraction_static"] < 0.3
    ll = plan(_gqa_spec("llamacpp", cache_type_v="q8_0"), budgets)
    assert ll.params["ctx_size"] == 32768 and ll.params["n_gpu_layers"] == -1 and ll.params["flash_attn"] == "on"
    off = plan(_gqa_spec("llamacpp", cache_type_v="q8_0", flash_attn="off"), budgets)
    assert not off.fits and any("engine.flash_attn: a quantized V cache (q8_0) needs flash attention" in r
                                for r in off.reasons)


def test_concurrency_goal_divides_the_cache_by_the_context():
    from lessor.daemon.config.model_spec import ModelSpec
    spec = _gqa_spec("torch")
    spec = ModelSpec.model_validate({**spec.model_dump(), "plan": {"goal": "concurrency", "context_tokens": 4096,
                                                                   "max_kv_tokens": 32768}})
    result = plan(spec, {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 0, 0)})
    assert result.params == {"context_tokens": 4096, "max_batch_size": 8}


def test_configured_cache_below_the_minimum_says_what_would_fit():
    result = plan(kt_spec(cache_lens=2048), seed_budgets())
    assert not result.fits
    assert result.reasons[0].startswith("cache_lens gives 2048 KV tokens, below plan.min_kv_tokens 8192; raise it to ")
    raised = int(re.search(r"raise it to (\d+)", result.reasons[0]).group(1))
    assert plan(kt_spec(cache_lens=raised), seed_budgets()).fits  # the value it names fits


def _hinted_value(result, param):
    found = re.search(rf"lower {param} to (\d+)", " ".join(result.reasons))
    assert found, result.reasons
    return int(found.group(1))


GQA_BUDGETS = {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 40 * GiB, 0),
               "host": DeviceBudget("host", 64 * GiB, 64 * GiB, GiB, 0, 0)}


@pytest.mark.parametrize("kind,engine", [
    ("torch", {"context_tokens": 1_000_000, "max_batch_size": 64}),  # per sequence: context x batch
    ("vllm", {"max_model_len": 1_000_000, "max_num_seqs": 64}),  # per sequence, and one phase
    ("sglang", {"max_total_tokens": 64_000_000, "max_running_requests": 64}),  # one pool for every request
    ("llamacpp", {"ctx_size": 64_000_000, "parallel": 64}),  # one pool shared by the slots
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_kv_size_too_large_is_answered_with_one_that_fits_when_applied(kind, engine):
    """Issue 20: context_tokens=1000000 with max_batch_size=64 was told 'lower context_tokens to
    131072', which holds 64 x 131072 tokens and fails the same way. Every hint, applied, fits."""
    result = plan(_gqa_spec(kind, **engine), GQA_BUDGETS)
    assert not result.fits
    param = _gqa_spec(kind).engine.kv_param
    value = _hinted_value(result, param)
    again = plan(_gqa_spec(kind, **{**engine, param: value}), GQA_BUDGETS)
    assert again.fits, again.reasons


def test_a_cache_lens_too_large_for_ktransformers_is_answered_in_whole_pages():
    result = plan(kt_spec(cache_lens=262144), seed_budgets())
    value = _hinted_value(result, "cache_lens")
    assert value % 256 == 0 and plan(kt_spec(cache_lens=value), seed_budgets()).fits


def test_no_kv_size_fits_beside_the_batch_gives_no_value():
    """About 22 000 tokens fit, plan.min_kv_tokens asks 30 000: no value of context_tokens fits,
    so none is offered (the most that fits would be refused as too small)."""
    spec = _gqa_spec("torch", context_tokens=100_000, max_batch_size=64)
    spec = spec.model_copy(update={"plan": spec.plan.model_copy(update={"min_kv_tokens": 30_000})})
    budgets = {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 80 * GiB - GiB - 16 * GiB, 0)}
    result = plan(spec, budgets)
    assert not result.fits
    assert not re.search(r"lower context_tokens to \d", " ".join(result.reasons)), result.reasons
    assert "no context_tokens fits: free memory or lower max_batch_size" in result.reasons[0]


def test_ktransformers_config_file_agrees_with_the_planned_flags(tmp_path):
    import yaml

    from lessor.engines.ktransformers import write_engine_home
    params = plan(R1, seed_budgets()).params
    shipped = {"async_server": {"max_batch_size": 4, "sched_port": 56441}, "attn": {"page_size": 256, "chunk_size": 256},
               "model": {"type": "balance_serve", "cache_lens": 8192}, "log": {"level": "debug"}}
    env = write_engine_home(tmp_path / "r1", params, defaults=shipped)
    assert env == {"HOME": str(tmp_path / "r1")}
    written = yaml.safe_load((tmp_path / "r1" / ".ktransformers" / "config.yaml").read_text())
    assert written["async_server"] == {"max_batch_size": params["max_batch_size"], "sched_port": 56441}
    assert written["attn"] == {"page_size": 256, "chunk_size": 128}
    assert written["model"]["cache_lens"] == params["cache_lens"] and written["model"]["type"] == "balance_serve"
    assert written["log"] == {"level": "debug"}


def test_ktransformers_gpu_experts_are_planned_from_the_budget_and_the_kv_cache_from_what_is_left():
    box = load_config(Path(__file__).resolve().parents[2] / "examples" / "gpu-box.yaml")
    r1 = next(m for m in box.models if m.name == "deepseek-r1")
    r1 = r1.model_copy(update={"engine": r1.engine.model_copy(update={"kt_num_gpu_experts": None})})

    def planned(free_gib: int):
        budgets = {"gpu0": DeviceBudget("gpu0", free_gib * GiB, free_gib * GiB, 0, 0, 0),
                   "host": DeviceBudget("host", 1024 * GiB, 1024 * GiB, 0, 0, 0)}
        result = plan(r1, budgets)
        assert result.fits, result.reasons
        return result.params["kt_num_gpu_experts"], result

    small, at_small = planned(20)
    large, at_large = planned(40)
    assert 0 <= small < large <= 256, (small, large)
    # The experts leave the minimum KV cache in place, and the rest of the room goes to it.
    for result in (at_small, at_large):
        assert result.kv_tokens >= r1.plan.min_kv_tokens
    def gpu_weights(result):
        return sum(w.bytes for w in result.all_leases() if w.device == "gpu0" and w.kind.value == "weights")
    assert gpu_weights(at_large) > gpu_weights(at_small), "more GPU experts are more GPU weights"
    print(f"GPU experts per layer: {small} with 20 GiB free, {large} with 40 GiB")


# -- the plan of a loaded model (daemon/controller.py Controller.plan) ---------------------------

async def test_the_plan_of_a_loaded_model_is_its_reload_and_says_it_is_loaded(env):
    """Issue 20: a READY model's plan said 'does NOT fit': its own leases counted against it."""
    from ..support.configs import torch_model
    controller, _, _ = await env([torch_model("a", "12GiB", plan={"min_kv_tokens": 1024, "max_kv_tokens": 16384})])
    assert "loaded" not in controller.plan("a")
    await controller.load("a")  # 12 GiB of weights and 1 GiB of KV cache of the 15 GiB free
    result = controller.plan("a")
    assert result["fits"], result["reasons"]
    assert result["loaded"] is True and result["evictions"] == []
    assert sorted((c["device"], c["kind"], c["bytes"]) for c in result["current"]) == [
        ("gpu0", "kv", GiB), ("gpu0", "weights", 12 * GiB)]


async def test_a_local_plan_over_the_ledger_a_daemon_left_gives_the_same_answer(env, tmp_path):
    """`lessor plan --config` runs its own controller over the daemon's ledger: its records say
    unloaded, the ledger holds the model's leases; the answer is the daemon's."""
    from lessor.daemon.runtime import runtime

    from ..support.configs import sim_config, torch_model
    models = [torch_model("a", "12GiB", plan={"min_kv_tokens": 1024, "max_kv_tokens": 16384})]
    controller, _, _ = await env(models)
    await controller.load("a")
    daemon = controller.plan("a")
    async with runtime(sim_config(tmp_path, models), engines={}, reconcile=False) as local:
        assert local.model("a")["state"] == "unloaded" and local.leases("a")
        here = local.plan("a")
    assert here["fits"] and here["loaded"] and here["current"] == daemon["current"]
    assert {k: here[k] for k in ("fits", "kv_tokens", "leases", "reasons")} == \
        {k: daemon[k] for k in ("fits", "kv_tokens", "leases", "reasons")}
