"""The mission's box (examples/gpu-box*.yaml): both files are accepted by `lessor check-config`,
and `lessor plan --sim` fits each model, the two together within the 24 GiB card."""

import json
import os
import subprocess
import sys

import pytest

from ..support.paths import ROOT

GiB = 1 << 30


def lessor(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT.parent))}
    return subprocess.run([sys.executable, "-m", "lessor.api.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


@pytest.mark.parametrize("example", ["gpu-box.yaml", "gpu-box-legacy.yaml"])
def test_the_gpu_box_is_accepted_and_both_models_fit_together(example):
    path = str(ROOT / "examples" / example)
    checked = lessor("check-config", path)
    assert checked.returncode == 0 and "OK (2 model(s)" in checked.stdout, checked.stdout + checked.stderr
    peaks = {}
    for model in ("qwen2.5-7b", "deepseek-r1"):
        run = lessor("plan", model, "--config", path, "--sim", "--json")
        assert run.returncode == 0, run.stdout + run.stderr
        plan = json.loads(run.stdout)
        assert plan["fits"] and plan["reasons"] == [], plan["reasons"]
        peaks[model] = plan["peak_bytes"]["gpu0"]
    assert peaks["qwen2.5-7b"] <= 8 * GiB
    assert sum(peaks.values()) <= 24 * GiB - 512 * (1 << 20)  # the card less its headroom
