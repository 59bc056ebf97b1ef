"""Figures that show the answer (issue 34, finding 6): a shortfall printed with the digits to see
it, and a KV size the engine rounds (ktransformers' cache_lens, to its page) rounded its way with a
line saying so, instead of refused."""

import re
from pathlib import Path

from lessor.daemon.config.schema import load_config
from lessor.daemon.planning.planner import plan, with_overrides
from lessor.daemon.units import GiB
from lessor.policies import DeviceBudget

R1 = load_config(Path(__file__).resolve().parents[2] / "examples" / "seed.yaml").model("deepseek-r1")
SEED = {"gpu0": DeviceBudget("gpu0", 24 * GiB, 24 * GiB, GiB, 8 * GiB, 0),
        "host": DeviceBudget("host", 512 * GiB, 512 * GiB, 8 * GiB, 0, 0)}


def test_a_shortfall_shows_both_figures_apart_and_the_gap():
    """Before: `needs 1.8 GiB per device, 1.8 GiB is left`."""
    result = plan(with_overrides(R1, {"cache_lens": 28160}), SEED)
    assert not result.fits
    said = re.search(r"needs ([\d.]+) MiB per device, ([\d.]+) MiB is left after the weights and workspace: "
                     r"([\d.]+) MiB short", result.reasons[0])
    assert said, result.reasons
    need, left, short = map(float, said.groups())
    assert need != left and abs(need - left - short) < 0.2 and short > 0


def test_cache_lens_off_the_page_is_rounded_down_as_the_scheduler_does_and_said():
    """Before: `engine.cache_lens: must be a multiple of 256 (page_size); got 28000, use 28160`."""
    result = plan(with_overrides(R1, {"cache_lens": 28000}), SEED)
    assert result.params["cache_lens"] == 27904 and result.kv_tokens == 27904  # 109 whole pages of 256
    assert any("engine.cache_lens 28000 is not a whole number of 256-token pages" in w and "holds 27904 tokens" in w
               for w in result.warnings), result.warnings
    whole = plan(with_overrides(R1, {"cache_lens": 27904}), SEED)
    assert whole.kv_tokens == 27904 and not any("whole number of" in w for w in whole.warnings)


def test_llamacpp_ctx_size_is_padded_up_as_llama_cpp_pads_it_and_said():
    """llama-context.cpp pads n_ctx to 256 cells, and each slot's share too: the lease holds the cells it makes."""
    from lessor.daemon.config.model_spec import ModelSpec

    spec = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf", "ctx_size": 35000,
                                                              "parallel": 4},
                                     "memory": {"weights": "1GiB", "kv_bytes_per_token": 8192}})
    result = plan(spec, {"gpu0": DeviceBudget("gpu0", 24 * GiB, 24 * GiB, GiB, 0, 0)})
    assert result.params["ctx_size"] == 35840 and result.kv_tokens == 35840  # 35072 / 4 = 8768 -> 8960 per slot
    assert any("engine.ctx_size 35000: llama.cpp pads the context up" in w and "holds 35840 cells" in w
               for w in result.warnings), result.warnings
