"""A real lessord, as operators run it (simulated devices), on free loopback ports; and its end by
SIGKILL, as a crash or the OOM killer ends it."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from lessor.engines.process import free_port

from .paths import BIN
from .waiting import HANG_S


@contextmanager
def running_lessord(config_path: Path, *args: str, timeout_s: float = HANG_S, output: Path | None = None,
                    env: dict[str, str] | None = None, not_ready: bool = False):
    """lessord as operators run it (simulated devices), on free ports; yields (process, admin url, router url).
    `output`: a file for its stdout and stderr (a pipe nobody reads would block a chatty daemon).
    `not_ready`: yield once /readyz answers 503 for a reason other than the start (a pinned model failed)."""
    port, router_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}, **(env or {})}
    sink = open(output, "w") if output else subprocess.PIPE
    proc = subprocess.Popen([str(BIN / "lessord"), "--config", str(config_path), "--sim",
                             "--admin-listen", f"127.0.0.1:{port}", "--router-listen", f"127.0.0.1:{router_port}", *args],
                            stdout=sink, stderr=subprocess.STDOUT if output else subprocess.PIPE, text=True, env=env)
    if output:
        sink.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                if not_ready and not json.loads(exc.read()).get("reason", "").startswith("starting"):
                    break
                time.sleep(0.1)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(f"lessord did not start: {proc.communicate()}") from None
                time.sleep(0.1)
        yield proc, url, f"http://127.0.0.1:{router_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(HANG_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(HANG_S)
