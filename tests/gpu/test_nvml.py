"""The real NVML path. Runs only where an NVIDIA driver answers; skipped (never faked) elsewhere."""

import pytest

from lessor.daemon.devices.probes import NvmlProbe


def _nvml_or_skip() -> NvmlProbe:
    try:
        return NvmlProbe()
    except Exception as exc:  # no driver, no library, no GPU
        pytest.skip(f"no NVIDIA GPU: {exc}")


@pytest.mark.gpu
def test_nvml_reads_every_gpu_and_the_host():
    probe = _nvml_or_skip()
    try:
        readings = probe.read()
        gpus = [r for r in readings if r.is_gpu]
        assert gpus and readings[-1].device == "host"
        for r in gpus:
            assert r.total_bytes > 0 and 0 <= r.used_bytes <= r.total_bytes
            assert r.uuid.startswith("GPU-") and r.name
    finally:
        probe.close()


@pytest.mark.gpu
def test_nvml_attributes_a_torch_process_allocation():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import os
    probe = _nvml_or_skip()
    try:
        x = torch.empty(512 << 20, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        mine = probe.read()[0].processes.get(os.getpid(), 0)
        assert mine >= 512 << 20
        del x
    finally:
        probe.close()


@pytest.mark.gpu
async def test_torch_engine_on_a_real_gpu_stays_within_its_leases(tiny_qwen, tmp_path):
    """The built-in engine on CUDA: NVML attributes its usage to its pid, and the load protocol's
    verification (engine report and NVML, within leases + tolerance) passes."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    _nvml_or_skip().close()
    from lessor.daemon.config.schema import parse_config
    from lessor.daemon.runtime import runtime

    config = parse_config({"state_dir": str(tmp_path / "state"), "devices": {"probe": "nvml", "headroom": "1GiB"},
                           "models": [{"name": "tiny", "placement": {"devices": [0]},
                                       "engine": {"kind": "torch", "model_path": str(tiny_qwen), "dtype": "bfloat16"},
                                       "architecture": {"hf_config": str(tiny_qwen / "config.json")},
                                       "plan": {"min_kv_tokens": 1024, "max_kv_tokens": 65536}}]})
    async with runtime(config) as controller:
        model = await controller.load("tiny")
        reading = controller.ledger.snapshot().readings["gpu0"]
        used = reading.processes.get(model["pid"], 0)
        leased = sum(model["leased_bytes"].values())
        assert 0 < used <= leased + max(128 << 20, leased // 20), (used, model["leased_bytes"])
        await controller.unload("tiny")
        # The load was sampled through NVML and remembered under the card's name and torch's version.
        [fingerprint] = controller.fingerprints("tiny")
        m = fingerprint["measured"][0]
        assert fingerprint["devices"] == [reading.name] and fingerprint["engine_version"].startswith("torch ")
        assert m["method"] in ("nvml", "engine") and m["peak_bytes"] >= m["steady_bytes"] >= used // 2 > 0
        assert m["weights_bytes"] and m["kv_bytes"] is not None
        # The unload was verified: the engine's process group is gone from the card.
        assert controller.supervisor.lingering.unverified == 0
        assert controller.devices()[0]["lingering_bytes"] == 0
