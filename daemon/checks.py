"""Checks of a valid config against the box it runs on (`lessor check-config`): what the schema
cannot see. A model's files must exist, its engine's command must be found, and it must be able
to fit its devices at all (capacity − headroom, with nothing else on them). Each finding names
the field it is about, in the config's own paths (`models[2].engine.model_path`).

The checks are pure over what they are given (the config, the devices' budgets, how to look a
path or a command up); `check` wires them to this machine: NVML's devices where a driver answers,
else the config's simulated ones (as `lessor plan --config` does). Default: an operator checking
on the box itself, where every finding is an error. On a machine with no NVIDIA driver, for a
config that does not ask for the simulated probe (a GPU box's config checked on a laptop or in
CI), what only the box can answer (files, commands) is a warning: not wrong for its box.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

from ..engines.process import command_problem
from ..policies import DeviceBudget
from .admission import never_fits
from .budget import budgets as compute_budgets
from .config import LessorConfig, ModelSpec
from .devices import SimProbe, gpu_id, make_probe


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
    """Every model that could never fit its devices, even alone on them (daemon/admission.py never_fits)."""
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


@dataclass(frozen=True)
class Report:
    findings: list[Finding]
    devices: str  # what the fit was checked against, in words

    @property
    def errors(self) -> int:
        return sum(f.error for f in self.findings)


def check(config: LessorConfig) -> Report:
    """Every check, against this machine's devices."""
    try:
        probe = make_probe(config.devices)
    except RuntimeError:  # devices.probe: nvml, and no driver here
        probe = make_probe(config.devices, force_sim=True)
    try:
        readings = probe.read()
        simulated = isinstance(probe, SimProbe)
    finally:
        probe.close()
    local = files(config) + commands(config, os.environ.get("PATH", os.defpath))
    if simulated and config.devices.probe != "sim":  # no NVIDIA driver: most likely not the box the config is for
        local = [Finding(f.path, f"{f.reason} (a warning here: no NVIDIA driver on this machine, so it may not be "
                                 "the box the config is for; there it is an error)", error=False) for f in local]
        if not config.devices.simulated:
            return Report(local + [Finding("devices", "no NVIDIA driver here and no devices.simulated: the fit of the "
                                                      "models is not checked; run check-config on the GPU box",
                                           error=False)], "no devices")
    names = ", ".join(f"{r.device} {r.name}" for r in readings if r.is_gpu)
    budgets = compute_budgets(readings, config.devices, {}, ())
    return Report(local + fits(config, budgets), f"{'simulated' if simulated else 'NVML'} devices: {names}")
