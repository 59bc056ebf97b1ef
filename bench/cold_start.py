#!/usr/bin/env python3
"""Cold start through lessord: from a request for an unloaded model to its first token, broken
into lessor's own steps, the engine's, and the lag between the engine being ready and lessor
noticing it.

It generates a Qwen2 model of the qwen2.5-3b shape cut to a few layers (bf16, about 1.2 GB; no
download), starts a real `lessord` (simulated device) with it on the built-in torch engine, and
per round: unloads it, sends one streamed chat completion to the router (the model loads on
demand), reads the first token, then takes the load's timeline from the admin API (`last_load`:
lessord's marks and the engine's own phase stamps, one CLOCK_MONOTONIC for every process, so the
client's own stamps line up with both). Rounds run on a warm page cache (the first one reads the
files the generator just wrote); `--cold` adds a round after `echo 3 > /proc/sys/vm/drop_caches`
where the kernel allows it. The same request sent straight to the loaded engine, warm, shows what
of "load done to first token" is the engine's prefill rather than the router.

    .venv/bin/python -m bench.cold_start                 # --rounds 5 --layers 4 [--cold] [--engine vllm]

`--engine vllm` runs the same model on real vLLM (its CPU build, `make vllm`): it stamps nothing,
so its share is one step from spawn to its health answering.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `bench` from the repo root

from bench.router_overhead import spawn_lessord

ROOT = Path(__file__).resolve().parent.parent
NAME = "cold"
BODY = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hello, how are you today?"}],
                   "max_tokens": 4, "stream": True}).encode()
GOAL_LESSOR_S, GOAL_NOTICE_S = 0.020, 0.050  # issue 22: lessor's own steps, readiness noticed


def model_dir(cache: Path, layers: int) -> Path:
    path = cache / f"qwen2.5-3b-l{layers}"
    if not (path / "config.json").exists():
        print(f"cold start: writing a qwen2.5-3b-shaped model with {layers} layers to {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "lessor.engines.tiny_qwen", str(path), "--shape", "qwen2.5-3b",
                        "--layers", str(layers), "--dtype", "bfloat16"], check=True)
    return path


def engine_config(kind: str, model: Path, vllm: Path) -> dict:
    if kind == "torch":
        return {"kind": "torch", "model_path": str(model), "dtype": "bfloat16", "max_batch_size": 1,
                "context_tokens": 512}
    # vLLM's CPU build, as tests/engines/test_vllm.py runs it: eager (no graph capture on the CPU).
    return {"kind": "vllm", "model_path": str(model), "command": [str(vllm), "serve"], "enforce_eager": True,
            "dtype": "bfloat16", "max_num_batched_tokens": 1024}


def start_lessord(workdir: Path, model: Path, engine: dict) -> tuple[subprocess.Popen, str, int, str]:
    config = {"state_dir": str(workdir / "state"),
              "devices": {"probe": "sim", "simulated": [{"name": "sim", "total": "80GiB"}]},
              "models": [{"name": NAME, "engine": engine,
                          "architecture": {"hf_config": str(model / "config.json")},
                          "plan": {"min_kv_tokens": 512, "max_kv_tokens": 2048}, "keep_alive": -1}]}
    proc, url, router = spawn_lessord(workdir, config)
    return proc, url, router, (workdir / "state" / "admin.token").read_text().strip()


def admin_call(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def first_token(host: str, port: int) -> tuple[float, float]:
    """(sent, first token) on CLOCK_MONOTONIC: the first SSE chunk after the role chunk (random
    weights may decode a token to no printable text, so its content is not required)."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    sent = time.monotonic()
    conn.request("POST", "/v1/chat/completions", BODY, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the request failed ({response.status}): {response.read()[:500]!r}")
    first = None
    for line in response:
        if first is None and line.startswith(b"data: {") and "role" not in json.loads(line[6:])["choices"][0]["delta"]:
            first = time.monotonic()
    conn.close()
    if first is None:
        raise SystemExit("the stream carried no token")
    return sent, first


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def one_round(url: str, token: str, router: int) -> dict[str, float]:
    admin_call(url, token, "POST", f"/admin/v1/models/{NAME}", {"action": "unload"})
    sent, first = first_token("127.0.0.1", router)
    model = admin_call(url, token, "GET", f"/admin/v1/models/{NAME}")
    timeline = model["last_load"]
    marks = timeline["marks"]
    row = {"router, to the load's start": marks["requested"] - sent}
    row.update({s["step"]: s["seconds"] for s in timeline["steps"]})
    row["load done to first token"] = first - marks["done"]
    row["request to first token"] = first - sent
    endpoint = urllib.parse.urlsplit(model["endpoint"])
    direct_sent, direct_first = first_token(endpoint.hostname, endpoint.port)
    row["(the same request direct to the engine, warm)"] = direct_first - direct_sent
    return row


WHOSE = {"router, to the load's start": "lessor", "load done to first token": "router + engine",
         "request to first token": "", "(the same request direct to the engine, warm)": "engine"}


def report(rows: list[dict[str, float]], whose: dict[str, str], label: str) -> None:
    print(f"\n{label}: median of {len(rows)} round(s), milliseconds")
    print(f"{'step':<48} {'whose':<16} {'median':>10} {'min':>10} {'max':>10}")
    for step in rows[0]:
        values = [r[step] * 1e3 for r in rows]
        print(f"{step:<48} {whose.get(step, ''):<16} {statistics.median(values):>10.1f} {min(values):>10.1f} "
              f"{max(values):>10.1f}")
    lessor = [sum(v for k, v in r.items() if whose.get(k) == "lessor") for r in rows]
    notice = [sum(v for k, v in r.items() if whose.get(k) == "notice") for r in rows]
    measure = [sum(v for k, v in r.items() if whose.get(k) == "measure") for r in rows]
    print(f"lessor's own steps: {statistics.median(lessor) * 1e3:.1f} ms median (goal < {GOAL_LESSOR_S * 1e3:.0f} ms: "
          f"{'met' if max(lessor) < GOAL_LESSOR_S else 'not met'} in every round: max {max(lessor) * 1e3:.1f})")
    print(f"measuring (samples at each step, the check against the leases): {statistics.median(measure) * 1e3:.1f} ms "
          "median (on a GPU NVML reads it; on a simulated device the engine reads its own memory)")
    print(f"readiness noticed: {statistics.median(notice) * 1e3:.1f} ms median after the engine was ready "
          f"(goal < {GOAL_NOTICE_S * 1e3:.0f} ms: {'met' if max(notice) < GOAL_NOTICE_S else 'not met'}, "
          f"max {max(notice) * 1e3:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="layers of the qwen2.5-3b shape (4: about 1.2 GB)")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "bench", help="where the model is written once")
    parser.add_argument("--cold", action="store_true", help="one more round after dropping the page cache (root)")
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                        help="vllm: the real vLLM of `make vllm` (.venv-vllm), on the same model")
    parser.add_argument("--vllm", type=Path, default=ROOT / ".venv-vllm" / "bin" / "vllm")
    args = parser.parse_args()
    model = model_dir(args.cache, args.layers)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, router, token = start_lessord(Path(tmp), model, engine_config(args.engine, model, args.vllm))
        try:
            print(f"cold start: {model.name}, {size / 1e9:.2f} GB of safetensors, {args.engine} engine (bf16, CPU), "
                  f"lessord on a simulated device; {args.rounds} rounds", flush=True)
            rows = []
            whose: dict[str, str] = dict(WHOSE)
            for number in range(args.rounds):
                rows.append(one_round(url, token, router))
                steps = admin_call(url, token, "GET", f"/admin/v1/models/{NAME}")["last_load"]["steps"]
                whose.update({s["step"]: s["whose"] for s in steps})
                print(f"round {number + 1}: request to first token {rows[-1]['request to first token']:.2f} s", flush=True)
            report(rows, whose, "warm page cache")
            if args.cold:
                if drop_caches():
                    report([one_round(url, token, router)], whose, "cold page cache (after drop_caches)")
                else:
                    print("\ncold page cache: not measured (drop_caches refused here)")
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
