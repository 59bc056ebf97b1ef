"""The built-in engine's server on its own (engines/torch_server.py, a real process on the tiny Qwen2
model): streams always end with a finish reason and [DONE], or with an error event and [DONE];
every client mistake is a 400 in OpenAI's envelope naming the field, logged in one line; a model
folder it cannot read stops it at start with one line naming the path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from lessor.engines.process import free_port

from ..support.waiting import HANG_S


class Engine:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, bytes]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=HANG_S) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=HANG_S) as r:
            return json.loads(r.read())

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextmanager
def engine_process(model: Path, tmp_path: Path, *args: str, batch: int = 4):
    """The engine as lessor runs it, taken through both phases (weights, then a KV cache)."""
    port, log = free_port(), tmp_path / f"engine-{len(list(tmp_path.glob('engine-*')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lessor.engines.torch_server", "--model-path", str(model),
                                 "--port", str(port), "--dtype", "float32", "--served-model-name", "t", *args],
                                stdout=out, stderr=subprocess.STDOUT)
    engine = Engine(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + HANG_S
        while True:  # polls only as a guard against a hang: each answer says whether it is there yet
            try:
                if engine.get("/lessor/v1/state")["phase"] == "weights_loaded":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status, raw = engine.post("/lessor/v1/kv", {"context_tokens": 256, "max_batch_size": batch})
        assert status == 200, raw
        yield engine
    finally:
        proc.terminate()
        proc.wait(HANG_S)


@pytest.fixture(scope="module")
def engine(tiny_qwen, tmp_path_factory):
    with engine_process(tiny_qwen, tmp_path_factory.mktemp("engine")) as running:
        yield running


def events(raw: bytes) -> list:
    """An SSE answer's data events, parsed ([DONE] as the string)."""
    data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def chat(text: str = "Hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **extra}


def test_every_stream_ends_with_a_finish_reason_and_done_even_side_by_side(engine):
    # Each request's steps hop between worker threads; the inference mode they need is per thread.
    def stream(i: int) -> list:
        status, raw = engine.post("/v1/chat/completions", chat(f"Tell me {i}", stream=True, ignore_eos=True,
                                                               seed=i, max_tokens=12 + i % 5))
        assert status == 200, raw
        return events(raw)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(stream, range(16)))
    for i, answer in enumerate(answers):
        assert answer[-1] == "[DONE]", answer
        assert not any("error" in e for e in answer[:-1]), answer
        assert answer[-2]["choices"][0]["finish_reason"] == "length"
        assert answer[-2]["usage"]["completion_tokens"] == 12 + i % 5
    for _ in range(3):  # and one after the other, on whichever thread is free
        answer = events(engine.post("/v1/completions", {"prompt": "The quick", "max_tokens": 6, "stream": True,
                                                        "ignore_eos": True})[1])
        assert answer[-1] == "[DONE]" and answer[-2]["choices"][0]["finish_reason"] == "length"
    assert engine.get("/lessor/v1/state")["requests_in_flight"] == 0


def test_each_decode_step_runs_in_inference_mode_whatever_thread_runs_it(tiny_qwen):
    """The cause of streams cut short: a step run on a worker thread the inference mode was not
    entered on. Here each step runs on a fresh thread, or on one left in inference mode."""
    import threading

    import torch

    from lessor.engines.torch_engine import Engine
    from lessor.engines.torch_requests import Sampling

    engine = Engine(str(tiny_qwen), "float32", "cpu", None)
    engine.load_weights()
    engine.allocate_kv(64, 1, None)
    modes: list[bool] = []
    engine.model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    sampling = Sampling(6, 0.0, 1.0, (), 1, ignore_eos=True)
    on_one_thread = list(engine.generate(0, [1, 2, 3], sampling))
    steps, tokens, never_exited = engine.generate(0, [1, 2, 3], sampling), [], []

    def step(left_in_inference_mode: bool) -> None:
        if left_in_inference_mode:  # as a thread whose mode another request entered and never exited
            never_exited.append(torch.inference_mode())
            never_exited[-1].__enter__()
        tokens.append(next(steps))

    for i in range(6):
        thread = threading.Thread(target=step, args=(i % 2 == 1,))
        thread.start()
        thread.join()
    assert tokens == on_one_thread and len(tokens) == 6
    assert modes == [True] * 12


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event_and_done(tiny_qwen, tmp_path):
    with engine_process(tiny_qwen, tmp_path, "--fail-at-step", "3") as failing:
        status, raw = failing.post("/v1/chat/completions", chat(stream=True, ignore_eos=True))
        answer = events(raw)
        assert status == 200 and answer[-1] == "[DONE]", answer
        error = answer[-2]["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        assert "its log has the details" in error["message"] and "Traceback" not in raw.decode()
        assert answer[0]["choices"][0]["delta"]["role"] == "assistant"  # then the text of two tokens at most
        assert all(e["choices"][0]["finish_reason"] is None for e in answer[:-2]) and len(answer) <= 5

        status, raw = failing.post("/v1/completions", {"prompt": "The quick", "max_tokens": 5})
        assert status == 500 and json.loads(raw)["error"]["type"] == "server_error", raw
        assert str(tmp_path) not in raw.decode() and "Traceback" not in raw.decode()
        assert failing.get("/lessor/v1/state")["requests_in_flight"] == 0  # both slots came back
        assert "decode step 3 failed" in failing.log.read_text()  # the operator's side has it all


def test_content_parts_are_read_as_their_text(engine):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello,"},
                                                       {"type": "text", "text": "how are you?"}]}],
             "max_tokens": 4, "temperature": 0}
    joined = {"messages": [{"role": "user", "content": "Hello,\nhow are you?"}], "max_tokens": 4, "temperature": 0}
    status, raw = engine.post("/v1/chat/completions", parts)
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["usage"] == json.loads(engine.post("/v1/chat/completions", joined)[1])["usage"]
    assert answer["choices"][0]["message"]["content"] == \
        json.loads(engine.post("/v1/chat/completions", joined)[1])["choices"][0]["message"]["content"]


def nested(depth: int):
    value = "deep"
    for _ in range(depth):
        value = {"x": value}
    return value


BAD = [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url",
                                                                             "image_url": {"url": "x"}}]}]},
     "messages[0].content[1].type", "text parts only"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "string"),
    (chat(stop=5), "stop", "a non-empty string or a list"),
    (chat(stop=True), "stop", "a non-empty string or a list"),
    (chat(stop=["ok", 3]), "stop", "a non-empty string or a list"),
    (chat(seed=2 ** 70), "seed", "an integer from"),
    (chat(seed="1"), "seed", "an integer from"),
    (chat(max_tokens=-1), "max_tokens", "a positive integer"),
    (chat(max_tokens=10 ** 30), "max_tokens", "a positive integer"),
    (chat(max_tokens=100000), "max_tokens", "ask for at most"),
    (chat(max_completion_tokens=1000), "max_completion_tokens", "ask for at most"),
    (chat(temperature="hot"), "temperature", "a number from 0 to 2"),
    (chat(temperature=True), "temperature", "a number from 0 to 2"),
    (chat(top_p=[1]), "top_p", "a number from 0 to 1"),
    (chat(stream="yes"), "stream", "true or false"),
    (chat(n=2), "n", "only n=1"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages", "a non-empty list"),
    ({"messages": []}, "messages", "a non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "{role, content}"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "one of system, user, assistant"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role", "one of system"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "hi", "meta": nested(500)}]}, "messages[0].meta", "deeper than 64"),
    ({"messages": [{"role": "user", "content": "hi" * 3000}]}, "messages", "shorten the prompt"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_client_mistake_is_a_400_naming_the_field_in_one_log_line(engine, body, param, words):
    before = len(engine.log_lines())
    status, raw = engine.post("/v1/chat/completions", body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert words in error["message"] and error["message"].startswith(f"{param}: "), error
    new = engine.log_lines()[before:]
    assert len(new) <= 1 and param in "".join(new) and "Traceback" not in "".join(new), new


@pytest.mark.parametrize("raw,words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", "deeper than 64"),
    ('{"messages": [{"role": "user", "content": "\udc80"}]}'.encode("utf-8", "surrogatepass"), "lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": "a\\udc80"}]}', "messages[0].content: holds a lone UTF-16 surrogate"),
])
def test_a_body_that_is_not_a_request_is_a_400(engine, raw, words):
    before = len(engine.log_lines())
    status, answer = engine.post("/v1/chat/completions", None, raw=raw)
    assert status == 400 and words in json.loads(answer)["error"]["message"], answer
    assert len(engine.log_lines()) - before <= 1 and "Traceback" not in engine.log.read_text()


def test_sampling_at_the_edges_answers(engine):
    for extra in ({"temperature": 1e-300}, {"top_p": 0}, {"temperature": 2, "top_p": 1e-9}, {"seed": -(2 ** 63)},
                  {"seed": 2 ** 64 - 1}, {"stop": ["x", "y"]}, {"max_tokens": None}):
        status, raw = engine.post("/v1/chat/completions", {**chat(), **extra})
        assert status == 200, (extra, raw)


@pytest.mark.parametrize("make,words", [
    (lambda tmp: tmp / "missing", "no such folder"),
    (lambda tmp: tmp, "no config.json there"),
])
def test_a_model_path_it_cannot_read_stops_it_at_start_in_one_line(tmp_path, make, words):
    path = make(tmp_path)
    run = subprocess.run([sys.executable, "-m", "lessor.engines.torch_server", "--model-path", str(path),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=HANG_S)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 2 and len(lines) == 1, lines
    assert f"model_path {path}: {words}" in lines[0]


def test_weights_it_cannot_read_stop_it_with_one_line_naming_the_file(tiny_qwen, tmp_path):
    """A 0-byte model.safetensors: lessor quoted the log's last lines, and they were a traceback's
    frames (`for entry in read_header(path).entries: | ^^^^^^^^^ | File ...`)."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen, model)
    (model / "model.safetensors").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "lessor.engines.torch_server", "--model-path", str(model),
                          "--port", str(free_port()), "--dtype", "float32"], capture_output=True, text=True, timeout=HANG_S)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 3, lines
    assert not any("Traceback" in line or line.startswith("  File ") for line in lines), lines
    assert lines[-1].endswith(f"cannot read the weights: {model}/model.safetensors: truncated: 0 bytes, less than "
                              "the 8-byte header length"), lines


def test_the_weights_loaded_line_is_words_not_a_dict(engine):
    """It quoted the state answer's dict into the log (and so into a crash's last log lines)."""
    (line,) = [line for line in engine.log_lines() if "weights loaded:" in line]
    words = line.partition("weights loaded: ")[2]
    assert "{" not in words and "'" not in words, line
    assert " MiB of tensors on cpu, " in words and " MiB held, read in " in words and words.endswith(" s"), line


# -- elastic KV: the cache resized in place ------------------------------------------------------

def resize(engine: Engine, body) -> tuple[int, dict]:
    status, raw = engine.post("/lessor/v1/kv/resize", body)
    return status, json.loads(raw)


def test_the_kv_cache_resizes_within_its_bounds_and_says_what_it_holds(tiny_qwen, tmp_path):
    with engine_process(tiny_qwen, tmp_path, "--min-kv-tokens", "128", batch=2) as running:  # 2 x 256 tokens
        full = running.get("/lessor/v1/state")["kv_tensor_bytes"]
        for body, param, words in [({"kv_tokens": 64}, "kv_tokens", "below this engine's minimum of 128"),
                                   ({"kv_tokens": 1024}, "kv_tokens", "above the 512 tokens it was allocated"),
                                   ({"kv_tokens": "256"}, "kv_tokens", "a positive integer"),
                                   ({"kv_tokens": 256, "wait_s": -1}, "wait_s", "from 0 to 3600")]:
            status, answer = resize(running, body)
            assert status == 400 and answer["error"]["param"] == param, answer
            assert answer["error"]["message"].startswith(f"{param}: ") and words in answer["error"]["message"], answer

        status, answer = resize(running, {"kv_tokens": 256})
        assert status == 200, answer
        assert (answer["kv_tokens"], answer["context_tokens"], answer["max_batch_size"]) == (256, 128, 2)
        assert (answer["min_kv_tokens"], answer["max_kv_tokens"]) == (128, 512)
        state = running.get("/lessor/v1/state")
        assert state["context_tokens"] == 128 and state["kv_tensor_bytes"] * 2 == full
        status, raw = running.post("/v1/chat/completions", chat(max_tokens=200))  # no room in 128 tokens now
        assert status == 400 and "ask for at most" in json.loads(raw)["error"]["message"], raw
        status, raw = running.post("/v1/chat/completions", chat(ignore_eos=True, max_tokens=20))
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 20, raw

        status, answer = resize(running, {"kv_tokens": 512})  # and back
        assert status == 200 and answer["context_tokens"] == 256, answer
        assert running.get("/lessor/v1/state")["kv_tensor_bytes"] == full


def test_a_resize_waits_for_the_running_requests_and_cuts_none(tiny_qwen, tmp_path):
    with engine_process(tiny_qwen, tmp_path, "--min-kv-tokens", "32", batch=2) as running:
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(running.post, "/v1/chat/completions",
                                   chat(f"Tell me {i}", stream=True, ignore_eos=True, max_tokens=60)) for i in range(2)]
            resized = pool.submit(resize, running, {"kv_tokens": 256, "wait_s": HANG_S})
            for stream in streams:  # each started in the old cache or waited for the new one: whole either way
                status, raw = stream.result()
                answer = events(raw)
                assert status == 200 and answer[-1] == "[DONE]", answer
                assert answer[-2]["usage"]["completion_tokens"] == 60, answer
            assert resized.result()[0] == 200, resized.result()
        assert running.get("/lessor/v1/state")["requests_in_flight"] == 0


def test_a_resize_gives_up_after_wait_s_while_a_slot_stays_busy(tiny_qwen):
    """A slot held (as by a request that runs on) past the bound: a 409 naming wait_s, every slot back."""
    import asyncio

    from lessor.engines.torch_engine import Engine as TorchEngine
    from lessor.engines.torch_server import Server

    engine = TorchEngine(str(tiny_qwen), "float32", "cpu", None)
    engine.load_weights()
    engine.allocate_kv(64, 2, None)
    server = Server(engine, "t")

    async def held_past_the_bound():
        server.free_slots = asyncio.Queue()
        server.free_slots.put_nowait(1)  # slot 0 is a running request's
        answer = await server._hold_slots(0.0)
        return answer, server.free_slots.qsize()

    answer, free = asyncio.run(held_past_the_bound())
    body = json.loads(answer.body)
    assert answer.status == 409 and body["error"]["param"] == "wait_s", body
    assert "1 request(s) still ran after waiting 0 s" in body["error"]["message"] and free == 1
