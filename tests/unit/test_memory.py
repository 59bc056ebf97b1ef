"""The memory model's numbers, pinned against published figures and hand-computed formulas."""

import pytest

from lessor.engines.memory_model import chunk_activation, dequant_peak
from lessor.memory.architecture import Architecture, read_hf_config
from lessor.memory.params import param_counts
from lessor.memory.weights import kv_bytes_per_token, paged_tokens, split_weights

from ..support.paths import FIXTURES


def arch(name: str) -> Architecture:
    return Architecture(**read_hf_config(FIXTURES / f"{name}.json"))


# Published totals: Qwen2.5-7B 7.61B, Llama-3-8B 8.03B, Mistral-7B 7.24B, DeepSeek-V3/R1 671B
# (without the MTP module), DeepSeek-V2-Lite 15.7B.
@pytest.mark.parametrize("name,published", [
    ("qwen2.5-7b", 7.61e9), ("llama-3-8b", 8.03e9), ("mistral-7b", 7.24e9),
    ("deepseek-r1", 671e9), ("deepseek-v2-lite", 15.7e9),
])
def test_parameter_counts_match_the_published_totals_within_one_percent(name, published):
    total = param_counts(arch(name)).total
    assert abs(total - published) / published < 0.01, total


@pytest.mark.parametrize("name,expected", [
    ("qwen2.5-7b", 2 * 28 * 4 * 128 * 2),  # 57 344
    ("llama-3-8b", 2 * 32 * 8 * 128 * 2),  # 131 072
    ("mistral-7b", 2 * 32 * 8 * 128 * 2),
    ("deepseek-r1", 61 * (512 + 64) * 2),  # 70 272: MLA latent + shared rotary key
    ("deepseek-v2-lite", 27 * (512 + 64) * 2),
])
def test_kv_bytes_per_token(name, expected):
    assert kv_bytes_per_token(arch(name)) == expected


def test_kv_figures_of_the_issue():
    assert kv_bytes_per_token(arch("qwen2.5-7b")) == 57_344
    assert kv_bytes_per_token(arch("deepseek-r1")) == 70_272
    assert kv_bytes_per_token(arch("qwen2.5-7b"), "fp8") == 28_672


def test_paged_caches_round_up_to_whole_pages():
    assert paged_tokens(28_000, 256) == 28_160
    assert paged_tokens(28_160, 256) == 28_160


def weights(a: Architecture, fmt: str) -> int:
    return sum(split_weights(param_counts(a), fmt, False))


def test_bf16_weights_are_two_bytes_per_parameter():
    a = arch("qwen2.5-7b")
    assert weights(a, "bf16") == pytest.approx(param_counts(a).total * 2, rel=1e-9)


def test_formats_scale_weights():
    a = arch("llama-3-8b")
    bf16, awq, q8 = (weights(a, f) for f in ("bf16", "awq", "q8_0"))
    # int4 linears; the 1.05B embedding + lm_head parameters stay bf16: 5.73 GB, as AWQ checkpoints are
    assert 5.6e9 < awq < 5.8e9 and 0.35 < awq / bf16 < 0.36
    assert q8 / bf16 == pytest.approx(8.5 / 16, rel=0.01)


def test_hybrid_placement_puts_routed_experts_and_embeddings_in_host_ram():
    a = arch("deepseek-r1")
    p = param_counts(a)
    assert p.routed_experts == 58 * 256 * 3 * 7168 * 2048
    gpu, embed, experts = split_weights(p, "q4_k_m", True)
    assert experts + embed == int(p.routed_experts * 4.89 / 8) + int(p.embedding * 4.5 / 8)
    assert 9 * 2**30 < gpu < 11 * 2**30  # attention, shared experts, dense MLPs, lm_head


def test_load_peak_is_the_lm_head_dequantized_on_the_gpu():
    a = arch("deepseek-r1")
    assert param_counts(a).lm_head == 129_280 * 7_168 == 926_679_040
    assert dequant_peak(param_counts(a), "q4_k_m") == 926_679_040 * 2  # 1.85 GB in bf16
    assert dequant_peak(param_counts(a), "q4_k_m", "fp32") == 926_679_040 * 4  # 3.7 GB


def test_the_generic_activation_estimate_grows_with_the_chunk():
    a = arch("deepseek-r1")
    assert chunk_activation(a, 256, 3) > chunk_activation(a, 128, 3)


def test_bad_architectures_are_refused():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        Architecture(hidden_size=64, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=4,
                     intermediate_size=128, vocab_size=10)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        Architecture(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                     vocab_size=10, n_routed_experts=8)


def test_llamacpp_cache_types_set_the_kv_size():
    a = arch("llama-3-8b")
    assert kv_bytes_per_token(a, k_v_bytes=(2, 2)) == 131_072
    assert kv_bytes_per_token(a, k_v_bytes=(34 / 32, 34 / 32)) == 69_632  # q8_0: 8.5 bits per element
    assert kv_bytes_per_token(a, k_v_bytes=(34 / 32, 2)) == 32 * 8 * 128 * (34 / 32 + 2)


def test_the_config_applies_llamacpp_cache_types():
    from lessor.daemon.config.model_spec import ModelSpec
    spec = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf",
                                                             "cache_type_k": "q8_0", "cache_type_v": "q8_0"},
                                     "architecture": {"hf_config": str(FIXTURES / "llama-3-8b.json")},
                                     "quantization": "q4_k_m"})
    assert spec.profile().devices[0].cache_rate == 69_632


def test_explicit_memory_fields_override_the_model():
    from lessor.daemon.config.model_spec import ModelSpec
    spec = ModelSpec.model_validate({"name": "q", "engine": {"kind": "vllm", "model_path": "/m"},
                                     "architecture": {"hf_config": str(FIXTURES / "qwen2.5-7b.json")},
                                     "memory": {"load_peak": "3GiB", "activation": "2GiB"}})
    profile = spec.profile()
    assert profile.load_peak == 3 << 30 and profile.activation == 2 << 30
    assert profile.kv_bytes_per_token == 57_344 and profile.estimated == ()


def test_unreadable_hf_config_is_a_config_error(tmp_path):
    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "q", "engine": {"kind": "vllm", "model_path": "/m"},
                                  "architecture": {"hf_config": str(tmp_path / "missing.json")}}]})
    assert "architecture.hf_config: cannot read" in str(info.value) and "models[0]" in str(info.value)
