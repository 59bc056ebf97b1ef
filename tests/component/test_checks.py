"""A model that can never fit the box (ModelTooLarge: its own answer, never one a client retries),
and `lessor check-config`'s checks (daemon/config/checks.py): every problem a config has on this box,
each with the field it is about."""

import asyncio

import aiohttp
import pytest

from lessor.api import errors
from lessor.api.admin import make_admin_app
from lessor.api.router import start_router
from lessor.daemon.config import checks
from lessor.daemon.config.schema import RouterConfig
from lessor.daemon.devices.probes import SimProbe, make_probe
from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.planning.rejections import ModelTooLarge
from lessor.daemon.runtime import runtime
from lessor.daemon.units import GiB
from lessor.engines.process import free_port
from lessor.policies import DeviceBudget

from ..support.configs import sim_config, torch_model
from ..support.fakes import FakeEngines
from ..support.paths import BIN, ROOT
from ..support.waiting import HANG_S

CARD_8GIB = [{"name": "sim8", "total": "8GiB", "foreign": "0"}]
HUGE = {**torch_model("huge", "20GiB"), "memory": {"weights": "20GiB", "kv_bytes_per_token": 65536, "load_peak": 0}}


async def test_a_model_that_can_never_fit_is_refused_before_any_eviction(env):
    """20 GiB of weights on an 8 GiB card: no eviction and no wait would ever make room, so none
    is made, and the answer says the most it could get there and what to change."""
    controller, adapter, _ = await env([torch_model("small", "2GiB"), HUGE], gpus=CARD_8GIB)
    await controller.load("small")
    with pytest.raises(ModelTooLarge) as info:
        await controller.load("huge")
    message = str(info.value)
    assert message.startswith("model 'huge' can never fit on gpu0: it needs 20.1 GiB there, at most 7.0 GiB can "
                              "ever be leased (8.0 GiB capacity − 1.0 GiB headroom"), message
    assert "its weights alone need 20.0 GiB: use a quantized model" in message
    assert "quantized" in message and "tensor parallel" in message and "offload" in message
    assert "load peak" not in message  # it has none to lower
    assert controller.model("small")["state"] == "ready"  # nothing was evicted for it
    assert controller.model("huge")["state"] == "unloaded" and controller.leases("huge") == []


def test_model_too_large_is_never_answered_with_a_status_a_client_retries():
    # The openai client retries 408, 409, 429 and every 5xx (honouring Retry-After).
    error = ModelTooLarge("huge", "gpu0", 20 << 30, 7 << 30, "quantize", capacity_bytes=8 << 30, headroom_bytes=1 << 30)
    assert errors.http_status(error) == 422 and "Retry-After" not in errors.http_headers(error)
    assert errors.openai_envelope(error)["error"]["code"] == "model_too_large"


async def test_the_admin_api_answers_422_without_retry_after(tmp_path, aiohttp_client):
    config = sim_config(tmp_path, [HUGE], gpus=CARD_8GIB)
    async with runtime(config, engines=FakeEngines()) as controller:
        ready = asyncio.Event()
        ready.set()
        api = await aiohttp_client(make_admin_app(controller, "t", ready))
        r = await api.post("/admin/v1/models/huge", json={"action": "load"}, headers={"Authorization": "Bearer t"})
        body = await r.json()
    assert r.status == 422 and "Retry-After" not in r.headers, body
    assert body["error"]["type"] == "model_too_large" and "can never fit on gpu0" in body["error"]["message"]


async def test_the_router_answers_422_without_retry_after(tmp_path):
    config = sim_config(tmp_path, [HUGE], gpus=CARD_8GIB)
    async with runtime(config, engines=FakeEngines()) as controller:
        router_config = RouterConfig()
        traffic = controller.traffic
        server = await start_router(traffic, controller.supervisor, router_config, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
                async with session.post("/v1/completions", json={"model": "huge", "prompt": "x"}) as r:
                    status, headers, body = r.status, r.headers, await r.json()
        finally:
            await server.close()
            await traffic.close()
    assert status == 422 and "Retry-After" not in headers, body
    assert body["error"]["code"] == "model_too_large" and body["error"]["type"] == "invalid_request_error"


async def test_a_plan_of_a_model_too_large_says_it_can_never_fit(env):
    controller, _, _ = await env([HUGE], gpus=CARD_8GIB)
    plan = controller.plan("huge")
    assert not plan["fits"]
    assert any("at most 7.0 GiB can ever be leased there" in r and "load peak" not in r for r in plan["reasons"])


# -- check-config's checks (daemon/config/checks.py) ----------------------------------------------------

def _config(tmp_path, models, gpus=CARD_8GIB, **devices):
    return sim_config(tmp_path, models, gpus=gpus, **devices)


def test_a_missing_model_path_is_named_by_its_field(tmp_path):
    (tmp_path / "here").mkdir()
    config = _config(tmp_path, [{**torch_model("a"), "engine": {"kind": "torch", "model_path": str(tmp_path / "here")}},
                                {**torch_model("b"), "engine": {"kind": "torch", "model_path": str(tmp_path / "gone")}}])
    (finding,) = checks.files(config)
    assert str(finding) == f"error: models[1].engine.model_path: {tmp_path / 'gone'} does not exist"


def test_an_engine_command_not_on_path_is_named_with_the_path_searched(tmp_path):
    vllm = {**torch_model("v"), "engine": {"kind": "vllm", "model_path": "/m", "command": ["no-such-vllm", "serve"]}}
    llama = {**torch_model("l"), "engine": {"kind": "llamacpp", "model_path": "/m.gguf", "binary": "no-such-llama-server"}}
    config = _config(tmp_path, [torch_model("t"), vllm, llama])
    found = {f.path: f.reason for f in checks.commands(config, "/usr/bin:/bin")}
    assert found == {"models[1].engine.command": "'no-such-vllm' not found on PATH (/usr/bin:/bin)",
                     "models[2].engine.binary": "'no-such-llama-server' not found on PATH (/usr/bin:/bin)"}


def test_a_model_that_can_never_fit_its_device_is_named(tmp_path):
    config = _config(tmp_path, [torch_model("fine", "2GiB"), HUGE])
    budgets = {"gpu0": DeviceBudget("gpu0", 8 * GiB, 8 * GiB, GiB, 3 * GiB, 2 * GiB)}  # foreign and leases: no matter
    (finding,) = checks.fits(config, budgets)
    assert finding.path == "models[1]"
    assert finding.reason.startswith("can never fit on gpu0: it needs 20.1 GiB there, at most 7.0 GiB can ever be "
                                     "leased (8.0 GiB capacity − 1.0 GiB headroom")


def _write(tmp_path, data):
    import yaml
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_config_prints_every_problem_and_exits_1(tmp_path, capsys):
    """On simulated devices a missing file or command is a warning (this machine is not the box);
    a model that can never fit is an error anywhere."""
    from lessor.api.cli import main
    missing = {**torch_model("a"), "engine": {"kind": "torch", "model_path": str(tmp_path / "nothing")}}
    binary = {**torch_model("v"), "engine": {"kind": "vllm", "model_path": str(tmp_path), "command": ["no-such-vllm"]}}
    data = {"state_dir": str(tmp_path / "state"), "models": [missing, binary, {**HUGE, "engine": {
        "kind": "torch", "model_path": str(tmp_path)}}],
            "devices": {"probe": "sim", "headroom": "1GiB", "simulated": CARD_8GIB}}
    path = _write(tmp_path, data)
    assert main(["check-config", str(path)]) == 1
    out = capsys.readouterr()
    assert f"warning: models[0].engine.model_path: {tmp_path / 'nothing'} does not exist (a warning: the devices " \
           "are simulated" in out.out
    assert "warning: models[1].engine.command: 'no-such-vllm' not found on PATH (" in out.out
    assert "error: models[2]: can never fit on gpu0: it needs 20.1 GiB there, at most 7.0 GiB" in out.err
    assert f"{path}: 1 error(s) (3 model(s)" in out.out
    data["models"] = [{**torch_model("a"), "engine": {"kind": "torch", "model_path": str(tmp_path)}}]
    _write(tmp_path, data)
    assert main(["check-config", str(path)]) == 0
    assert f"{path}: OK (1 model(s), policy value; checked against simulated devices: gpu0 sim8" in capsys.readouterr().out


def test_check_config_exit_status_is_one_rule(tmp_path, capsys):
    """README said "exits 1 listing every problem", but a schema error exited 2: now any problem in
    the config (YAML, schema, the checks' errors) is 1, and 2 is kept for a usage error or a file
    that cannot be read. The rule is in the command's --help."""
    from lessor.api.cli import main
    path = tmp_path / "lessor.yaml"
    path.write_text("devices: {headroom: lots}\npolicy: {name: fifo}\n")  # the schema's problems
    assert main(["check-config", str(path)]) == 1
    assert "2 problem(s)" in capsys.readouterr().err
    path.write_text("models: [\n")  # not YAML
    assert main(["check-config", str(path)]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    _write(tmp_path, {"state_dir": str(tmp_path / "state"), "models": [{**HUGE, "engine": {
        "kind": "torch", "model_path": str(tmp_path)}}], "devices": {"probe": "sim", "simulated": CARD_8GIB}})
    assert main(["check-config", str(path)]) == 1  # a check's error
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
    assert f"cannot read {tmp_path / 'absent.yaml'}: No such file or directory" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path)]) == 2  # a folder
    with pytest.raises(SystemExit) as usage:
        main(["check-config"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit):
        main(["check-config", "--help"])
    assert "1 the config has problems" in " ".join(capsys.readouterr().out.split())


def test_a_weights_file_too_small_for_a_safetensors_header_is_found(tmp_path):
    """A 0-byte model.safetensors passed check-config, and the engine's load then failed with a
    traceback. An error on the box, a warning on simulated devices, like any file of the model's."""
    from lessor.daemon.devices.probes import SimProbe as Devices
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    config = _config(tmp_path, [{**torch_model("a"), "engine": {"kind": "torch", "model_path": str(folder)}}])
    (finding,) = checks.weights(config)
    assert str(finding) == (f"error: models[0].engine.model_path: cannot be read as safetensors: {folder}/model.safetensors:"
                            " truncated: 0 bytes, less than the 8-byte header length")
    (folder / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    assert "the header length 1000 runs past the end of the file (10 bytes)" in checks.weights(config)[0].reason
    readings = Devices(config.devices.simulated, 64 * GiB).read()
    on_the_box = checks.review(config, readings, simulated=False)
    assert [f.path for f in on_the_box.findings if f.error] == ["models[0].engine.model_path"]
    simulated = checks.review(config, readings, simulated=True)
    assert simulated.errors == 0 and [f.path for f in simulated.warnings] == ["models[0].engine.model_path"]
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # sound: no tensors, no finding
    assert checks.weights(config) == []


def test_on_the_box_a_missing_file_or_command_is_an_error(tmp_path):
    """NVML's devices: this machine is the box the config is for (review() is what check() runs)."""
    from lessor.daemon.devices.probes import SimProbe as Devices
    config = _config(tmp_path, [{**torch_model("a"), "engine": {"kind": "torch", "model_path": "/not/here"}}])
    readings = Devices(config.devices.simulated, 64 * GiB).read()
    on_the_box = checks.review(config, readings, simulated=False)
    assert [str(f) for f in on_the_box.findings] == ["error: models[0].engine.model_path: /not/here does not exist"]
    simulated = checks.review(config, readings, simulated=True)
    assert simulated.errors == 0 and [f.path for f in simulated.warnings] == ["models[0].engine.model_path"]


def test_without_a_driver_a_gpu_box_config_warns_of_what_only_the_box_can_answer(tmp_path, capsys):
    """devices.probe auto and no NVIDIA driver here: a GPU box's config checked on a laptop or in CI."""
    config = sim_config(tmp_path, [{**torch_model("a"), "engine": {"kind": "torch", "model_path": "/not/here"}}],
                        gpus=CARD_8GIB)
    config = config.model_copy(update={"devices": config.devices.model_copy(update={"probe": "auto"})})
    if not isinstance(make_probe(config.devices), SimProbe):
        pytest.skip("NVML answers on this machine: it may be the box")
    report = checks.check(config)
    assert report.errors == 0 and [f.path for f in report.findings] == ["models[0].engine.model_path"]
    assert "a warning: the devices are simulated" in report.findings[0].reason


def test_the_seed_checks_as_lessord_starts_it(capsys):
    """`lessor check-config examples/seed.yaml` exited 1 (the DeepSeek-R1 files are not here) while
    the README starts lessord on that file: the simulated seed warns of them, and passes."""
    from lessor.api.cli import main
    seed = str(ROOT / "examples" / "seed.yaml")
    assert main(["check-config", seed]) == 0
    out = capsys.readouterr()
    assert "warning: models[0].engine.model_path: /models/DeepSeek-R1 does not exist" in out.out
    assert f"{seed}: OK (1 model(s), policy priority" in out.out and out.err == ""


def test_an_empty_config_is_said_not_passed_in_silence(tmp_path, capsys):
    from lessor.api.cli import main
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert main(["check-config", str(path)]) == 0  # valid: lessord starts on it, serving nothing
    out = capsys.readouterr().out
    assert "warning: models: no models configured: lessord would start and serve nothing" in out


def test_lessord_does_not_start_on_a_config_check_config_refuses(tmp_path):
    """The same checks at start: a model that can never fit stops lessord before anything starts."""
    import subprocess
    data = {"state_dir": str(tmp_path / "state"), "models": [{**HUGE, "engine": {"kind": "torch", "model_path": str(tmp_path)}}],
            "devices": {"probe": "sim", "headroom": "1GiB", "simulated": CARD_8GIB},
            "admin": {"listen": f"127.0.0.1:{free_port()}"}, "router": {"listen": f"127.0.0.1:{free_port()}"}}
    path = _write(tmp_path, data)
    result = subprocess.run([str(BIN / "lessord"), "--config", str(path), "--sim"],
                            capture_output=True, text=True, timeout=HANG_S)  # a guard: it exits at once
    assert result.returncode == 2, result
    assert f"lessord: {path}: error: models[0]: can never fit on gpu0" in result.stderr
    assert f"lessord: not started: 1 error(s) in {path}, as `lessor check-config --sim {path}` lists them" in result.stderr
    assert not (tmp_path / "state").exists(), "refused before the ledger was opened"


async def test_an_engine_command_not_found_fails_its_load_naming_it_and_the_path(tmp_path, monkeypatch):
    """It failed with "failed to load at step 'start engine': [Errno 2] No such file or directory"."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    vllm = {**torch_model("v"), "engine": {"kind": "vllm", "model_path": str(tmp_path), "command": ["no-such-vllm", "serve"]}}
    async with runtime(sim_config(tmp_path, [vllm])) as controller:  # the real adapters
        with pytest.raises(LoadFailed) as info:
            await controller.load("v")
        assert controller.leases("v") == []
    assert info.value.step == "start engine"
    assert info.value.reason == "engine command 'no-such-vllm' not found on PATH (/usr/bin:/bin)"
