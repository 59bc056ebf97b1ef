"""Where things are: the repository, this venv's scripts, the fixture files, the stand-in engine."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # this venv's lessord and lessor
FIXTURES = ROOT / "tests" / "fixtures"  # models' HF config.json files
# An engine's server in a file of the standard library only (any python3 runs it): tests point a
# model's `command` (vllm kind) or `binary` (llamacpp kind) at it.
STANDIN = str(Path(__file__).resolve().parent / "standin_engine.py")
