"""A config.json read completely: each family's published config gives its published parameter
total, its MoE and sliding-window layers; a key lessor does not model is refused by name."""

import json

import pytest

from lessor.memory.architecture import Architecture, UnsupportedConfig, from_hf_config, read_hf_config
from lessor.memory.params import param_counts

from ..support.paths import FIXTURES


def raw(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def arch(name: str) -> Architecture:
    return Architecture(**read_hf_config(FIXTURES / f"{name}.json"))


def read(config: dict) -> Architecture:
    return Architecture(**from_hf_config(config))


def gemma3_12b_text() -> Architecture:
    return read(raw("gemma-3-12b-it")["text_config"])


PUBLISHED = [
    ("llama-3-8b", 8.03e9),  # Hub safetensors count of Meta-Llama-3-8B: 8.03B
    ("llama-3.1-8b", 8.03e9),  # Hub safetensors count of Llama-3.1-8B: 8.03B
    ("qwen2.5-7b", 7.61e9),  # model card: "Number of Parameters: 7.61B"
    ("qwen3-8b", 8.2e9),  # model card: "Number of Parameters: 8.2B"
    ("qwen3-30b-a3b", 30.5e9),  # model card: "30.5B in total and 3.3B activated"
    ("qwen1.5-moe-a2.7b", 14.3e9),  # model card: "14.3B parameters in total and 2.7B activated"
    ("mixtral-8x7b", 46.7e9),  # Mistral's announcement: "46.7B total parameters"
    ("deepseek-v2-lite", 15.7e9),  # model card: "15.7B total parameters"
    ("deepseek-v3", 671e9),  # model card: "671B total parameters" (685B on the Hub = 671B + 14B MTP)
    ("deepseek-r1", 671e9),
    ("mistral-7b", 7.24e9),  # Mistral-7B-v0.1 paper: 7.24B
    ("mistral-7b-v0.3", 7.25e9),  # Hub safetensors count (the card gives none): 7.25B
    ("phi-3-mini-4k", 3.8e9),  # model card: "3.8B parameters"
    ("phi-4", 14.7e9),  # Hub safetensors count: 14.7B (the card rounds to "14B")
    ("granite-3.1-8b", 8.17e9),  # Hub safetensors count: 8.17B
    ("gemma-2-9b", 9.24e9),  # Gemma 2 report, Table 1: 917,504,000 embedding + 8,324,201,984 non-embedding
    ("gemma-3-1b-it", 1.0e9),  # Gemma 3 report, Table 1: 302M embedding + 698M non-embedding
]


@pytest.mark.parametrize("name,published", PUBLISHED)
def test_parameter_totals_match_the_published_ones_within_one_percent(name, published):
    total = param_counts(arch(name)).total
    assert abs(total - published) / published < 0.01, total


def test_gemma3_text_part_matches_the_report():
    # Gemma 3 report, Table 1, 12B: 1,012M embedding + 10,759M non-embedding (the 417M vision encoder apart)
    assert param_counts(gemma3_12b_text()).total == pytest.approx(11.771e9, rel=0.01)


@pytest.mark.parametrize("name", [n for n, _ in PUBLISHED])
def test_layers_add_up_to_the_total(name):
    p = param_counts(arch(name))
    assert len(p.layers) == arch(name).num_hidden_layers
    assert p.embedding + p.lm_head + sum(p.layers) + p.final_norm == p.total


def test_moe_configs_count_every_expert():
    a, p = arch("qwen3-30b-a3b"), param_counts(arch("qwen3-30b-a3b"))
    assert a.n_routed_experts == 128 and a.moe_intermediate_size == 768 and a.dim_per_head == 128
    assert a.moe_layers == 48 and a.n_shared_experts == 0 and a.shared_expert_intermediate_size == 0
    assert p.routed_experts == 48 * 128 * 3 * 2048 * 768  # 29.0B: not a ~6B dense reading
    assert p.dense_mlp == 0 and p.shared_experts == 0


def test_qwen2_moe_has_one_gated_shared_expert_and_qkv_biases():
    a, p = arch("qwen1.5-moe-a2.7b"), param_counts(arch("qwen1.5-moe-a2.7b"))
    assert a.shared_expert_intermediate_size == 5632 and a.attention_bias and a.n_routed_experts == 60
    assert p.shared_experts == 24 * (3 * 2048 * 5632 + 2048)  # the expert and its gate


def test_mixtral_experts_are_as_wide_as_its_mlp():
    a = arch("mixtral-8x7b")
    assert (a.n_routed_experts, a.moe_intermediate_size, a.num_experts_per_tok, a.moe_layers) == (8, 14336, 2, 32)


def test_deepseek_v3_leaves_the_mtp_layer_out_and_reads_fp8():
    a, p = arch("deepseek-v3"), param_counts(arch("deepseek-v3"))
    assert a.num_nextn_predict_layers == 1 and a.quantization_method == "fp8"
    assert [a.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert p.router == 58 * (256 * 7168 + 256)  # with e_score_correction_bias
    assert p.total + p.mtp == pytest.approx(685e9, rel=0.01)  # the Hub's 685B checkpoint


def test_moe_layer_rules():
    base = raw("qwen3-30b-a3b")
    a = read({**base, "decoder_sparse_step": 2, "mlp_only_layers": [1, 47]})
    assert [i for i in range(48) if a.is_moe_layer(i)][:3] == [3, 5, 7] and a.moe_layers == 22
    dense = param_counts(a).dense_mlp
    assert dense == 26 * 3 * 2048 * 6144  # the dense layers use intermediate_size
    lite = arch("deepseek-v2-lite")
    assert not lite.is_moe_layer(0) and lite.is_moe_layer(1) and lite.moe_layers == 26


@pytest.mark.parametrize("name,sliding,window", [
    ("llama-3.1-8b", 0, None), ("qwen2.5-7b", 0, None), ("qwen3-8b", 0, None),
    ("qwen3-30b-a3b", 0, None), ("qwen1.5-moe-a2.7b", 0, None),  # use_sliding_window false: none
    ("mixtral-8x7b", 0, None), ("mistral-7b-v0.3", 0, None), ("phi-4", 0, None), ("deepseek-v3", 0, None),
    ("mistral-7b", 32, 4096),  # v0.1: 4096 on every layer
    ("phi-3-mini-4k", 32, 2047),
    ("gemma-2-9b", 21, 4096),  # every other layer
    ("gemma-3-1b-it", 22, 512),  # 5 local : 1 global over 26 layers
])
def test_sliding_window_layers_per_family(name, sliding, window):
    a = arch(name)
    assert (a.sliding_layers, a.sliding_window) == (sliding, window)


def test_sliding_layer_patterns():
    g2 = arch("gemma-2-9b")
    assert [g2.is_sliding_layer(i) for i in range(4)] == [True, False, True, False]
    g3 = gemma3_12b_text()
    assert g3.sliding_layers == 40 and g3.sliding_window == 1024  # 48 layers, sliding_window_pattern 6
    assert [i for i in range(48) if not g3.is_sliding_layer(i)][:2] == [5, 11]
    qwen = read({**raw("qwen2.5-7b"), "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20})
    assert qwen.sliding_layers == 8 and not qwen.is_sliding_layer(19) and qwen.is_sliding_layer(20)
    types = ["sliding_attention", "full_attention"] * 13
    assert read({**raw("gemma-3-1b-it"), "layer_types": types}).sliding_layers == 13


def test_family_defaults_for_absent_keys():
    g3 = gemma3_12b_text()  # Gemma3TextConfig: head_dim 256, vocab 262208, tied, q/k norms, 4 norms a layer
    assert (g3.dim_per_head, g3.vocab_size, g3.tie_word_embeddings, g3.qk_norm, g3.norms_per_layer) == \
        (256, 262_208, True, True, 4)
    assert arch("gemma-2-9b").tie_word_embeddings  # Gemma2Config ties by default: no key in the file
    assert param_counts(arch("gemma-2-9b")).lm_head == 0
    assert arch("granite-3.1-8b").tie_word_embeddings and not arch("llama-3.1-8b").tie_word_embeddings
    assert arch("qwen2.5-7b").attention_bias and not arch("qwen3-8b").attention_bias and arch("qwen3-8b").qk_norm
    assert read({k: v for k, v in raw("mistral-7b-v0.3").items() if k != "sliding_window"}).sliding_window == 4096


def test_phi3_fused_projections_count_as_separate_ones():
    a = arch("phi-3-mini-4k")
    assert a.fused_gate_up and param_counts(a).dense_mlp == 32 * 3 * 3072 * 8192


# --- refusals ------------------------------------------------------------------------------------

def refused(config: dict, key: str) -> str:
    with pytest.raises(UnsupportedConfig) as err:
        from_hf_config(config)
    assert err.value.key == key and f"'{key}'" in str(err.value), str(err.value)
    return str(err.value)


def test_multimodal_gemma3_is_refused_with_the_way_out():
    message = refused(raw("gemma-3-12b-it"), "vision_config")
    assert "text_config" in message and "memory.weights" in message


def test_an_audio_tower_is_refused():
    refused({**raw("qwen2.5-7b"), "audio_config": {"d_model": 1280}}, "audio_config")


@pytest.mark.parametrize("base", ["qwen3-30b-a3b", "llama-3.1-8b"])
def test_an_invented_expert_key_is_refused_by_name(base):
    refused({**raw(base), "num_experts_shared_v9": 2}, "num_experts_shared_v9")


def test_an_unknown_model_type_is_read_when_every_key_is_understood():
    a = read({**raw("llama-3.1-8b"), "model_type": "llama_next", "architectures": ["LlamaNextForCausalLM"]})
    assert param_counts(a).total == param_counts(arch("llama-3.1-8b")).total


def test_an_unknown_model_type_with_unknown_keys_is_refused_naming_them():
    config = {**raw("llama-3.1-8b"), "model_type": "newthing", "fancy_scale": 2.0, "moe_every": 2}
    message = refused(config, "moe_every")  # the memory-shaped one first
    assert "fancy_scale" in message
    refused({**raw("llama-3.1-8b"), "model_type": "newthing", "hidden_act": "gelu"}, "hidden_act")


@pytest.mark.parametrize("key,value", [
    ("linear_num_key_heads", 16), ("mamba_d_state", 16), ("ssm_state_size", 128), ("full_attention_interval", 4),
    ("lora_rank", 8), ("sliding_window_pattern", 4), ("moe_layer_freq", 2),
])
def test_linear_attention_state_space_and_other_shapes_are_refused(key, value):
    refused({**raw("qwen3-8b"), key: value}, key)


def test_a_layer_pattern_lessor_does_not_understand_is_refused():
    types = ["sliding_attention", "linear_attention"] * 13
    refused({**raw("gemma-3-1b-it"), "layer_types": types}, "layer_types")
    refused({**raw("qwen1.5-moe-a2.7b"), "use_sliding_window": True}, "use_sliding_window")
    refused({**raw("mistral-7b-v0.3"), "layer_types": ["full_attention"] * 32}, "layer_types")


def test_biases_lessor_does_not_model_are_refused():
    refused({**raw("llama-3.1-8b"), "mlp_bias": True}, "mlp_bias")
    refused({**raw("llama-3.1-8b"), "attention_bias": True}, "attention_bias")  # biases o_proj too


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors", "gptq", "awq"])
def test_known_quantization_methods_are_recorded(method):
    config = {**raw("llama-3.1-8b"), "quantization_config": {"quant_method": method, "bits": 4}}
    assert read(config).quantization_method == method


def test_an_unknown_quantization_method_is_refused():
    config = {**raw("llama-3.1-8b"), "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    assert "'bitsandbytes'" in refused(config, "quantization_config.quant_method")


def test_deepseek_v2_as_transformers_5_writes_it():
    # DeepseekV2Config saves its derived qk_head_dim (nope + rope) and head_dim = qk_rope_head_dim.
    config = {**json.loads((FIXTURES / "deepseek-v2-lite.json").read_text()), "qk_head_dim": 192, "head_dim": 64}
    a = Architecture(**from_hf_config(config))
    assert a == Architecture(**read_hf_config(FIXTURES / "deepseek-v2-lite.json"))
    with pytest.raises(UnsupportedConfig, match="qk_head_dim"):
        from_hf_config({**config, "qk_head_dim": 128})
