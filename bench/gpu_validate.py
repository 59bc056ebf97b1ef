"""One command that checks lessor's memory model and load protocol on a real card, side by side in
one run: lessor capped to 24 GiB of GPU 0, a foreign torch process holding 8 GiB (the seed's
qwen2.5-7b), a Qwen2.5-3B-shaped and a DeepSeek-V2-Lite-shaped (MLA, layers cut to fit) model
with random bf16 weights loaded through lessord side by side, NVML sampled every 50 ms; predicted
against measured per component, the peak against the budget, each load's time against the
host-to-device bandwidth of the same run, an eviction and a reload, one chat request through the
router to each model; then, uncapped, a full-size Qwen2.5-7B-shaped model.

    python -m bench.gpu_validate [--out var/gpu-validate] [--json FILE]
    python -m bench.gpu_validate --host     # the CPU: the torch engine on the host, scaled down

`--host` runs the same steps with lessord's simulated devices: the torch engine on the CPU, the
shapes cut (fewer layers, a smaller vocabulary), the budget and the foreign process scaled to
them, PSS per engine process group instead of NVML. CI runs it (tests/system/test_gpu_validate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `bench` from the repo root

from bench.gpu_report import compare, render
from bench.gpu_sampling import HANG_S, Sampler, steady
from lessor.daemon.config.schema import parse_config
from lessor.engines.process import free_port
from lessor.engines.tiny_qwen import SHAPES
from lessor.memory.architecture import from_hf_config

GiB, MiB = 1 << 30, 1 << 20
A, B, E, BIG = "qwen2.5-3b", "deepseek-v2-lite", "qwen2.5-3b-b", "qwen2.5-7b"


@dataclass(frozen=True)
class Shape:
    shape: str  # a key of tiny_qwen.SHAPES
    layers: int | None = None
    vocab: int | None = None

    def args(self) -> list[str]:
        return ["--shape", self.shape, *(["--layers", str(self.layers)] if self.layers else []),
                *(["--vocab", str(self.vocab)] if self.vocab else [])]

    def folder(self) -> str:
        return f"{self.shape}-l{self.layers or 'all'}-v{self.vocab or 'all'}"

    def architecture(self) -> dict:
        family, keys = SHAPES[self.shape]
        cut = {**keys, **({"num_hidden_layers": self.layers} if self.layers else {}),
               **({"vocab_size": self.vocab} if self.vocab else {})}
        return from_hf_config({"model_type": family, **cut})


@dataclass
class Setup:
    host: bool
    shapes: dict[str, Shape]  # the capped phase's models: A, B (E loads A's folder under another name)
    big: Shape
    headroom_bytes: int
    foreign_bytes: int
    cap_bytes: int = 0  # lessor's capacity of the card (set once the models' needs are known)
    kv_tokens: int = 4096
    notes: list[str] = field(default_factory=list)


def gpu_setup() -> Setup:
    setup = Setup(False, {A: Shape("qwen2.5-3b"), B: Shape("deepseek-v2-lite")}, Shape("qwen2.5-7b"),
                  headroom_bytes=1 * GiB, foreign_bytes=8 * GiB, cap_bytes=24 * GiB)
    budget = setup.cap_bytes - setup.headroom_bytes - setup.foreign_bytes
    layers = max((n for n in range(2, 28) if need(setup, A, Shape("qwen2.5-3b")) + need(setup, B, Shape(
        "deepseek-v2-lite", n)) <= budget), default=2)
    setup.shapes[B] = Shape("deepseek-v2-lite", layers)
    setup.notes.append(f"DeepSeek-V2-Lite cut to {layers} of 27 layers: the most the memory model fits beside "
                       f"Qwen2.5-3B in {budget / GiB:.1f} GiB (24 GiB cap - 8 GiB foreign - 1 GiB headroom)")
    return setup


def host_setup() -> Setup:
    """Shapes cut so the run takes a few GB of RAM and a couple of minutes on 2 cores; the card is
    sized so that both fit and a second Qwen2.5-3B does not (as 24 GiB does on the GPU)."""
    setup = Setup(True, {A: Shape("qwen2.5-3b", 2, 8192), B: Shape("deepseek-v2-lite", 2, 4096)},
                  Shape("qwen2.5-7b", 1, 8192), headroom_bytes=64 * MiB, foreign_bytes=8 * GiB // 24,
                  kv_tokens=512)
    a, b = need(setup, A, setup.shapes[A]), need(setup, B, setup.shapes[B])
    setup.cap_bytes = setup.headroom_bytes + setup.foreign_bytes + a + b + a // 2
    setup.notes += ["--host: SCALED DOWN. The torch engine runs on the CPU under lessord's simulated GPU; "
                    "measured = anonymous PSS of each engine's process group (what it holds itself: no shared "
                    "libraries, no page cache); shapes cut: "
                    + ", ".join(f"{n} {s.layers} layer(s), vocab {s.vocab}" for n, s in
                                {**setup.shapes, BIG: setup.big}.items()),
                    f"--host: foreign process holds {setup.foreign_bytes / MiB:.0f} MiB of RAM (8 GiB / 24); "
                    f"lessor's card capped to {setup.cap_bytes / MiB:.0f} MiB: both models fit, a second "
                    "Qwen2.5-3B does not",
                    "--host: the engine copies its weights out of the mapped safetensors file (the page cache "
                    "is not counted, the copy is); load times include the engine process's start and imports"]
    return setup


def model_spec(setup: Setup, name: str, path: Path | None, shape: Shape) -> dict:
    arch = {"hf_config": str(path / "config.json")} if path else shape.architecture()
    return {"name": name, "engine": {"kind": "torch", "model_path": str(path or "/nonexistent"), "dtype": "bfloat16",
                                     "threads": max(1, (os.cpu_count() or 1) // 2)},
            "architecture": arch, "keep_alive": -1, "restart": {"policy": "never"},
            "plan": {"min_kv_tokens": 16, "max_kv_tokens": setup.kv_tokens, "max_batch_size": 1}}


def need(setup: Setup, name: str, shape: Shape) -> int:
    """Bytes the memory model says the model holds once ready (weights, workspace, the KV cache)."""
    memory = parse_config({"models": [model_spec(setup, name, None, shape)]}).models[0].profile()
    return memory.weights + memory.activation + int(memory.kv_bytes_per_token * setup.kv_tokens)


def lessord_config(setup: Setup, out: Path, paths: dict[str, Path], capped: bool, phase: str) -> Path:
    shapes = {**setup.shapes, E: setup.shapes[A]} if capped else {BIG: setup.big}
    models = [model_spec(setup, name, paths[s.folder()], s) for name, s in shapes.items()]
    devices: dict = {"probe": "sim" if setup.host else "nvml", "headroom": setup.headroom_bytes}
    if capped:
        devices["gpus"] = [{"index": 0, "capacity": setup.cap_bytes}]
    if setup.host:
        total = setup.cap_bytes if capped else 64 * GiB
        devices["simulated"] = [{"name": "host stand-in (CPU engine)", "total": total}]
    state = out / f"state-{phase}"
    shutil.rmtree(state, ignore_errors=True)  # each run measures afresh (the generated models are kept)
    config = {"state_dir": str(state), "devices": devices, "policy": {"name": "lru_idle"},
              "timeouts": {"weights": "20m", "ready": "10m"}, "reconciler": {"interval": "1s"}, "models": models}
    path = out / f"lessor-{phase}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def generate(shapes: list[Shape], out: Path) -> dict[str, Path]:
    """Each model folder, written once (a stamp says which arguments wrote it)."""
    paths = {}
    for shape in shapes:
        folder = out / "models" / shape.folder()
        stamp = folder / "written-by.json"
        if not stamp.exists():
            subprocess.run([sys.executable, "-m", "lessor.engines.tiny_qwen", str(folder), *shape.args()], check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
            stamp.write_text(json.dumps(shape.args()))
        paths[shape.folder()] = folder
    return paths


# -- processes ------------------------------------------------------------------------------------

@contextmanager
def foreign_process(setup: Setup):
    """The process lessor does not manage; yields its report (pid, bytes held, copy bandwidth)."""
    device = "cpu" if setup.host else "cuda:0"
    copy_bytes = 256 * MiB if setup.host else 1 * GiB
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gpu_sampling.py")),
                             "--hold", str(setup.foreign_bytes), "--device", device, "--copy-bytes", str(copy_bytes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None  # both PIPE
    try:
        line = proc.stdout.readline()  # printed once it holds its bytes
        if not line:
            raise RuntimeError(f"the foreign process exited with {proc.wait()} before holding its memory")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        proc.wait(HANG_S)


class Daemon:
    """A running lessord and its two HTTP faces."""

    def __init__(self, proc: subprocess.Popen, admin: str, router: str, token: str, host: bool) -> None:
        self.proc, self.admin, self.router, self.token, self.host = proc, admin, router, token, host

    def call(self, method: str, url: str, body=None, auth: bool = True) -> tuple[int, Any]:  # Any: the JSON answer
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"} if auth else {})}
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=HANG_S) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def api(self, method: str, path: str, body=None) -> tuple[int, Any]:
        return self.call(method, self.admin + path, body)


@contextmanager
def lessord(config: Path, setup: Setup, log: Path):
    port, router_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "lessor.api.service", "--config", str(config),
                                 *(["--sim"] if setup.host else []), "--admin-listen", f"127.0.0.1:{port}",
                                 "--router-listen", f"127.0.0.1:{router_port}", "--log-level", "INFO"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    admin = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, admin, log)
        token = (Path(yaml.safe_load(config.read_text())["state_dir"]) / "admin.token").read_text().strip()
        yield Daemon(proc, admin, f"http://127.0.0.1:{router_port}", token, setup.host)
    finally:
        proc.terminate()
        proc.wait(HANG_S)


def _wait_ready(proc: subprocess.Popen, admin: str, log: Path) -> None:
    """Until /readyz answers 200 (or lessord exits): each try blocks on the socket for up to a second."""
    deadline = time.monotonic() + HANG_S
    while True:
        try:
            with urllib.request.urlopen(f"{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lessord did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.1)


# -- the steps --------------------------------------------------------------------------------------

def load(daemon: Daemon, sampler: Sampler, name: str, step: str, bandwidth: float) -> dict:
    """One admin load: the plan before it, its time, the peak sampled during it and the steady value after."""
    _, plan = daemon.api("POST", "/admin/v1/plan", {"model": name})
    before = {m["name"]: m["state"] for m in daemon.api("GET", "/admin/v1/models")[1]}
    t0 = time.monotonic()
    status, model = daemon.api("POST", f"/admin/v1/models/{name}", {"action": "load"})
    t1 = time.monotonic()
    after = {m["name"]: m["state"] for m in daemon.api("GET", "/admin/v1/models")[1]}
    row = {"model": name, "step": step, "status": status, "loaded": status == 200, "load_s": t1 - t0,
           "plan": plan, "evicted": sorted(n for n, s in before.items() if s == "ready" and after[n] != "ready"),
           "planned_evictions": plan.get("evictions", []) if isinstance(plan, dict) else []}
    if status != 200:
        _, tail = daemon.api("GET", f"/admin/v1/models/{name}/log?lines=15")
        row["error"] = (model.get("error") or {}).get("message", str(model)) if isinstance(model, dict) else str(model)
        row["engine_log"] = tail if isinstance(tail, str) else ""
        return row
    settled = sampler.wait_samples(5)
    _, engine_state = daemon.call("GET", model["endpoint"] + "/lessor/v1/state", auth=False)
    row.update(leased=model["leased_bytes"], params=model["params"], engine=engine_state,
               steady_bytes=steady(settled, name),
               peak_bytes=max((s.engines.get(name, 0) for s in sampler.between(t0, t1)), default=0))
    row["expected_load_s"] = engine_state["weights_tensor_bytes"] / bandwidth
    row["components"] = compare(row, "PSS" if daemon.host else "NVML")
    return row


def chat(daemon: Daemon, name: str) -> dict:
    body = {"model": name, "messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 8,
            "temperature": 0, "seed": 1}
    t0 = time.monotonic()
    status, answer = daemon.call("POST", daemon.router + "/v1/chat/completions", body, auth=False)
    row = {"model": name, "status": status, "seconds": time.monotonic() - t0}
    if status == 200:
        row.update(completion_tokens=answer["usage"]["completion_tokens"], text=answer["choices"][0]["message"]["content"])
    else:
        _, tail = daemon.api("GET", f"/admin/v1/models/{name}/log?lines=200")
        errors = [line for line in str(tail).splitlines() if "Error" in line or "error" in line]
        row["error"] = (errors[-1] if errors else str(answer))[:400]
    return row


def fingerprints(daemon: Daemon, names: list[str]) -> dict:
    status, body = daemon.api("GET", "/admin/v1/fingerprints")
    rows = [r for r in body if isinstance(r, dict) and r.get("model") in names] if isinstance(body, list) else []
    return {"available": status == 200, "status": status, "rows": rows}


def capped_phase(daemon: Daemon, sampler: Sampler, bandwidth: float) -> dict:
    loads = [load(daemon, sampler, name, "side by side", bandwidth) for name in (A, B)]
    # Requests to the larger model first: lru_idle then evicts it for E, the same model either way.
    order = sorted((A, B), key=lambda n: -next(r.get("steady_bytes", 0) for r in loads if r["model"] == n))
    loaded = {r["model"] for r in loads if r["loaded"]}
    router = [chat(daemon, name) if name in loaded else {"model": name, "status": None, "skipped": "it did not load"}
              for name in order]
    evicting = load(daemon, sampler, E, "eviction", bandwidth)
    eviction = {"by": E, "kind": "policy", "evicted": evicting["evicted"]}
    if not evicting["evicted"]:  # it fit (a model failed to load): make room by hand instead
        daemon.api("POST", f"/admin/v1/models/{A}", {"action": "unload"})
        eviction = {"by": E, "kind": "unload", "evicted": [A],
                    "why": "it fit beside what was loaded, so nothing had to be evicted; unloaded by hand"}
    reload = load(daemon, sampler, eviction["evicted"][0], "reload", bandwidth)
    router.append(chat(daemon, reload["model"]))
    return {"loads": [*loads, evicting, reload], "router": router, "eviction": eviction,
            "fingerprints": fingerprints(daemon, [A, B, E]),
            "devices": daemon.api("GET", "/admin/v1/devices")[1]}


def run_phase(setup: Setup, out: Path, paths: dict, foreign: dict, capped: bool) -> tuple[dict, list]:
    phase = "capped" if capped else "uncapped"
    config = lessord_config(setup, out, paths, capped, phase)
    with lessord(config, setup, out / f"lessord-{phase}.log") as daemon:
        if setup.host:  # the simulated probe learns foreign usage as an operator's what-if
            daemon.api("PUT", "/admin/v1/devices/gpu0/foreign", {"foreign_bytes": foreign["held_bytes"]})
        sampler = Sampler(daemon.proc.pid, foreign["pid"], None if setup.host else 0)
        sampler.start()
        try:
            if capped:
                result = capped_phase(daemon, sampler, foreign["bandwidth_bytes_per_s"])
            else:
                result = {"loads": [load(daemon, sampler, BIG, "uncapped", foreign["bandwidth_bytes_per_s"])]}
                result["router"] = [chat(daemon, BIG)]
        finally:
            sampler.stop()
    return result, sampler.samples


def budget_figures(setup: Setup, samples: list, foreign: dict) -> dict:
    budget = setup.cap_bytes - setup.headroom_bytes - foreign["held_bytes"]
    engines_peak = max((sum(s.engines.values()) for s in samples), default=0)
    used_peak = max((s.device_used for s in samples), default=0)
    return {"cap_bytes": setup.cap_bytes, "headroom_bytes": setup.headroom_bytes, "foreign_bytes": foreign["held_bytes"],
            "budget_bytes": budget, "engines_peak_bytes": engines_peak, "device_used_peak_bytes": used_peak,
            "foreign_measured_peak_bytes": max((s.foreign for s in samples), default=0), "samples": len(samples)}


def validate(setup: Setup, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = generate([*setup.shapes.values(), setup.big], out)
    with foreign_process(setup) as foreign:
        capped, samples = run_phase(setup, out, paths, foreign, capped=True)
        uncapped, _ = run_phase(setup, out, paths, foreign, capped=False)
    return {"mode": "host" if setup.host else "gpu", "scaled": setup.host, "notes": setup.notes,
            "bandwidth_bytes_per_s": foreign["bandwidth_bytes_per_s"], "budget": budget_figures(setup, samples, foreign),
            "shapes": {n: s.args() for n, s in {**setup.shapes, BIG: setup.big}.items()},
            "capped": capped, "uncapped": uncapped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="store_true", help="run on the CPU: simulated card, scaled-down shapes")
    parser.add_argument("--out", type=Path, default=Path("var/gpu-validate"), help="models, configs, logs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    setup = host_setup() if args.host else gpu_setup()
    result = validate(setup, args.out.absolute())
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
