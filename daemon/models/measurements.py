"""The supervisor's side of fingerprints: the key a load of a spec is measured under, the
fingerprint a plan uses (and those of other keys it shows), and remembering what an attempt
measured. The store (daemon/ledger/fingerprints.py) holds them; this module only reads the world to name
the key: the device names from the probe, the engine's version from its package."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ...engines.versions import engine_version
from ..config.model_spec import ModelSpec
from ..devices.probes import DeviceReading, gpu_id
from ..events import Event, FingerprintRecorded
from ..ledger.fingerprints import DeviceMeasurement, FingerprintKey, FingerprintStore, Outcome
from ..planning.planner import Measured

log = logging.getLogger("lessor.supervisor")


def memory_flags(spec: ModelSpec) -> dict[str, Any]:
    """Every setting that decides the engine's memory, flat ("engine.dtype"): the engine's
    arguments and what the spec says of the model. Environment values and extra arguments are
    digested: they decide memory (PYTORCH_CUDA_ALLOC_CONF, --gpu-memory-utilization) but may hold
    secrets, and the flags are listed without a token."""
    engine = spec.engine
    flags = {f"engine.{k}": v for k, v in engine.memory_flags().items() if k not in ("env", "extra_args")}
    flags |= {f"engine.env.{k}": _digest(v) for k, v in sorted(engine.env.items())}
    if engine.extra_args:
        flags["engine.extra_args"] = _digest("\0".join(engine.extra_args))
    flags |= {"quantization": spec.quantization, "kv_dtype": spec.kv_dtype, "placement.devices": len(spec.placement.devices),
              "placement.experts": spec.placement.experts, "plan.goal": spec.plan.goal,
              "plan.max_batch_size": spec.plan.max_batch_size if getattr(engine, engine.batch_param) is None else None}
    return flags


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


class Fingerprinting:
    def __init__(self, store: FingerprintStore, readings: Callable[[], Mapping[str, DeviceReading]],
                 margin: Callable[[], float], publish: Callable[[Event], None]) -> None:
        self.store, self._readings, self._margin, self._publish = store, readings, margin, publish
        self.warming: asyncio.Future | None = None  # the engines' versions asked at start (start_warming)

    def key(self, spec: ModelSpec, readings: Mapping[str, DeviceReading] | None = None) -> FingerprintKey:
        """The key a load of `spec` is measured under: model, engine kind and version, device names, flags.
        The version comes from a cache (`refresh` asks the engine's package again); `readings`
        name the devices (read from the probe when not given)."""
        readings = self._readings() if readings is None else readings
        devices = tuple(readings[d].name if d in readings else d for d in (gpu_id(i) for i in spec.placement.devices))
        version = engine_version(*spec.engine.version_query())[:256]  # the column's width, and the digest's input
        return FingerprintKey(spec.name, spec.engine.engine_kind(), version, devices, memory_flags(spec))

    async def refresh(self, spec: ModelSpec) -> None:
        """Ask the engine's version now, off the event loop, before a load plans (engines/versions.py
        says when that starts a subprocess and when the cache or a venv's metadata answers).
        A load that comes while lessord's start-up query still runs waits for it, not asking twice."""
        if self.warming is not None and not self.warming.done():
            await asyncio.wait({self.warming})
        await asyncio.to_thread(engine_version, *spec.engine.version_query(), True)

    def start_warming(self, specs) -> asyncio.Future:
        self.warming = asyncio.ensure_future(self.warm(specs))
        return self.warming

    async def warm(self, specs) -> None:
        """Every configured engine's version asked once at start, in the background: the first
        load then finds it cached, not a Python starting (40-100 ms) on its critical path."""
        queries = {(tuple(launcher), tuple(packages)) for launcher, packages in (s.engine.version_query() for s in specs)}
        for launcher, packages in sorted(queries):
            await asyncio.to_thread(engine_version, list(launcher), packages)

    def measured(self, key: FingerprintKey) -> Measured | None:
        """The fingerprint of this key, with the margin the config adds to it (None: none yet)."""
        found = self.store.get(key)
        return Measured(found, self._margin()) if found else None

    def use(self, key: FingerprintKey, measured: Measured | None) -> dict[str, Any]:
        """What a plan says of measurements: the one it used, and the others of this model it did not use, and why."""
        used = measured.fingerprint if measured else None
        return {"key": key.digest, "engine_version": key.engine_version, "devices": list(key.devices),
                "used": None if used is None or measured is None else {
                    "measured_at_s": used.measured_at_s, "outcome": used.outcome, "loads": used.loads,
                    "margin": measured.margin},
                "not_used": [{"key": other.digest, "measured_at_s": other.measured_at_s, "why": key.differences(other.key)}
                             for other in self.store.others(key)]}

    async def remember(self, key: FingerprintKey, measurements: tuple[DeviceMeasurement, ...], outcome: Outcome | str) -> None:
        """Record what a load measured. Never raises: the load's outcome matters more than its memory of it."""
        if not measurements:
            return
        try:
            stored = await self.store.record(key, measurements, outcome)
        except Exception as exc:  # LedgerUnavailable, or a bug: logged, and the load goes on
            log.warning("fingerprint of %s not recorded: %s", key.model, exc)
            return
        self._publish(FingerprintRecorded(key.model, stored.digest, outcome, stored.loads))
