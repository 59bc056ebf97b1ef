#!/bin/sh
# torch for this machine, installed into a venv before lessor itself: the one rule, run by the
# Makefile's venv (`make demo`, `make setup`) and by `make install` (systemd/install.sh).
#   usage: sh systemd/torch.sh STEP PYTHON     (STEP: the caller's step label, e.g. "[2/4]")
# Without nvidia-smi this is a CPU machine: torch==2.13.0, which resolves to the local CPU build;
# left to lessor's dependencies pip would pick the newest torch, a CUDA build with 16 nvidia-*
# packages (5.7 GB) no CPU can use. With nvidia-smi the CUDA build comes with lessor's dependencies.
# TORCH_PIP_ARGS: more pip arguments for this step only (the tests: --dry-run).
set -eu
STEP=$1
PY=$2
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "==> $STEP torch: nvidia-smi found, the CUDA build comes with lessor's dependencies"
else
    echo "==> $STEP torch 2.13.0 (CPU build: no nvidia-smi on this machine)"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q ${TORCH_PIP_ARGS:-} torch==2.13.0
fi
