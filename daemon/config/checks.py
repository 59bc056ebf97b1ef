"""Checks of a valid config against the box it runs on: what the schema cannot see. One set, run
by `lessor check-config`, by lessord's start and by every reload, with the same severities. A
model's files must exist (a built-in engine's safetensors with a header that fits in the file),
its engine's command must be found, and it must be able to fit its devices at all (capacity −
headroom, with nothing else on them); a config without models is said. Each finding names the
field it is about, in the config's own paths (`models[2].engine.model_path`).

The checks are pure over what they are given (the config, the devices' readings, how to look a
path or a command up); `review` runs them all against given devices (a running lessord's, on
reload); `check` against this machine: NVML's devices where a driver answers, else the config's
simulated ones (as `lessor plan --config` does). Where the devices are NVML's, this machine is the
box and every finding is an error; where they are simulated (the demo, the seed, a GPU box's
config checked on a laptop or in CI), what only the box can answer (files, commands) is a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ...engines import torch_weights
from ...engines.process import command_problem
from ...policies import DeviceBudget
from ..devices.budget import budgets as compute_budgets
from ..devices.probes import DeviceReading, SimProbe, gpu_id, make_probe
from ..planning.admission import never_fits
from .model_spec import ModelSpec
from .schema import LessorConfig


@dataclass(frozen=True)
class Finding:
    path: str  # the config field, as the config's validation errors name it
    reason: str
    error: bool = True  # False: a warning (exit status 0)

    def __str__(self) -> str:
        return f"{'error' if self.error else 'warning'}: {self.path}: {self.reason}"


def files(config: LessorConfig, exists: Callable[[str], bool] = os.path.exists) -> list[Finding]:
    """Every model's files: its model_path, and the other paths its engine reads (GGUF folder)."""
    found = []
    for i, spec in enumerate(config.models):
        for name in ("model_path", "gguf_path"):
            path = getattr(spec.engine, name, None)
            if path and not exists(path):
                found.append(Finding(f"models[{i}].engine.{name}", f"{path} does not exist"))
    return found


def weights(config: LessorConfig) -> list[Finding]:
    """The safetensors files of each model folder the built-in engine reads, as its reader checks
    them (a header inside the file): a 0-byte model.safetensors passed, and the engine's load then
    failed. Only the header is read; a file this process may not read is left to the engine."""
    found = []
    for i, spec in enumerate(config.models):
        folder = getattr(spec.engine, "model_path", None)
        if spec.engine.engine_kind() != "torch" or not folder or not os.path.isdir(folder):
            continue
        try:
            for shard in torch_weights.checkpoint_files(folder):
                torch_weights.read_header(shard)
        except torch_weights.CorruptCheckpoint as exc:
            found.append(Finding(f"models[{i}].engine.model_path", f"cannot be read as safetensors: {exc}"))
        except (torch_weights.NotLoadable, OSError):  # another format (transformers reads it), or another uid's file
            continue
    return found


def commands(config: LessorConfig, path: str) -> list[Finding]:
    """Every model's engine command, looked up on the PATH it would start with (its env's PATH, else `path`)."""
    found = []
    for i, spec in enumerate(config.models):
        argv, _ = spec.engine.version_query()
        problem = command_problem(argv[0], spec.engine.env.get("PATH", path))
        if problem:
            field = next((f for f in ("command", "binary") if f in type(spec.engine).model_fields), "kind")
            found.append(Finding(f"models[{i}].engine.{field}", problem.removeprefix("engine command ")))
    return found


def fits(config: LessorConfig, budgets: Mapping[str, DeviceBudget]) -> list[Finding]:
    """Every model that could never fit its devices, even alone on them (daemon/planning/admission.py never_fits)."""
    found = []
    for i, spec in enumerate(config.models):
        missing = [gpu_id(d) for d in spec.placement.devices if gpu_id(d) not in budgets]
        if missing:
            found.append(Finding(f"models[{i}].placement.devices", f"no device {', '.join(missing)} on this box "
                                 f"(devices: {', '.join(sorted(budgets))})"))
            continue
        too_large = never_fits(spec, budgets)
        if too_large is not None:
            found.append(Finding(f"models[{i}]", _never_fits_reason(spec, too_large)))
    return found


def _never_fits_reason(spec: ModelSpec, error) -> str:
    return error.message().removeprefix(f"model '{spec.name}' ")


def models(config: LessorConfig) -> list[Finding]:
    """A config without models is valid (an empty file is one), but serves nothing: said, not refused."""
    if config.models:
        return []
    return [Finding("models", "no models configured: lessord would start and serve nothing; list the models it may "
                              "load (see examples/)", error=False)]


@dataclass(frozen=True)
class Report:
    findings: list[Finding]
    devices: str  # what the fit was checked against, in words

    @property
    def errors(self) -> int:
        return sum(f.error for f in self.findings)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]


def review(config: LessorConfig, readings: Iterable[DeviceReading], simulated: bool,
           path: str | None = None) -> Report:
    """Every check, against these devices: check-config's, lessord's start's and every reload's.
    What only the box can answer (files, commands) is an error where this machine is the box (its
    devices are NVML's), a warning where the probe is simulated (a demo, CI, a laptop)."""
    readings = list(readings)
    local = files(config) + weights(config) + commands(config, path or os.environ.get("PATH", os.defpath))
    if simulated:
        local = [Finding(f.path, f"{f.reason} (a warning: the devices are simulated, so this machine is not taken "
                                 "for the box; on the box it is an error)", error=False) for f in local]
    found = local + models(config)
    if simulated and not config.devices.simulated:  # SimProbe's stand-in card is nobody's box: no fit to check
        return Report(found + [Finding("devices", "simulated devices (no NVIDIA driver here, or --sim) and no "
                                                  "devices.simulated: the fit of the models is not checked; run "
                                                  "check-config on the GPU box, or describe its cards there",
                                       error=False)], "no devices")
    names = ", ".join(f"{r.device} {r.name}" for r in readings if r.is_gpu)
    budgets = compute_budgets(readings, config.devices, {}, ())
    return Report(found + fits(config, budgets), f"{'simulated' if simulated else 'NVML'} devices: {names}")


def check(config: LessorConfig, force_sim: bool = False) -> Report:
    """review() against this machine: NVML's devices where a driver answers (unless `force_sim`,
    lessord's --sim), else the config's simulated ones."""
    try:
        probe = make_probe(config.devices, force_sim)
    except RuntimeError:  # devices.probe: nvml, and no driver here
        probe = make_probe(config.devices, force_sim=True)
    try:
        readings = probe.read()
        simulated = isinstance(probe, SimProbe)
    finally:
        probe.close()
    return review(config, readings, simulated)
