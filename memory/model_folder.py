"""A model's shape read from where its engine reads the model: the config.json of an HF folder, or
the header of a GGUF file (the file itself, or the one GGUF in a folder, the first shard of a split
one). The spec's `architecture.hf_config` overrides it; memory/architecture.py and memory/gguf.py
read the two formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .architecture import read_hf_config
from .gguf import GgufError, architecture_fields, read_header


def _gguf_in(folder: Path) -> Path | None:
    files = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    firsts = [p for p in files if "-00001-of-" in p.name]  # llama.cpp's split files: the first holds the metadata
    candidates = firsts or files
    return candidates[0] if len(candidates) == 1 else None


def find_shape(model_path: str) -> tuple[Path, str] | None:
    """The file that says the model's shape at `model_path` and its kind ("config.json" or
    "gguf"); None where there is none (or several GGUFs to choose from)."""
    path = Path(model_path)
    try:
        if path.is_file():
            return (path, "gguf") if path.suffix == ".gguf" else None
        if path.is_dir():
            if (path / "config.json").is_file():
                return path / "config.json", "config.json"
            found = _gguf_in(path)
            return (found, "gguf") if found else None
    except OSError:  # unreadable: the checks and the engine say so
        return None
    return None


def read_shape(model_path: str) -> tuple[dict[str, Any], str] | None:
    """Architecture's fields read from `model_path`, and where they came from; None where it holds
    no shape. Raises ValueError (UnsupportedConfig, GgufError, a JSON error) or OSError naming what
    could not be read."""
    found = find_shape(model_path)
    if found is None:
        return None
    path, kind = found
    if kind == "config.json":
        return read_hf_config(path), f"{path} (engine.model_path's config.json)"
    try:
        meta, tensors = read_header(path)
    except GgufError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return architecture_fields(meta, tensors), f"{path} (engine.model_path's GGUF header)"
