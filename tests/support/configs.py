"""Configs and model specs: a parsed config for lessord's parts in this process (`sim_config`,
`torch_model`), and lessor.yaml files for a real lessord (`config_file`) with models on the
tiny torch model (`torch_spec`) or the stand-in engine (`standin_spec`, `standin`). Devices are
simulated throughout."""

import sys
from pathlib import Path

import yaml

from lessor.daemon.config.schema import LessorConfig, parse_config

from .paths import STANDIN


def sim_config(tmp_path: Path, models: list[dict] | None = None, gpus: list[dict] | None = None,
               policy: str = "lru_idle", **extra) -> LessorConfig:
    data = {
        "state_dir": str(tmp_path / "state"),
        "devices": {"probe": "sim", "headroom": "1GiB",
                    "simulated": gpus or [{"name": "sim24", "total": "24GiB", "foreign": "8GiB"}],
                    "host": {"headroom": "4GiB", "simulated_total": "64GiB"}},
        "policy": {"name": policy},
        "models": models or [],
        **extra,
    }
    return parse_config(data)


def torch_model(name: str, weights: str = "4GiB", **extra) -> dict:
    """A torch-engine model whose engine is faked (its folder need not exist)."""
    return {"name": name, "engine": {"kind": "torch", "model_path": f"/models/{name}"},
            "memory": {"weights": weights, "kv_bytes_per_token": 65536, "load_peak": "1GiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 16384}, **extra}


def torch_spec(name: str, model_path, weights: str, **extra) -> dict:
    """A model on the real built-in torch engine (`model_path`: the tiny Qwen2 folder)."""
    return {"name": name, "engine": {"kind": "torch", "model_path": str(model_path), "dtype": "float32"},
            "memory": {"weights": weights, "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096, "max_batch_size": 2}, **extra}


def standin_spec(name: str, tmp_path: Path, ready_after_s: float = 0) -> dict:
    """A stand-in engine (vllm kind) that records how it was started in tmp_path/NAME.json."""
    folder = tmp_path / "models" / name  # a folder that exists: lessord's start checks model paths (a warning here)
    folder.mkdir(parents=True, exist_ok=True)
    return {"name": name, "engine": {"kind": "vllm", "model_path": str(folder), "command": [sys.executable, STANDIN],
                                     "env": {"LESSOR_STANDIN_READY_AFTER_S": str(ready_after_s),
                                             "LESSOR_STANDIN_RECORD": str(tmp_path / f"{name}.json")}},
            "memory": {"weights": "2GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096}, "restart": {"policy": "never"}}


def standin(name: str, tmp_path) -> dict:
    """An 8 GiB stand-in engine that counts its starts in tmp_path/NAME.starts."""
    return {"name": name, "engine": {"kind": "vllm", "model_path": f"/models/{name}", "command": [sys.executable, STANDIN],
                                     "env": {"LESSOR_STANDIN_STARTS": str(tmp_path / f"{name}.starts")}},
            "memory": {"weights": "8GiB", "kv_bytes_per_token": 8192, "load_peak": "256MiB"},
            "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 4096}, "restart": {"policy": "never"}}


def config_file(tmp_path: Path, models: list[dict], policy: str = "lru_idle", **extra) -> Path:
    """tmp_path/lessor.yaml: `models` on one simulated 8 GiB device (1 GiB foreign, 512 MiB headroom);
    `extra` sets or replaces top-level sections (devices included)."""
    config = {"state_dir": str(tmp_path / "state"), "policy": {"name": policy},
              "devices": {"probe": "sim", "headroom": "512MiB",
                          "simulated": [{"name": "sim8", "total": "8GiB", "foreign": "1GiB"}]},
              "models": models, **extra}
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# The end-to-end tests' name for it (they began with a copy whose `extra` could not replace devices;
# none of their calls passed devices, so one function serves both).
write_config = config_file
