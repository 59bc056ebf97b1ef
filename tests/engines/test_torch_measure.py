"""The built-in torch engine measured for real on this CPU against lessor's memory model (the
profile the planner leases from), and MLA (DeepSeek-V2) through the engine's static cache.

The engine processes are started through the adapter and waited on through their own state
(bench/torch_measure.py, which bench/accuracy.py's table runs too)."""

import asyncio

import pytest

from bench import torch_measure
from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.planning.kv_sizing import kv_bytes

CASES = range(len(torch_measure.KV_CASES))


@pytest.fixture(scope="module")
def measurements(measure_model, tmp_path_factory):
    return asyncio.run(torch_measure.measure_all(measure_model, tmp_path_factory.mktemp("runs")))


def error(predicted: int, measured: int) -> float:
    return (predicted - measured) / measured * 100


def test_the_model_is_large_enough_to_measure(measurements):
    assert all(m.ready["weights_tensor_bytes"] >= 256e6 for m in measurements)
    assert {(m.context_tokens, m.max_batch_size) for m in measurements} == set(torch_measure.KV_CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda i: "ctx{}xbatch{}".format(*torch_measure.KV_CASES[i]))
def test_predicted_weights_and_kv_within_3_percent_of_measured(measurements, case):
    m = measurements[case]
    assert abs(error(m.predicted_weights, m.measured_weights)) <= 3, (m.predicted_weights, m.measured_weights)
    assert abs(error(m.predicted_kv, m.measured_kv)) <= 3, (m.predicted_kv, m.measured_kv)


@pytest.mark.parametrize("case", CASES, ids=lambda i: "ctx{}xbatch{}".format(*torch_measure.KV_CASES[i]))
def test_the_engine_reports_each_phase_it_measured(measurements, case):
    m = measurements[case]
    loaded, ready = m.loaded["measured"], m.ready["measured"]
    assert m.loaded["phase"] == "weights_loaded" and m.ready["phase"] == "ready"
    assert loaded["kv_bytes"] is None and loaded["baseline_bytes"] > 0 and loaded["weights_bytes"] > 0
    assert ready["baseline_bytes"] == loaded["baseline_bytes"] and ready["weights_bytes"] == loaded["weights_bytes"]
    # The static cache is exactly what the planner leases for it, tensor by tensor.
    assert m.ready["kv_tensor_bytes"] == m.predicted_kv
    # What lessord's verification and reconciler read is the same measurement, taken later.
    assert abs(error(m.ready["memory_reserved"], ready["weights_bytes"] + ready["kv_bytes"])) <= 3


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    from lessor.engines.tiny_qwen import write_deepseek_v2

    return write_deepseek_v2(tmp_path_factory.mktemp("models") / "tiny-deepseek-v2")


def test_mla_static_cache_holds_the_latent_the_memory_model_predicts(deepseek_v2):
    from lessor.engines.torch_engine import Engine, Sampling

    spec = ModelSpec.model_validate({"name": "ds", "engine": {"kind": "torch", "model_path": str(deepseek_v2),
                                                               "dtype": "float32"},
                                     "architecture": {"hf_config": str(deepseek_v2 / "config.json")}})
    a = spec.architecture
    assert a.is_mla and a.moe_layers == 1  # first_k_dense_replace 1 of 2 layers
    engine = Engine(str(deepseek_v2), "float32", "cpu", None)
    engine.load_weights()
    assert engine.allocate_kv(64, 2, None) == kv_bytes(spec.profile().devices[0], 64 * 2)
    for layer in engine.slots[0].layers:
        assert tuple(layer.keys.shape) == (1, 1, 64, a.kv_lora_rank)
        assert tuple(layer.values.shape) == (1, 1, 64, a.qk_rope_head_dim)
    prompt = engine.prompt_ids(({"role": "user", "content": "Hello, how are you?"},), None)
    tokens = list(engine.generate(1, prompt, Sampling(4, 0.0, 1.0, (), 1, ignore_eos=True)))
    assert len(tokens) == 4 and all(0 <= t < engine.model.config.vocab_size for t in tokens)


def test_the_accuracy_table_shows_the_measured_rows(measurements):
    from bench import accuracy

    rows = accuracy.torch_rows(measurements)
    assert [r.error("kv") for r in rows] == [error(m.predicted_kv, m.measured_kv) for m in measurements]
    text = accuracy.table(rows)
    assert f"**{accuracy.TORCH_ENGINE}** (MiB)" in text and text.count("| random Qwen2 291 MB bf16") == 3
