"""bench/accuracy.py's bounds, pinned: every published measurement in ../shared/calibration
against the engine's memory model in lessor (what it predicts with the settings of that run)."""

import pytest

from bench import accuracy

ROWS = accuracy.all_rows()


def test_every_calibration_row_is_compared():
    assert len([r for r in ROWS if r.engine.startswith("vllm")]) == 30  # every row of vllm-h100-v0.19.csv
    assert {r.engine for r in ROWS} == {"vllm 0.19", "llama.cpp", "sglang", "ktransformers"}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.engine}: {r.case}")
def test_weights_and_kv_bytes_per_token_within_3_percent(row):
    for name in ("weights", "host", "kv", "kv_per_token"):
        if name in row.measured:
            assert abs(row.error(name)) <= 3, (name, row.error(name))


@pytest.mark.parametrize("row", [r for r in ROWS if r.engine.startswith("vllm")], ids=lambda r: r.case)
def test_vllm_total_per_gpu_never_under_by_3_percent_nor_over_by_15(row):
    assert -3 <= row.error("total") <= 15
    assert -3 <= row.error("non_kv") <= 15  # the part the model adds to the KV cache, alone


def test_the_seed_case_within_5_percent():
    (seed,) = [r for r in ROWS if r.engine == "ktransformers"]
    assert abs(seed.error("total")) <= 5


def test_the_table_writes_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- accuracy:start -->\nold\n<!-- accuracy:end -->\noutro\n")
    accuracy.write(readme, "new table")
    assert readme.read_text() == "intro\n<!-- accuracy:start -->\nnew table\n<!-- accuracy:end -->\noutro\n"


def test_the_calibration_copy_is_the_shared_one():
    shared = accuracy.SHARED / "vllm-h100-v0.19.csv"
    if not shared.exists():
        pytest.skip("no ../shared/calibration beside this clone")
    assert (accuracy.CALIBRATION / "vllm-h100-v0.19.csv").read_bytes() == shared.read_bytes()
