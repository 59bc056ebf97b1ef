"""The engine registry is the one list of engines: the config, the adapters, the config reference
and the README's engine table agree with it, and every engine declares every fact the planner,
the config and the memory model ask of it."""

import re

import pytest

from lessor.api.reference import config_reference, engine_classes
from lessor.engines import ENGINE_ARGS, ENGINE_KINDS, REGISTRY, adapters
from lessor.engines.base import EngineArgsBase, Flags, Sizing

from ..support.paths import ROOT

ARGS = list(ENGINE_ARGS.values())


def readme_engine_table() -> dict[str, str]:
    """kind -> the phases column of the table in README's "Engines" section."""
    section = (ROOT / "README.md").read_text().split("\n## Engines\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip("` "): cells[-1].strip() for cells in (row.strip("|").split(" | ") for row in rows)}


def test_registry_config_reference_and_readme_name_the_same_engines():
    kinds = [a.args_class.engine_kind() for a in REGISTRY]
    assert list(ENGINE_KINDS) == kinds
    assert list(adapters()) == kinds
    assert [c.engine_kind() for c in engine_classes()] == kinds  # the config's union of engine arguments
    in_reference = list(dict.fromkeys(re.findall(r"`engine \((\w+)\)\.", config_reference())))
    assert in_reference == kinds
    assert list(readme_engine_table()) == kinds


def test_readme_phases_agree_with_the_engines():
    table = readme_engine_table()
    assert {k: table[k] for k in ENGINE_KINDS} == {k: "two" if a.two_phase else "one" for k, a in ENGINE_ARGS.items()}


def minimal(args: type[EngineArgsBase]) -> EngineArgsBase:
    """Arguments with only the required fields set (each a path)."""
    required = {name: "/x" for name, f in args.model_fields.items() if f.is_required() and name != "kind"}
    return args.model_validate({"kind": args.engine_kind(), **required})


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.engine_kind())
def test_every_engine_declares_every_fact(args):
    types = {"title": str, "kv_param": str, "batch_param": str, "kv_per_sequence": bool, "two_phase": bool,
             "hybrid": bool, "max_devices": (int, type(None)), "default_chunk_tokens": int, "packages": tuple,
             "oom_markers": tuple, "ready_markers": tuple, "takes_aliases": bool, "memory_env": tuple}
    assert set(EngineArgsBase.FACTS) == set(types)
    for fact in EngineArgsBase.FACTS:
        assert fact in vars(args), f"{args.__name__} does not declare {fact}"
        assert isinstance(getattr(args, fact), types[fact]), f"{args.__name__}.{fact}"
    assert args.title and args.default_chunk_tokens > 0 and (args.max_devices is None or args.max_devices >= 1)
    assert args.oom_markers and all(isinstance(m, str) and m for m in args.oom_markers + args.packages)
    assert args.ready_markers and all(isinstance(m, str) and m for m in args.ready_markers)
    assert {args.kv_param, args.batch_param} <= set(args.model_fields), "the planner reads them as arguments"
    assert args.planned_flags is not EngineArgsBase.planned_flags


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.engine_kind())
def test_every_engine_answers_the_planner_and_the_memory_model(args):
    engine = minimal(args)
    assert engine.kv_granule() >= 1 and engine.chunk_tokens() >= 1
    assert engine.decode_batch() is None or engine.decode_batch() >= 1
    sizes = engine.kv_element_bytes()
    assert sizes is None or (len(sizes) == 2 and min(sizes) > 0)
    flags = engine.planned_flags(Sizing(kv_tokens=8192, batch=4, kv_bytes=8192 * 65536, devices=1,
                                        activation_bytes=1 << 30, gpu_bytes=8 << 30, total_bytes=24 << 30))
    assert isinstance(flags, Flags) and not flags.broken
    assert {args.kv_param, args.batch_param} <= set(flags.params), "the planned flags set the planned sizes"
    assert flags.params[args.batch_param] == 4


def _placement_problem(kind: str, placement: dict) -> str:
    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.errors import ConfigError
    engine = {"kind": kind, **{k: "/x" for k, f in ENGINE_ARGS[kind].model_fields.items() if f.is_required() and k != "kind"}}
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "engine": engine, "placement": placement,
                                  "memory": {"weights": "1GiB", "kv_bytes_per_token": 1}}]})
    return info.value.problems[0].reason


def test_placement_rules_come_from_the_engines_facts():
    hybrid = sorted(k for k, a in ENGINE_ARGS.items() if a.hybrid)
    assert hybrid == ["ktransformers", "llamacpp"]
    for kind in set(ENGINE_KINDS) - set(hybrid):
        assert _placement_problem(kind, {"experts": "cpu"}) == \
            f"placement.experts: 'cpu' needs a hybrid engine (ktransformers, llamacpp), not '{kind}'"
    single = [k for k, a in ENGINE_ARGS.items() if a.max_devices == 1]
    assert single == ["torch"]
    assert _placement_problem("torch", {"devices": [0, 1]}) == \
        "placement.devices: the built-in torch engine runs on one GPU; list exactly one"
