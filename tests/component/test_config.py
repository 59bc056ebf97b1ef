"""Config: every shipped example validates; every problem of a bad file is listed with its path."""

import pytest

from lessor.daemon.config.schema import load_config, parse_config
from lessor.daemon.errors import ConfigError
from lessor.daemon.units import GiB

from ..support.paths import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    config = load_config(path)
    assert config.models


def test_seed_example_is_the_seed_case():
    config = load_config(ROOT / "examples" / "seed.yaml")
    gpu = config.devices.simulated[0]
    assert (gpu.total, gpu.foreign, config.devices.headroom) == (24 * GiB, 8 * GiB, GiB)
    r1 = config.model("deepseek-r1")
    assert r1.engine.kind == "ktransformers" and r1.placement.experts == "cpu"
    assert r1.profile().kv_bytes_per_token == 70272


def _problems(data) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return {p.path: p.reason for p in info.value.problems}


def _kt(**engine):
    return {"name": "r1", "engine": {"kind": "ktransformers", "model_path": "/m", "gguf_path": "/g", **engine},
            "memory": {"weights": "12GiB", "kv_bytes_per_token": 70272}}


def test_every_problem_is_listed_with_its_path():
    problems = _problems({
        "devices": {"headroom": "lots", "simulated": [{"total": "24GiB", "colour": "red"}]},
        "policy": {"name": "fifo"},
        "models": [_kt(), {**_kt(cache_lens=200, chunk_size=1500, max_batch_size=2), "name": "r2"}],
    })
    assert "not a size" in problems["devices.headroom"]
    assert "unknown field" in problems["devices.simulated[0].colour"]
    assert "valid: fit, lru_idle, priority" in problems["policy.name"]
    assert problems["models[1].engine.cache_lens"].startswith("must be at least 256")
    assert "got 200" in problems["models[1].engine.cache_lens"]
    assert "at most 1024 or a multiple of 1024" in problems["models[1].engine.chunk_size"]
    assert "at least 3 for the balance_serve backend" in problems["models[1].engine.max_batch_size"]
    assert len(problems) == 6


def test_unknown_engine_kind_lists_the_valid_ones():
    problems = _problems({"models": [{"name": "x", "engine": {"kind": "tgi", "model_path": "/m"},
                                      "memory": {"weights": "1GiB", "kv_bytes_per_token": 1}}]})
    assert "ktransformers" in problems["models[0].engine"]


def test_names_and_aliases_are_unique():
    a = _kt()
    b = {**_kt(), "name": "r2", "aliases": ["r1"]}
    problems = _problems({"models": [a, b]})
    assert "already used by model 'r1'" in next(iter(problems.values()))


def test_cpu_experts_need_a_hybrid_engine():
    spec = {"name": "q", "engine": {"kind": "vllm", "model_path": "/m"}, "placement": {"experts": "cpu"},
            "memory": {"weights": "1GiB", "kv_bytes_per_token": 1}}
    assert any("hybrid engine" in reason for reason in _problems({"models": [spec]}).values())


def test_yaml_errors_say_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [\n  - name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line" in str(info.value) and "not valid YAML" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_defaults_are_loopback_and_one_gib_headroom():
    config = parse_config({})
    assert config.admin.listen.startswith("127.0.0.1:")
    assert config.devices.headroom == GiB
    assert config.ledger_url().startswith("sqlite+aiosqlite:///")


def test_relative_model_paths_are_made_absolute(tmp_path, monkeypatch):
    # Engines run in folders of their own: a relative path is taken from where lessord reads its config.
    monkeypatch.chdir(tmp_path)
    config = parse_config({"models": [{"name": "q", "engine": {"kind": "torch", "model_path": "var/models/q"},
                                       "memory": {"weights": "1GiB", "kv_bytes_per_token": 1024}}]})
    assert config.models[0].engine.model_path == str(tmp_path / "var" / "models" / "q")


def test_a_spec_computes_its_profile_once_and_still_equals_a_fresh_one():
    """A reload compares specs to find the changed models: a cached profile must not count."""
    spec = load_config(ROOT / "examples" / "seed.yaml").models[0]
    fresh = load_config(ROOT / "examples" / "seed.yaml").models[0]
    assert spec.profile() is spec.profile()
    assert spec == fresh and not (spec != fresh)
    wider = spec.model_copy(update={"engine": spec.engine.model_copy(update={"chunk_size": 2048})})
    assert wider.profile().activation > spec.profile().activation  # the copy computes its own


# -- what check-config accepted and then failed at run time (issue 34, finding 5) --------------

def _torch(name: str, **extra) -> dict:
    return {"name": name, "engine": {"kind": "torch", "model_path": f"/models/{name}", **extra.pop("engine", {})},
            "memory": {"weights": "1GiB", "kv_bytes_per_token": 8192}, **extra}


def test_min_kv_tokens_above_max_is_refused_naming_both():
    """`plan` then blamed the memory for a KV cache no memory could give."""
    problems = _problems({"models": [_torch("a", plan={"min_kv_tokens": 8192, "max_kv_tokens": 4096})]})
    assert problems == {"models[0].plan": "min_kv_tokens (8192) is above max_kv_tokens (4096): no KV cache can be "
                                          "both; lower min_kv_tokens or raise max_kv_tokens"}


def test_two_listeners_on_one_port_are_refused():
    """Two engines on one engine.port, or an engine on the admin API's port: the second failed at its load."""
    engines = _problems({"models": [_torch("a", engine={"port": 9000}), _torch("b", engine={"port": 9000})]})
    assert engines == {"": "models[1].engine.port: port 9000 is also models[0].engine.port's; the second to listen "
                           "there would fail: give each its own port"}
    admin = _problems({"admin": {"listen": "127.0.0.1:9100"}, "models": [_torch("a", engine={"port": 9100})]})
    assert "models[0].engine.port: port 9100 is also admin.listen's" in admin[""]
    router = _problems({"admin": {"listen": "127.0.0.1:9200"}, "router": {"listen": "0.0.0.0:9200"}})
    assert "router.listen: port 9200 is also admin.listen's" in router[""]
    apart = parse_config({"admin": {"listen": "10.0.0.1:9300"}, "router": {"listen": "10.0.0.2:9300"}})
    assert apart.router.listen == "10.0.0.2:9300"  # two addresses of their own: no clash


def test_negative_durations_are_refused_but_keep_alive_minus_one_means_never():
    problems = _problems({"models": [_torch("a", keep_alive=-5), _torch("b", restart={"backoff": -1})],
                          "policy": {"churn_age": "-1"}})
    assert problems["models[0].keep_alive"] == "-5 is negative: use -1 (or 'never') for never, or a duration such as 30s or 5m"
    assert "is negative: a duration here is 0 or more" in problems["models[1].restart.backoff"]
    assert "is negative" in problems["policy.churn_age"]
    config = parse_config({"models": [_torch("a", keep_alive=-1), _torch("b", keep_alive="never"), _torch("c", keep_alive="5m")]})
    assert [m.keep_alive for m in config.models] == [-1, -1, 300]
