"""Each engine's memory model on the findings of issue 17 and on settings the calibration rows do
not cover: MoE configs, tensor and pipeline parallelism, SGLang's fraction, llama.cpp's host
embedding and compute buffer, vLLM's sampler, capture sizes and eager mode."""

from types import SimpleNamespace

import pytest

from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.config.schema import parse_config
from lessor.daemon.errors import ConfigError
from lessor.engines.base import GpuTarget
from lessor.engines.sglang import launch_fraction
from lessor.engines.vllm import CUDA_CONTEXT, VLLMEngineArgs, capture_sizes, stage_layers
from lessor.memory.footprint import Source

from ..support.paths import FIXTURES

GiB = 1 << 30


def spec(fixture: str, kind: str = "vllm", devices: int = 1, **engine) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": {"kind": kind, "model_path": "/m", **engine},
                                     "architecture": {"hf_config": str(FIXTURES / f"{fixture}.json")},
                                     "placement": {"devices": list(range(devices))}})


def components(s: ModelSpec, device: int = 0) -> dict:
    return {c.name: c for c in s.profile().components[device]}


# -- MoE configs are read with their experts ----------------------------------------------------

def test_a_qwen3_moe_config_gets_the_weights_vllm_loaded():
    weights = spec("qwen3-30b-a3b").profile().weights
    assert weights == pytest.approx(56.88 * GiB, rel=0.01)  # "Model loading took 56.88 GiB" (vLLM 0.19, H100)


# -- tensor and pipeline parallelism -----------------------------------------------------------

def test_mla_keeps_the_whole_latent_on_every_gpu():
    # vLLM measured 31 106 B/token per GPU for DeepSeek-V2-Lite at tp 1 and at tp 2 (issue 17).
    for devices in (1, 2):
        for kind in ("vllm", "sglang"):
            memory = spec("deepseek-v2-lite", kind, devices).profile()
            assert [d.cache_rate for d in memory.devices] == [27 * 576 * 2] * devices


def test_fewer_kv_heads_than_gpus_replicates_heads():
    # Qwen2.5-7B has 4 KV heads: at tp 8 each GPU keeps one (vLLM and SGLang), not half of one.
    for kind in ("vllm", "sglang"):
        memory = spec("qwen2.5-7b", kind, 8).profile()
        assert {d.cache_rate for d in memory.devices} == {28 * 1 * 128 * 2 * 2}
    assert spec("qwen2.5-7b", "vllm", 2).profile().devices[0].cache_rate == 28 * 2 * 128 * 2 * 2


def test_pipeline_stages_hold_their_layers_and_the_embedding_where_vllm_puts_it():
    assert stage_layers(32, 2) == [16, 16] and stage_layers(30, 4) == [7, 8, 8, 7]  # the remainder skips the last
    llama = spec("llama-3.1-8b", devices=2, pipeline_parallel_size=2).profile()
    assert [d.cache_rate for d in llama.devices] == [16 * 8 * 128 * 2 * 2] * 2
    # Untied: embed_tokens on the first stage, lm_head on the last: each holds one of them.
    assert abs(llama.devices[0].weights - llama.devices[1].weights) < 0.01 * llama.devices[0].weights
    gemma = spec("gemma-2-9b", devices=2, pipeline_parallel_size=2).profile()  # tied: both stages build it
    one = spec("gemma-2-9b").profile().weights
    assert gemma.weights == pytest.approx(one + 256000 * 3584 * 2, rel=0.005)


def test_a_pipeline_size_that_does_not_divide_the_gpus_is_refused():
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "engine": {"kind": "vllm", "model_path": "/m", "pipeline_parallel_size": 2},
                                  "memory": {"weights": "1GiB", "kv_bytes_per_token": 1024},
                                  "placement": {"devices": [0, 1, 2]}}]})
    assert "engine.pipeline_parallel_size: 2 does not divide the placement's 3 GPUs" in str(info.value)


# -- vLLM on settings the calibration does not cover ----------------------------------------

def test_vllm_sampler_rows_follow_max_num_seqs():
    wide = components(spec("llama-3.1-8b", max_num_seqs=1024))["activation"]
    narrow = components(spec("llama-3.1-8b", max_num_seqs=4))["activation"]
    assert wide.source == Source.FORMULA and wide.bytes == pytest.approx(1.89 * GiB, rel=0.02)
    # Four rows of logits weigh nothing: the forward pass of 8192 tokens is the peak (an estimate).
    assert narrow.bytes < 0.65 * wide.bytes and narrow.source == Source.ESTIMATE


def test_vllm_activation_follows_max_num_batched_tokens():
    big = components(spec("qwen3-30b-a3b", max_num_batched_tokens=8192))["activation"].bytes
    small = components(spec("qwen3-30b-a3b", max_num_batched_tokens=2048))["activation"].bytes
    assert small < big - 0.3 * GiB  # the fused-MoE workspace is linear in the batched tokens


def test_vllm_capture_sizes_and_eager_mode():
    assert capture_sizes(512)[:5] == [1, 2, 4, 8, 16] and len(capture_sizes(512)) == 51
    assert VLLMEngineArgs(kind="vllm", model_path="/m", max_num_seqs=4).graph_largest(4) == 8
    few = components(spec("llama-3.1-8b", max_num_seqs=4))["cuda_graphs"].bytes
    many = components(spec("llama-3.1-8b", max_num_seqs=1024))["cuda_graphs"].bytes
    assert few < many
    assert components(spec("llama-3.1-8b", enforce_eager=True))["cuda_graphs"].bytes == 0


def test_vllm_counts_its_cuda_context_and_nccl():
    one = components(spec("llama-3.1-8b"))
    assert one["cuda_context"].bytes == CUDA_CONTEXT and "nccl" not in one
    two = components(spec("llama-3.1-8b", devices=2))
    assert two["nccl"].source == Source.CONSTANT and two["non_torch_forward"].bytes > one["non_torch_forward"].bytes


# -- SGLang's fraction of what is free at launch ---------------------------------------------

def launch(free: int, total: int = 24 * GiB) -> SimpleNamespace:
    return SimpleNamespace(gpus=(GpuTarget("gpu0", 0, "GPU-0", total, free),))


def test_sglang_fraction_reproduces_the_published_pool():
    """RTX 3090 log (jerryzsj/my-deepseek-r1): 22.76 GiB free at start after the context, weights
    14.39 GiB, K + V 5.64 GiB. The fraction lessor passes for that pool gives at least it."""
    weights, pool, free_after_context = 14.39 * GiB, 5.64 * GiB, 22.76 * GiB
    m = launch_fraction(int(weights + pool), launch(int(free_after_context + CUDA_CONTEXT)))
    assert m == pytest.approx(0.88, abs=0.002)  # the log's own --mem-fraction-static
    assert m * free_after_context - weights >= pool


def test_sglang_fraction_grows_when_the_card_is_shared():
    alone, shared = launch_fraction(10 * GiB, launch(24 * GiB)), launch_fraction(10 * GiB, launch(16 * GiB))
    assert shared > alone and shared * (16 * GiB - CUDA_CONTEXT) >= 10 * GiB


# -- llama.cpp ---------------------------------------------------------------------------------

def test_llamacpp_keeps_token_embd_in_host_ram():
    s = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf"},
                                  "architecture": {"hf_config": str(FIXTURES / "llama-3.1-8b.json")},
                                  "quantization": "q4_k_m"})
    memory = s.profile()
    assert memory.host_weights == pytest.approx(281.8 * (1 << 20), rel=0.01)  # "CPU model buffer 281.8 MiB"
    assert memory.weights == pytest.approx(4403.5 * (1 << 20), rel=0.03)  # "CUDA0 model buffer 4403.5 MiB"


def test_llamacpp_compute_buffer_grows_with_the_context_without_flash_attention():
    def buffer(**engine):
        s = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf", **engine},
                                      "architecture": {"hf_config": str(FIXTURES / "llama-3.1-8b.json")},
                                      "quantization": "q4_k_m"})
        return next(c for c in s.profile().components[0] if c.name == "compute_buffer")
    on, off = buffer(flash_attn="on"), buffer(flash_attn="off", parallel=4, kv_unified=True)
    assert on.per_kv_token == 512 * 2  # the f16 mask only
    assert off.per_kv_token == 512 * (32 * 4 + 4)  # KQ of 32 heads and the f32 mask, per context token
    assert on.bytes + on.per_kv_token * 8192 < off.bytes + off.per_kv_token * 8192


def test_llamacpp_sliding_window_layers_keep_a_window_not_the_context():
    s = ModelSpec.model_validate({"name": "g", "engine": {"kind": "llamacpp", "model_path": "/m.gguf", "parallel": 1},
                                  "architecture": {"hf_config": str(FIXTURES / "gemma-2-9b.json")},
                                  "quantization": "q4_k_m"})
    parts = {c.name: c for c in s.profile().components[0]}
    per_layer = 8 * 256 * 2 * 2  # Gemma 2 9B: 8 KV heads of 256, K and V in f16
    assert s.profile().devices[0].cache_rate == 21 * per_layer  # the 21 global layers grow with the context
    assert parts["kv_sliding_window"].bytes == 21 * 4608 * per_layer  # one slot: pad256(4096 + 512) cells


# -- config.json refusals reach the operator by field ------------------------------------------

def test_a_multimodal_config_is_refused_by_name():
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "g", "engine": {"kind": "vllm", "model_path": "/m"},
                                  "architecture": {"hf_config": str(FIXTURES / "gemma-3-12b-it.json")}}]})
    assert "vision_config" in str(info.value) and "models[0]" in str(info.value)


def test_a_quantized_checkpoint_sets_the_weight_format(tmp_path):
    import json
    config = json.loads((FIXTURES / "qwen2.5-7b.json").read_text())
    (tmp_path / "gptq.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (tmp_path / "ct.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "compressed-tensors"}}))
    gptq = ModelSpec.model_validate({"name": "q", "engine": {"kind": "vllm", "model_path": "/m"},
                                     "architecture": {"hf_config": str(tmp_path / "gptq.json")}})
    assert gptq.quantization == "gptq"
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "q", "engine": {"kind": "vllm", "model_path": "/m"},
                                  "architecture": {"hf_config": str(tmp_path / "ct.json")}}]})
    assert "quantization: config.json's quantization_config is 'compressed-tensors'" in str(info.value)


# -- review follow-ups -------------------------------------------------------------------------

def test_llamacpp_sliding_window_cache_follows_the_planned_slots():
    def swa(**engine):
        s = ModelSpec.model_validate({"name": "g", "engine": {"kind": "llamacpp", "model_path": "/m.gguf", **engine},
                                      "architecture": {"hf_config": str(FIXTURES / "gemma-2-9b.json")},
                                      "quantization": "q4_k_m"})  # plan.max_batch_size 4: four slots planned
        return next(c for c in s.profile().components[0] if c.name == "kv_sliding_window").bytes
    per_layer = 8 * 256 * 2 * 2
    assert swa() == 21 * 4 * 4608 * per_layer  # a stream per slot: pad256(4096 + 512) cells each
    assert swa(kv_unified=True) == 21 * 16896 * per_layer  # one stream: pad256(4096 x 4 + 512)


def test_8_bit_gptq_is_not_planned_as_4_bit(tmp_path):
    import json
    config = json.loads((FIXTURES / "qwen2.5-7b.json").read_text())
    (tmp_path / "g8.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 8}}))
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "q", "engine": {"kind": "vllm", "model_path": "/m"},
                                  "architecture": {"hf_config": str(tmp_path / "g8.json")}}]})
    assert "'gptq-8bit'" in str(info.value) and "quantization" in str(info.value)


def test_float32_dtype_counts_four_bytes_a_weight():
    assert spec("llama-3.1-8b", dtype="float32").profile().weights == \
        pytest.approx(2 * spec("llama-3.1-8b").profile().weights, rel=0.01)
    torch = ModelSpec.model_validate({"name": "t", "engine": {"kind": "torch", "model_path": "/m", "dtype": "float32"},
                                      "architecture": {"hf_config": str(FIXTURES / "qwen2.5-7b.json")}})
    assert torch.profile().weights == pytest.approx(7.6e9 * 4, rel=0.01)


def test_a_disabled_host_pool_leases_no_host_ram():
    from lessor.daemon.planning.planner import plan
    from lessor.policies import DeviceBudget
    s = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf"},
                                  "architecture": {"hf_config": str(FIXTURES / "llama-3.1-8b.json")},
                                  "quantization": "q4_k_m"})
    result = plan(s, {"gpu0": DeviceBudget("gpu0", 24 * GiB, 24 * GiB, GiB, 0, 0)})
    assert result.fits and {w.device for w in result.all_leases()} == {"gpu0"}


def test_llamacpp_tensor_split_matches_the_modelled_layers():
    from lessor.engines.llamacpp import tensor_split
    a = spec("llama-3.1-8b").architecture
    # 32 layers on 2 GPUs: 16 each, the output counted as layer 33 on the last (load_tensors' split).
    assert tensor_split(a, 2) == "16,17" and tensor_split(None, 3) == "1,1,1"
    s = ModelSpec.model_validate({"name": "l", "engine": {"kind": "llamacpp", "model_path": "/m.gguf"},
                                  "architecture": {"hf_config": str(FIXTURES / "llama-3.1-8b.json")},
                                  "quantization": "q4_k_m", "placement": {"devices": [0, 1]}})
    first, last = s.profile().devices
    assert first.cache_rate == last.cache_rate == 16 * 8 * 128 * 2 * 2
    assert last.weights > first.weights  # the output layer


def test_a_concurrency_goal_leases_the_workspace_of_the_batch_it_passes():
    from lessor.daemon.planning.planner import plan
    from lessor.policies import DeviceBudget
    s = ModelSpec.model_validate({"name": "m", "engine": {"kind": "vllm", "model_path": "/m"},
                                  "architecture": {"hf_config": str(FIXTURES / "llama-3.1-8b.json")},
                                  "plan": {"goal": "concurrency", "context_tokens": 1024}})
    result = plan(s, {"gpu0": DeviceBudget("gpu0", 80 * GiB, 80 * GiB, GiB, 0, 0)})
    batch = result.params["max_num_seqs"]
    assert batch > 4 and result.params["max_cudagraph_capture_size"] == min(2 * batch, 512)
    fixed = spec("llama-3.1-8b", max_num_seqs=batch).profile().activation  # the workspace at that batch
    reserve = next(w.bytes for w in result.steady_leases if w.kind.value == "reserve")
    assert reserve >= fixed


def test_ktransformers_sglang_plans_fewer_gpu_experts_on_a_smaller_budget():
    """--kt-num-gpu-experts is per MoE layer (kt_ep_wrapper.py:4606, sglang-kt 0.7.2): what fits
    beside the weights that always go to the GPU and the pool, and fewer when less is left."""
    from lessor.engines.ktransformers import KTransformersEngineArgs, routed_rank_bytes
    from lessor.memory.architecture import Architecture
    from lessor.memory.footprint import ModelShape, Part
    r1 = Architecture.model_validate({
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280})
    shape = ModelShape(r1, "awq", "bf16", True, 1, 4)
    args = KTransformersEngineArgs(kind="ktransformers", model_path="/m", kt_weight_path="/kt")
    assert args.server == "sglang"
    base = args.with_gpu_experts(shape, 0, 8192)
    assert base.kt_num_gpu_experts == 0
    need = sum(c.bytes for c in base.footprint(shape).devices[0].components)
    need += int(8192 * base.footprint(shape).devices[0].kv_rate)
    one = routed_rank_bytes(shape, 1)  # one expert in each of the 58 MoE layers
    big, small = (args.with_gpu_experts(shape, need + n * one + one // 2, 8192).kt_num_gpu_experts for n in (6, 2))
    assert (big, small) == (6, 2)
    six = args.model_copy(update={"kt_num_gpu_experts": 6})
    assert six.footprint(shape).devices[0].total(Part.WEIGHTS) - base.footprint(shape).devices[0].total(Part.WEIGHTS) \
        == routed_rank_bytes(shape, 6)
    host = six.footprint(shape).host[0]
    assert host.name == "host_weights" and host.bytes > 300 * 2**30  # 256 x 58 experts at ~4.5 bits
    assert args.model_copy(update={"kt_num_gpu_experts": 3}).with_gpu_experts(shape, 0, 8192).kt_num_gpu_experts == 3


def test_ktransformers_config_errors_name_the_field():

    from pydantic import ValidationError

    from lessor.engines.ktransformers import KTransformersEngineArgs
    with pytest.raises(ValidationError) as legacy:
        KTransformersEngineArgs.model_validate({"kind": "ktransformers", "model_path": "/m", "server": "legacy"})
    assert legacy.value.errors()[0]["loc"] == ("gguf_path",) and "server: legacy" in str(legacy.value)
    with pytest.raises(ValidationError) as cache:
        KTransformersEngineArgs.model_validate({"kind": "ktransformers", "model_path": "/m", "gguf_path": "/g",
                                                "cache_lens": 200})
    assert cache.value.errors()[0]["loc"] == ("cache_lens",)
    # the same value is fine for SGLang's --max-total-tokens (no page rule there)
    assert KTransformersEngineArgs.model_validate({"kind": "ktransformers", "model_path": "/m", "cache_lens": 1000}).cache_lens == 1000
    with pytest.raises(ValidationError) as method:
        KTransformersEngineArgs.model_validate({"kind": "ktransformers", "model_path": "/m", "kt_method": "AMX"})
    assert method.value.errors()[0]["loc"] == ("kt_method",)
