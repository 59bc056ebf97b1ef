"""The model's shape read from its folder (issue 34, finding 3): a model_path holding a config.json,
or a GGUF file (or a folder with one), gives the architecture without `architecture.hf_config`;
hf_config overrides it; the plan says which it used."""

import importlib.util
import shutil
import struct

import pytest

from lessor.api.cli_render import render_plan
from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.config.schema import ConfigError, parse_config
from lessor.daemon.planning.planner import plan
from lessor.daemon.units import GiB
from lessor.policies import DeviceBudget

from ..support.paths import FIXTURES

CARD = {"gpu0": DeviceBudget("gpu0", 16 * GiB, 16 * GiB, GiB, 0, 0)}


def torch_spec(path, **extra) -> ModelSpec:
    return ModelSpec.model_validate({"name": "chat", "engine": {"kind": "torch", "model_path": str(path)}, **extra})


def test_a_model_folder_with_config_json_needs_no_architecture(tiny_qwen):
    """Before: `memory.weights: required when no architecture is given`."""
    spec = torch_spec(tiny_qwen)
    assert spec.architecture is not None
    assert (spec.architecture.model_type, spec.architecture.hidden_size, spec.architecture.max_position_embeddings) == \
        ("qwen2", 64, 8192)
    result = plan(spec, CARD)
    assert result.fits, result.reasons
    said = result.to_dict()["sizing"]  # the admin API's plan
    assert said[0] == f"model shape: qwen2 read from {tiny_qwen / 'config.json'} (engine.model_path's config.json)"
    assert f"sizing: model shape: qwen2 read from {tiny_qwen / 'config.json'}" in render_plan(result.to_dict())  # `lessor plan`


def test_two_models_on_a_16_gib_card_from_their_folders_alone(tiny_qwen, tmp_path):
    """The newcomer's config: two built-in-engine models, model_path only."""
    config = parse_config({"devices": {"probe": "sim", "simulated": [{"total": "16GiB"}]},
                           "models": [{"name": "chat", "engine": {"kind": "torch", "model_path": str(tiny_qwen)}},
                                      {"name": "coder", "engine": {"kind": "torch", "model_path": str(tiny_qwen)}}]})
    assert all(m.architecture.source.endswith("(engine.model_path's config.json)") for m in config.models)


def test_hf_config_overrides_the_folder_and_the_plan_says_so(tiny_qwen):
    spec = torch_spec(tiny_qwen, architecture={"hf_config": str(FIXTURES / "qwen2.5-7b.json")})
    assert spec.architecture.hidden_size == 3584
    assert spec.architecture.source == f"{FIXTURES / 'qwen2.5-7b.json'} (architecture.hf_config)"
    assert "(architecture.hf_config)" in plan(spec, {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 0, 0)}).sizing[0]
    given = torch_spec(tiny_qwen, architecture={"model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 512})
    assert given.architecture.hidden_size == 128 and given.architecture.source is None
    assert plan(given, CARD).sizing[0] == "model shape: qwen2 from the config's architecture fields"


def test_memory_given_in_full_keeps_planning_without_the_folder(tiny_qwen):
    spec = torch_spec(tiny_qwen, memory={"weights": "1GiB", "kv_bytes_per_token": 8192})
    assert spec.architecture is None


def test_a_folder_without_a_shape_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "x", "engine": {"kind": "torch", "model_path": str(tmp_path)}}]})
    assert f"engine.model_path holds no config.json or GGUF ({tmp_path})" in str(info.value)


def test_an_unreadable_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "vision_config": {}}')
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "x", "engine": {"kind": "torch", "model_path": str(tmp_path)}}]})
    assert "engine.model_path's shape cannot be read" in str(info.value) and "multimodal" in str(info.value)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen, tmp_path_factory):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf not installed (pip install -e '.[test]')")
    from lessor.engines.tiny_qwen import write_gguf

    return write_gguf(tiny_qwen, tmp_path_factory.mktemp("gguf") / "tiny-qwen.gguf")


def test_a_gguf_header_gives_the_same_shape_as_the_config_json(tiny_qwen, tiny_gguf, tmp_path):
    from_folder = torch_spec(tiny_qwen).architecture
    gguf = ModelSpec.model_validate({"name": "g", "engine": {"kind": "llamacpp", "model_path": str(tiny_gguf)}})
    assert gguf.architecture.model_dump(exclude={"source"}) == from_folder.model_dump(exclude={"source"})
    assert gguf.architecture.source == f"{tiny_gguf} (engine.model_path's GGUF header)"
    result = plan(gguf, CARD)
    assert result.fits, result.reasons
    assert result.params["ctx_size"] == 8192 * 4  # the GGUF's context_length, for the planned slots
    folder = tmp_path / "one-gguf"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "model.gguf")
    assert ModelSpec.model_validate({"name": "g", "engine": {"kind": "llamacpp", "model_path": str(folder)}}) \
        .architecture.hidden_size == 64


def test_a_damaged_gguf_is_refused_by_name(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"gen")  # ends in a key
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "x", "engine": {"kind": "llamacpp", "model_path": str(path)}}]})
    assert "the header ends early" in str(info.value)


async def test_lessord_loads_a_model_from_its_folder_alone_and_the_engine_takes_the_planned_context(tiny_qwen, tmp_path):
    """Through the daemon with the real built-in engine: no architecture, no memory.* (the newcomer's spec)."""
    from lessor.daemon.runtime import runtime

    from ..support.configs import sim_config

    spec = {"name": "chat", "engine": {"kind": "torch", "model_path": str(tiny_qwen), "dtype": "float32"},
            "restart": {"policy": "never"}}
    async with runtime(sim_config(tmp_path, [spec], gpus=[{"name": "sim16", "total": "16GiB"}])) as controller:
        assert controller.plan("chat")["sizing"][0].endswith("(engine.model_path's config.json)")
        model = await controller.load("chat")
        assert model["state"] == "ready"
        assert model["params"] == {"context_tokens": 8192, "max_batch_size": 4}
        await controller.unload("chat")
