"""Plans stay inside the model (issue 34, finding 2): every engine's KV cache is capped by the
model's context as that engine derives it, times the sequences planned; the default plan leaves
the rest of the card to other models; a configured size above what the engine accepts is refused."""

import json

import pytest

from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.planning.planner import plan, with_overrides
from lessor.daemon.units import GiB
from lessor.memory.architecture import Architecture, read_hf_config
from lessor.policies import DeviceBudget

from ..support.paths import FIXTURES

# Qwen2.5-7B-Instruct's config.json: the base model's with max_position_embeddings 32768 (the
# instruct model's; YaRN to 128K only when rope_scaling is added).
QWEN_CONFIG = {**json.loads((FIXTURES / "qwen2.5-7b.json").read_text()), "max_position_embeddings": 32768}
R1 = str(FIXTURES / "deepseek-v3.json")  # max_position_embeddings 163840, rope yarn x40 from 4096


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qwen") / "config.json"
    path.write_text(json.dumps(QWEN_CONFIG))
    return str(path)


def card(total_gib: int) -> dict[str, DeviceBudget]:
    return {"gpu0": DeviceBudget("gpu0", total_gib * GiB, total_gib * GiB, GiB, 0, 0),
            "host": DeviceBudget("host", 1024 * GiB, 1024 * GiB, 8 * GiB, 0, 0)}


def spec(engine: dict, hf_config: str, **extra) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": {"model_path": "/models/m", **engine},
                                     "architecture": {"hf_config": hf_config}, **extra})


def sizing(result) -> str:
    return "\n".join(result.sizing)


def test_builtin_engine_plans_the_tiny_models_context_for_its_batch_not_the_whole_card(tiny_qwen):
    """Before: context_tokens=15203176 and 14.5 GiB of KV for a model of 8192 positions."""
    result = plan(spec({"kind": "torch"}, str(tiny_qwen / "config.json")), card(16))
    assert result.fits, result.reasons
    assert result.params == {"context_tokens": 8192, "max_batch_size": 4}
    assert result.kv_tokens == 8192 * 4
    kv = sum(w.bytes for w in result.steady_leases if w.kind.value == "kv")
    assert kv < 64 * 2**20  # megabytes, not the card
    assert "capped at the model's context 8192 x 4 sequences = 32768 tokens (max_position_embeddings 8192" in sizing(result)
    assert "the rest of the card is left to other models" in sizing(result)


def test_vllm_never_plans_max_model_len_above_what_vllm_derives(qwen):
    """Before: gpu-box's qwen2.5-7b without plan.max_kv_tokens got max_model_len=39374 (> 32768)."""
    qwen = spec({"kind": "vllm", "max_num_seqs": 8, "max_num_batched_tokens": 2048}, qwen, quantization="awq")
    result = plan(qwen, card(24))
    assert result.fits, result.reasons
    assert result.params["max_model_len"] == 32768 and result.kv_tokens == 32768 * 8
    assert "vLLM derives max_model_len so and refuses more" in sizing(result)
    refused = plan(with_overrides(qwen, {"max_model_len": 40000}), card(80))
    assert not refused.fits
    assert any("engine.max_model_len 40000 is above the model's context 32768" in r and "lower it to 32768" in r
               for r in refused.reasons), refused.reasons


def test_vllm_and_sglang_scale_the_context_by_rope_each_their_own_way():
    from lessor.memory.context import sglang_context_length, vllm_max_len

    base = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 32768}
    yarn = Architecture(**base, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert vllm_max_len(yarn).tokens == 32768  # vLLM 0.32: yarn's count is scaled already
    assert sglang_context_length(yarn).tokens == 32768  # original named: the factor is not applied
    dynamic = Architecture(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert vllm_max_len(dynamic).tokens == sglang_context_length(dynamic).tokens == 65536
    linear = Architecture(**base, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert vllm_max_len(linear).tokens == sglang_context_length(linear).tokens == 65536
    llama3 = Architecture(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert vllm_max_len(llama3).tokens == sglang_context_length(llama3).tokens == 32768  # already scaled
    assert vllm_max_len(Architecture(**{**base, "max_position_embeddings": None})) is None


def test_config_json_rope_scaling_and_positions_are_read():
    fields = read_hf_config(FIXTURES / "deepseek-v3.json")
    assert fields["max_position_embeddings"] == 163840
    from lessor.memory.context import vllm_max_len

    arch = Architecture(**fields)
    assert vllm_max_len(arch).tokens == 163840  # yarn: the count as it is


def test_sglang_pool_and_context_length_stay_inside_the_model(qwen):
    """Before: --context-length was the whole pool (SGLang refuses one above the model's)."""
    result = plan(spec({"kind": "sglang", "max_running_requests": 2}, qwen), card(80))
    assert result.fits, result.reasons
    assert result.params["max_total_tokens"] == 32768 * 2
    assert result.params["context_length"] == 32768
    given = plan(spec({"kind": "sglang", "context_length": 65536}, qwen), card(80))
    assert any("engine.context_length 65536 is above the 32768 tokens SGLang accepts" in r for r in given.reasons)


def test_llamacpp_ctx_size_is_the_trained_context_per_slot(qwen):
    result = plan(spec({"kind": "llamacpp", "parallel": 2}, qwen, quantization="q4_k_m"), card(80))
    assert result.fits, result.reasons
    assert result.params["ctx_size"] == 32768 * 2
    more = plan(spec({"kind": "llamacpp", "parallel": 1, "ctx_size": 65536}, qwen, quantization="q4_k_m"), card(80))
    assert more.fits  # llama.cpp only warns past n_ctx_train: so does the plan
    assert any("engine.ctx_size 65536 is more than 1 sequences can use" in w for w in more.warnings), more.warnings


@pytest.mark.parametrize("server,extra", [("sglang", {"kt_num_gpu_experts": 0}),
                                          ("legacy", {"gguf_path": "/models/gguf", "max_batch_size": 3})])
def test_ktransformers_cache_is_capped_by_the_models_context(server, extra):
    engine = {"kind": "ktransformers", "server": server, "max_batch_size": 1 if server == "sglang" else 3, **extra}
    result = plan(spec(engine, R1, quantization="awq" if server == "sglang" else "q4_k_m",
                       placement={"devices": [0], "experts": "cpu"}), card(192))
    assert result.fits, result.reasons
    batch = result.params["max_batch_size"]
    assert result.params["cache_lens"] == 163840 * batch
    if server == "sglang":
        assert result.params["context_length"] == 163840


def test_an_explicit_max_kv_tokens_above_the_context_is_capped_and_said(qwen):
    result = plan(spec({"kind": "torch", "max_batch_size": 2}, qwen, plan={"max_kv_tokens": 1 << 20}), card(80))
    assert result.kv_tokens == 32768 * 2 and result.params["context_tokens"] == 32768
    assert "capped at the model's context 32768 x 2 sequences" in sizing(result)


def test_a_min_kv_tokens_the_model_cannot_use_is_refused_naming_both(qwen):
    result = plan(spec({"kind": "torch", "max_batch_size": 1}, qwen, plan={"min_kv_tokens": 65536}), card(80))
    assert not result.fits
    assert any("plan.min_kv_tokens 65536 is more than the model can use" in r for r in result.reasons), result.reasons


def test_without_a_known_context_the_plan_says_so():
    no_positions = ModelSpec.model_validate({
        "name": "m", "engine": {"kind": "torch", "model_path": "/models/m"},
        "architecture": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "vocab_size": 512},
        "plan": {"max_kv_tokens": 4096}})
    result = plan(no_positions, card(16))
    assert result.kv_tokens == 4096
    assert "no context limit known" in sizing(result) and "capped by plan.max_kv_tokens 4096" in sizing(result)
