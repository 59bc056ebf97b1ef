"""Clients of a running lessord: its admin API (`Admin`, with its SSE stream and `wait_for` on
it), the router (`chat`, `post`, the official `openai` client) and /metrics."""

import json
import queue
import threading
import time
import urllib.error
import urllib.request

import openai

from .waiting import HANG_S


class Admin:
    def __init__(self, url: str, state) -> None:
        self.url, self.token = url, (state / "admin.token").read_text().strip()

    def call(self, method: str, path: str, body=None, timeout=HANG_S):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def load(self, name):
        return self.call("POST", f"/admin/v1/models/{name}", {"action": "load"})

    def model(self, name):
        return self.call("GET", f"/admin/v1/models/{name}")[1]

    def leases(self, name=None):
        return self.call("GET", "/admin/v1/leases" + (f"?model={name}" if name else ""))[1]

    def events(self) -> "queue.Queue[dict]":
        """Events from the SSE stream, read in a thread."""
        out: queue.Queue = queue.Queue()
        request = urllib.request.Request(self.url + "/admin/v1/events", headers={"Authorization": f"Bearer {self.token}"})
        stream = urllib.request.urlopen(request, timeout=HANG_S)

        def read():
            for line in stream:
                if line.startswith(b"data: "):
                    out.put(json.loads(line[6:]))
        threading.Thread(target=read, daemon=True).start()
        return out


def chat(endpoint: str, text: str, **extra) -> dict:
    body = {"model": "x", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    request = urllib.request.Request(endpoint + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HANG_S) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(events: queue.Queue, kind: str, timeout_s: float, **match) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind} event {match} within {timeout_s} s")
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            continue
        if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
            return event, time.monotonic()


def client(router_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, line_start: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=HANG_S) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
