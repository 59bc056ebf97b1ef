"""bench/gpu_validate.py in --host mode, for real: generated models, a real lessord, real torch
engine processes, the foreign process, the sampler. It checks the figures the script reports are
there and consistent, never how long anything took."""

import json
import subprocess
import sys
from pathlib import Path

from ..support.paths import ROOT
from ..support.waiting import HANG_S


def run_host(tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_validate", "--host", "--out", str(tmp_path / "work"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def by_model(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["model"] == name)


def assert_measured(load: dict) -> None:
    components = {c["name"]: c for c in load["components"]}
    weights = components["weights"]
    assert weights["predicted_bytes"] > 0 and weights["measured_bytes"] > 0
    assert components["steady"]["measured_bytes"] > 0 and components["load peak"]["measured_bytes"] > 0


def test_host_mode_reports_every_figure(tmp_path):
    result, text = run_host(tmp_path)
    assert result["mode"] == "host" and result["scaled"] and "SCALED DOWN" in text
    capped = result["capped"]
    side = [r for r in capped["loads"] if r["step"] == "side by side"]
    qwen, deepseek = by_model(side, "qwen2.5-3b"), by_model(side, "deepseek-v2-lite")
    assert qwen["loaded"]
    assert_measured(qwen)
    assert by_model(capped["router"], "qwen2.5-3b")["status"] == 200
    ds_answers = [r for r in capped["router"] if r["model"] == "deepseek-v2-lite"]
    assert deepseek["loaded"] and ds_answers and all(r["status"] == 200 for r in ds_answers), (deepseek, ds_answers)
    assert_measured(deepseek)
    assert capped["eviction"]["kind"] == "policy"  # both in, a third cannot fit without evicting
    assert capped["eviction"]["evicted"]
    reload = next(r for r in capped["loads"] if r["step"] == "reload")
    assert reload["loaded"] and reload["model"] == capped["eviction"]["evicted"][0]

    big = result["uncapped"]["loads"][0]
    assert big["model"] == "qwen2.5-7b" and big["loaded"]
    assert_measured(big)
    assert result["uncapped"]["router"][0]["status"] == 200
    budget = result["budget"]
    assert budget["budget_bytes"] == budget["cap_bytes"] - budget["headroom_bytes"] - budget["foreign_bytes"]
    assert budget["engines_peak_bytes"] > 0 and result["bandwidth_bytes_per_s"] > 0
    assert capped["fingerprints"]["available"]
    assert {r["model"] for r in capped["fingerprints"]["rows"]} >= {"qwen2.5-3b", "deepseek-v2-lite"}
    assert "fingerprints (GET /admin/v1/fingerprints" in text
