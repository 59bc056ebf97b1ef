"""An engine's `Launch`: what an adapter starts it with, built from the model's spec and plan, the
devices as the probe reads them now, and lessor's state folder (the engine's log, its working
folder, the marker by which a later lessord recognizes its processes). The load's attempt asks for
it once its leases are granted; the adoption asks for one to check a running engine against."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...engines.base import GpuTarget, Launch
from ..config.holder import ConfigHolder
from ..config.model_spec import ModelSpec
from ..devices.probes import gpu_id
from ..ledger.ledger import Ledger

OnExit = Callable[[int], None]  # the engine's return code, once its process is reaped


class Launcher:
    def __init__(self, config: ConfigHolder, ledger: Ledger, simulated: bool) -> None:
        self._config, self._ledger, self._simulated = config, ledger, simulated
        self.state_dir = Path(config.current.state_dir).absolute()

    def log_path(self, model: str) -> Path:
        return self.state_dir / "logs" / f"{model}.log"

    def launch(self, spec: ModelSpec, params: Mapping[str, Any], kv_tokens: int, port: int, attempt: str,
               on_exit: OnExit) -> Launch:
        """KeyError where a device of its placement is not in the probe's readings (no longer in the config)."""
        snapshot = self._ledger.snapshot()
        readings = snapshot.readings
        leased: dict[str, int] = {}
        for lease in snapshot.leases:
            if lease.model == spec.name:
                leased[lease.device] = leased.get(lease.device, 0) + lease.bytes
        return Launch(spec, params, kv_tokens,
                      tuple(GpuTarget(d, readings[d].index, readings[d].uuid, readings[d].total_bytes,
                                      readings[d].total_bytes - readings[d].used_bytes)
                            for d in (gpu_id(i) for i in spec.placement.devices)),
                      leased, self._simulated, port, self.log_path(spec.name), self.state_dir / "engines" / spec.name,
                      on_exit=on_exit, marker={"LESSOR_STATE_DIR": str(self.state_dir), "LESSOR_ATTEMPT": attempt},
                      withhold_env=tuple(k.key_env for k in self._config.current.router.api_keys if k.key_env))
