"""The flags each adapter passes, checked against the engine's own parser at a pinned version.

tests/fixtures/cli/ holds one option table per engine and version, written by
tests/fixtures/cli/extract.py from the engine's source (the header names repository, version
and file). A renamed or removed flag, or a value missing after a flag that takes one, fails
here instead of at an engine's start on a real box."""

from pathlib import Path

import pytest

from lessor.daemon.config.schema import parse_config
from lessor.daemon.devices.probes import HOST, gpu_id
from lessor.daemon.planning.planner import plan
from lessor.engines import adapters
from lessor.engines.base import GpuTarget, Launch
from lessor.policies import DeviceBudget

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cli"
GiB = 1 << 30
QWEN = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
R1 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
      "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
      "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "kv_lora_rank": 512,
      "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280}


def options(name: str) -> dict[str, str]:
    """option -> 'flag', 'value', 'value2' or argparse's nargs; an alias maps to its option's kind."""
    table: dict[str, str] = {}
    lines = [line.split() for line in (FIXTURES / name).read_text().splitlines() if line and not line.startswith("#")]
    for parts in lines:
        if parts[1] != "alias-of":
            table[parts[0]] = parts[1]
    for parts in lines:
        if parts[1] == "alias-of":
            table[parts[0]] = table[parts[2]]
    return table


def unknown_or_unfed(argv: list[str], table: dict[str, str]) -> list[str]:
    """Every problem of `argv` against `table`: a flag the parser does not know, a flag given a
    value it does not take, or one that takes a value with none after it."""
    problems, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg[1:2].isdigit():
            problems.append(f"{arg!r}: a value with no flag before it")
            i += 1
            continue
        kind = table.get(arg)
        if kind is None:
            problems.append(f"{arg}: not an option of this version")
            i += 1
            continue
        takes = {"flag": 0, "value": 1, "?": 1, "value2": 2}.get(kind, 1)
        values = argv[i + 1:i + 1 + takes]
        if kind in ("+", "*"):  # argparse takes every value up to the next flag
            values = []
            while i + 1 + len(values) < len(argv) and not argv[i + 1 + len(values)].startswith("--"):
                values.append(argv[i + 1 + len(values)])
            takes = len(values) if values or kind == "*" else 1
        if len(values) < takes or any(v.startswith("-") and not v[1:2].isdigit() for v in values):
            problems.append(f"{arg}: takes {takes} value(s), got {values}")
            values = [v for v in values if not v.startswith("-")]  # the next flag is read as one
        if kind == "flag" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            problems.append(f"{arg}: takes no value, got {argv[i + 1]!r}")
        i += 1 + len(values)
    return problems


def launch_of(tmp_path, engine: dict, *, architecture: dict, quantization: str = "bf16", gpus: int = 1,
              experts: str = "gpu", total: int = 24 * GiB) -> tuple[Launch, list[str]]:
    """A planned launch of one model (the planner's flags against a simulated budget) and the
    engine's own command prefix, which the table does not cover."""
    config = parse_config({
        "state_dir": str(tmp_path / "state"),
        "devices": {"probe": "sim", "simulated": [{"name": f"sim{i}", "total": "24GiB"} for i in range(gpus)],
                    "host": {"simulated_total": "1024GiB"}},
        "models": [{"name": "m", "engine": engine, "architecture": architecture, "quantization": quantization,
                    "placement": {"devices": list(range(gpus)), "experts": experts},
                    "plan": {"min_kv_tokens": 1024}}]})
    spec = config.models[0]
    budgets = {gpu_id(i): DeviceBudget(gpu_id(i), total, total, 0, 0, 0) for i in range(gpus)}
    budgets[HOST] = DeviceBudget(HOST, 1024 * GiB, 1024 * GiB, 0, 0, 0)
    planned = plan(spec, budgets)
    assert planned.fits, planned.reasons
    targets = tuple(GpuTarget(gpu_id(i), i, f"GPU-{i}", total, total) for i in range(gpus))
    launch = Launch(spec, planned.params, planned.kv_tokens, targets, {}, False, 8000,
                    tmp_path / "log", tmp_path / "run")
    engine = spec.engine
    prefix = engine.server_command() if hasattr(engine, "server_command") else getattr(engine, "command", [])
    return launch, list(prefix)


def argv_of(tmp_path, engine: dict, **shape) -> list[str]:
    launch, prefix = launch_of(tmp_path, engine, **shape)
    argv = adapters()[engine["kind"]].command(launch).argv
    assert argv[:len(prefix)] == prefix
    return argv[len(prefix):]


SGLANG = [
    {},
    {"disable_cuda_graph": True},
    {"kv_cache_dtype": "fp8_e5m2", "chunked_prefill_size": 2048, "cuda_graph_max_bs": 16},
]


@pytest.mark.parametrize("extra", SGLANG, ids=["graphs", "eager", "fp8-kv"])
@pytest.mark.parametrize("gpus", [1, 2])
def test_sglang_flags_are_in_its_parser(tmp_path, extra, gpus):
    argv = argv_of(tmp_path, {"kind": "sglang", "model_path": "/models/q", **extra}, architecture=QWEN, gpus=gpus)
    assert unknown_or_unfed(argv, options("sglang-0.5.9.txt")) == []
    assert ("--disable-cuda-graph" in argv) == bool(extra.get("disable_cuda_graph"))


KT_SGLANG = [
    {},
    {"kt_num_gpu_experts": 4, "cpu_infer": 30, "kt_threadpool_count": 2, "kt_max_deferred_experts_per_token": 2},
    {"kt_method": "LLAMAFILE", "kt_weight_path": "/models/gguf", "disable_cuda_graph": True, "cache_lens": 8192},
]


@pytest.mark.parametrize("extra", KT_SGLANG, ids=["planned", "set", "llamafile-eager"])
@pytest.mark.parametrize("gpus", [1, 2])
def test_ktransformers_sglang_flags_are_in_sglang_kt_parser(tmp_path, extra, gpus):
    engine = {"kind": "ktransformers", "server": "sglang", "model_path": "/models/r1", **extra}
    argv = argv_of(tmp_path, engine, architecture=R1, quantization="awq", gpus=gpus, experts="cpu")
    assert unknown_or_unfed(argv, options("sglang-kt-0.7.2.txt")) == []
    assert {"--kt-method", "--kt-weight-path", "--kt-cpuinfer", "--kt-num-gpu-experts"} <= set(argv)


@pytest.mark.parametrize("extra", [{}, {"cpu_infer": 30, "optimize_config_path": "/rules.yaml", "release": "0.2"},
                                   {"backend": "ktransformers", "max_batch_size": 2}], ids=["planned", "set", "ktransformers-backend"])
def test_ktransformers_legacy_flags_are_in_its_parser(tmp_path, extra):
    engine = {"kind": "ktransformers", "server": "legacy", "model_path": "/models/r1", "gguf_path": "/models/gguf", **extra}
    argv = argv_of(tmp_path, engine, architecture=R1, quantization="q4_k_m", experts="cpu")
    assert unknown_or_unfed(argv, options("ktransformers-0.3.2.txt")) == []


LLAMA = [
    {},
    {"flash_attn": "off", "kv_unified": True, "swa_full": True, "threads": 8},
    {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "parallel": 4, "n_gpu_layers": 20},
]


@pytest.mark.parametrize("extra", LLAMA, ids=["default", "no-fa-unified", "quantized-kv"])
@pytest.mark.parametrize("gpus,experts", [(1, "gpu"), (2, "gpu"), (1, "cpu")], ids=["one", "split", "experts-cpu"])
def test_llama_server_flags_are_in_its_parser(tmp_path, extra, gpus, experts):
    engine = {"kind": "llamacpp", "model_path": "/models/m.gguf", **extra}
    architecture = R1 if experts == "cpu" else QWEN
    launch, _ = launch_of(tmp_path, engine, architecture=architecture, quantization="q4_k_m", gpus=gpus, experts=experts)
    argv = adapters()["llamacpp"].command(launch).argv
    assert argv[0] == "llama-server"
    assert unknown_or_unfed(argv[1:], options("llama-server-0c1e57098.txt")) == []
    assert ("--tensor-split" in argv) == (gpus > 1) and ("--override-tensor" in argv) == (experts == "cpu")


def test_a_renamed_or_unfed_flag_fails():
    """The check itself: a flag the pinned parser lacks (SGLang's old --mem-fraction, vLLM's
    spelling of the pool), a value missing, a value given to a switch."""
    table = options("sglang-kt-0.7.2.txt")
    assert unknown_or_unfed(["--kt-num-gpu-experts", "4", "--kt-cpuinfer", "8"], table) == []
    assert unknown_or_unfed(["--kt-gpu-experts", "4"], table) == ["--kt-gpu-experts: not an option of this version",
                                                                  "'4': a value with no flag before it"]
    assert unknown_or_unfed(["--max-total-tokens", "--kt-method", "AMXINT4"], table) == [
        "--max-total-tokens: takes 1 value(s), got ['--kt-method']"]
    assert unknown_or_unfed(["--disable-cuda-graph", "true"], table) == [
        "--disable-cuda-graph: takes no value, got 'true'", "'true': a value with no flag before it"]
    assert unknown_or_unfed(["--kt-numa-nodes", "0", "1"], table) == []  # nargs="+"
    llama = options("llama-server-0c1e57098.txt")
    assert unknown_or_unfed(["-fa", "on", "-kvu"], llama) == []
    assert unknown_or_unfed(["--flash-attn"], llama) == ["--flash-attn: takes 1 value(s), got []"]


def test_each_table_names_its_source():
    for table in FIXTURES.glob("*.txt"):
        header = [line for line in table.read_text().splitlines() if line.startswith("#")]
        assert [h.split(":")[0] for h in header[:3]] == ["# repository", "# ref", "# source"], table.name


def test_alias_facts_the_router_relies_on():
    """One name on SGLang's command line (sglang 0.5.9 and sglang-kt 0.7.2: --served-model-name
    is a plain string), several comma-separated on llama-server's (-a/--alias at 0c1e57098)."""
    from lessor.engines import ENGINE_ARGS
    assert options("sglang-0.5.9.txt")["--served-model-name"] == "value"
    assert options("sglang-kt-0.7.2.txt")["--served-model-name"] == "value"
    assert ENGINE_ARGS["sglang"].takes_aliases is False and ENGINE_ARGS["ktransformers"].takes_aliases is False
    assert options("llama-server-0c1e57098.txt")["--alias"] == "value"
