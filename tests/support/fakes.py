"""A fake engine at the process boundary, the only place (besides the simulated probe) where tests
fake: `FakeEngines` is an engine factory for `runtime(engines=...)`; its `FakeAdapter` starts
`FakeHandle`s that report their usage to the simulated probe as NVML would and load as the test
says (a gate, a delay, a failure at a named step)."""

import asyncio
import time


class FakeProcess:
    """What the supervisor reads of an engine's process: its exit status (None: running) and log."""

    returncode: int | None = None
    log: list[str] = []

    def tail(self, lines: int = 50) -> list[str]:
        return self.log[-lines:]


class FakeHandle:
    """Stands in for an engine process: reports its usage to the simulated probe like NVML would."""

    def __init__(self, adapter: "FakeAdapter", spec, params, kv_tokens: int, pid: int) -> None:
        self.adapter, self.spec, self.params, self.pid = adapter, spec, params, pid
        self.identity = f"fake:{pid}"  # never a live process's identity: a restart finds it gone
        self.started_at = time.time()
        self.base_url = adapter.base_url or f"http://127.0.0.1:{pid % 50000 + 10000}"
        self.kv_tokens = None
        self.stopped = False
        self.engine_times: dict[str, float] = {}
        self.process = FakeProcess()

    def _use(self, nbytes: int) -> None:
        self.adapter.probe.set_process_usage("gpu0", self.pid, nbytes)

    async def wait_weights_loaded(self, timeout_s: float) -> None:
        adapter = self.adapter
        adapter.loading += 1
        adapter.max_loading = max(adapter.max_loading, adapter.loading)
        try:
            self._use(self.spec.profile().weights + self.spec.profile().load_peak)
            adapter.seen.append(("weights", self.spec.name, adapter.ledger.snapshot()))
            if adapter.gate is not None:  # the test decides when the weights are in
                await adapter.gate.wait()
            else:
                await asyncio.sleep(adapter.load_delay_s)
            if adapter.during_weights:
                adapter.during_weights(self)
            if adapter.fail_at == "weights":
                raise RuntimeError("engine exited with code 1 while loading weights")
            self._use(self.spec.profile().weights)
        finally:
            adapter.loading -= 1

    async def allocate_kv(self, kv) -> None:
        kv_tokens, kv_bytes = kv.tokens, kv.bytes
        self.kv_tokens = kv_tokens
        self.adapter.seen.append(("kv", self.spec.name, self.adapter.ledger.snapshot()))
        if self.adapter.fail_at == "kv":
            raise RuntimeError("CUDA out of memory while allocating the KV cache")
        self._use(self.spec.profile().weights + kv_bytes)

    async def wait_ready(self, timeout_s: float) -> None:
        if self.adapter.fail_at == "ready":
            raise TimeoutError(f"not ready after {timeout_s} s")

    async def measure(self) -> dict[str, int]:
        self.adapter.measures += 1  # each sample of the load asks: a test can wait for one
        return dict(self.adapter.measured)

    async def stop(self, grace_s: float) -> None:
        self.stopped = True
        self._use(0)
        if self.adapter.on_stop:
            self.adapter.on_stop(self)


class FakeAdapter:
    kind = "torch"
    two_phase = True

    def __init__(self, probe, ledger=None) -> None:
        self.probe, self.ledger = probe, ledger
        self.fail_at: str | None = None
        self.during_weights = None
        self.on_stop = None  # called with the handle once its engine stopped
        self.gate: asyncio.Event | None = None  # set: loads wait for it instead of load_delay_s
        self.loading = self.max_loading = 0
        self.load_delay_s = 0.01
        self.seen: list = []
        self.handles: list[FakeHandle] = []
        self.measured: dict[str, int] = {}
        self.measures = 0
        self.launches: list = []
        self.base_url: str | None = None  # where handles say they serve (a stand-in upstream in router tests)

    async def start(self, launch):
        spec, params, kv_tokens = launch.spec, launch.params, launch.kv_tokens
        self.launches.append(launch)
        if self.fail_at == "start":
            raise FileNotFoundError(f"{spec.engine.model_path}: no such model folder")
        handle = FakeHandle(self, spec, params, kv_tokens, pid=900000 + len(self.handles))
        self.handles.append(handle)
        return handle


class FakeEngines:
    """An engine factory for `runtime(engines=...)`: one fake adapter (of `kind`) for the torch
    engine, made over the runtime's own probe and ledger; `.adapter` once the runtime is up."""

    def __init__(self, kind: type = None) -> None:
        self.kind = kind or FakeAdapter
        self.adapter = None

    def __call__(self, probe, ledger) -> dict:
        self.adapter = self.kind(probe, ledger)
        return {"torch": self.adapter, "vllm": self.adapter}  # vllm: a one-phase spec (the plan differs, not the fake)
