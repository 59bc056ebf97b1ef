"""Engine adapters and process supervision, with real processes: the stand-in server records the
exact command line and environment each adapter builds from a grant."""

import asyncio
import json
import os
import signal
import sys

import pytest
import yaml

from lessor.daemon.models.load_errors import LoadFailed
from lessor.daemon.runtime import runtime
from lessor.engines.process import EngineProcess, ProcessEnded, process_identity

from ..support.configs import sim_config
from ..support.paths import STANDIN
from ..support.waiting import HANG_S

MEMORY = {"weights": "4GiB", "kv_bytes_per_token": 65536, "load_peak": "1GiB"}
PLAN = {"min_kv_tokens": 1024, "max_kv_tokens": 16384}


def flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("-")}


def standin_model(kind: str, record, **engine) -> dict:
    command = {"binary": STANDIN} if kind == "llamacpp" else {"command": [sys.executable, STANDIN]}
    return {"name": f"m-{kind}", "engine": {"kind": kind, "model_path": f"/models/{kind}", **command, **engine,
                                            "env": {"LESSOR_STANDIN_RECORD": str(record)}},
            "memory": MEMORY, "plan": PLAN, "restart": {"policy": "never"}}


@pytest.fixture
async def controller(tmp_path):
    made = []

    async def make(models):
        ctx = runtime(sim_config(tmp_path, models))
        made.append(ctx)
        return await ctx.__aenter__()
    yield make
    for ctx in made:
        await ctx.__aexit__(None, None, None)


async def load_standin(controller, tmp_path, kind, **engine):
    record = tmp_path / f"{kind}.json"
    ctl = await controller([standin_model(kind, record, **engine)])
    model = await ctl.load(f"m-{kind}")
    seen = json.loads(record.read_text())
    return ctl, model, seen, flags(seen["argv"])


async def test_vllm_gets_its_memory_flags_from_the_lease(controller, tmp_path):
    ctl, model, seen, f = await load_standin(controller, tmp_path, "vllm", kv_cache_dtype="fp8")
    p = model["params"]
    assert seen["argv"][0] == "/models/vllm"  # `vllm serve MODEL`: the model is the first argument
    assert f["--max-model-len"] == str(p["max_model_len"]) and f["--max-num-seqs"] == str(p["max_num_seqs"])
    assert f["--kv-cache-memory-bytes"] == str(p["kv_cache_memory_bytes"])
    assert f["--gpu-memory-utilization"] == f"{p['gpu_memory_utilization']:.3f}"
    assert f["--kv-cache-dtype"] == "fp8" and f["--served-model-name"] == "m-vllm" and f["--tensor-parallel-size"] == "1"
    # Every flag that decides memory is passed, never left to vLLM's default.
    assert f["--max-num-batched-tokens"] == "8192" and f["--pipeline-parallel-size"] == "1"
    assert f["--max-cudagraph-capture-size"] == str(min(2 * p["max_num_seqs"], 512)) and "--enforce-eager" not in seen["argv"]
    assert f["--port"] == model["endpoint"].rsplit(":", 1)[1]
    # One phase: the KV cache was granted with the weights; the load peak is gone once ready.
    assert model["leased_bytes"]["kv"] == p["kv_cache_memory_bytes"] and model["leased_bytes"]["load_peak"] == 0
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "" and seen["env"]["HF_HUB_OFFLINE"] == "1"
    assert "LESSOR_ADMIN_TOKEN" not in seen["env"]


async def test_vllm_serves_the_aliases_and_never_gets_a_variable_that_overrides_its_kv_cache(controller, tmp_path,
                                                                                                monkeypatch):
    record = tmp_path / "vllm.json"
    model = standin_model("vllm", record)
    model["aliases"] = ["v", "qwen"]
    model["engine"]["env"].update({"VLLM_CPU_KVCACHE_SPACE": "40", "OMP_NUM_THREADS": "2"})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "30")  # lessord's own environment (a systemd Environment=)
    ctl = await controller([model])
    plan = ctl.supervisor.dry_run("m-vllm").to_dict()
    assert any(w.startswith("engine.env.VLLM_CPU_KVCACHE_SPACE: not passed") for w in plan["warnings"]), plan["warnings"]
    await ctl.load("m-vllm")
    seen = json.loads(record.read_text())
    names = seen["argv"][seen["argv"].index("--served-model-name") + 1:][:3]
    assert names == ["m-vllm", "v", "qwen"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in seen["env"] and seen["env"]["OMP_NUM_THREADS"] == "2"


async def test_one_phase_kv_leaves_room_for_the_load_peak(controller, tmp_path):
    # 24 GiB - 1 headroom - 8 foreign = 15 leasable; weights 4 and peak 1 held while the KV cache
    # is allocated: 10 GiB for KV, not the 11 a two-phase engine would get.
    ctl, model, _, _ = await load_standin(controller, tmp_path, "sglang")
    tokens = model["params"]["max_total_tokens"]
    assert tokens == 16384  # capped by plan.max_kv_tokens
    plan = ctl.plan("m-sglang")
    assert plan["one_phase"] is True


async def test_sglang_flags(controller, tmp_path):
    ctl, model, seen, f = await load_standin(controller, tmp_path, "sglang")
    p = model["params"]
    assert f["--model-path"] == "/models/sglang" and f["--max-total-tokens"] == str(p["max_total_tokens"])
    assert f["--max-running-requests"] == str(p["max_running_requests"]) and f["--tp-size"] == "1"
    assert f["--context-length"] == str(p["context_length"]) and f["--chunked-prefill-size"] == "4096"
    assert f["--cuda-graph-max-bs"] == str(p["max_running_requests"])


async def test_sglang_fraction_is_of_what_is_free_at_launch_on_a_shared_card(controller, tmp_path):
    """--mem-fraction-static is taken of the memory free when SGLang starts, after its CUDA
    context (model_runner: pool = m x F - weights): on this 24 GiB card 8 GiB are foreign, so
    F = 16 GiB - the context, and m must be (weights + pool) / F for the pool lessor planned."""
    from lessor.engines.vllm import CUDA_CONTEXT
    ctl, model, seen, f = await load_standin(controller, tmp_path, "sglang")
    p = model["params"]
    weights_and_pool = (4 << 30) + p["max_total_tokens"] * 65536
    assert p["static_bytes"] == weights_and_pool
    free = (24 << 30) - (8 << 30) - CUDA_CONTEXT
    m = float(f["--mem-fraction-static"])
    assert m == -(-weights_and_pool * 1000 // free) / 1000
    assert m * free - (4 << 30) >= p["max_total_tokens"] * 65536  # the planned pool fits what SGLang computes
    assert m > p["mem_fraction_static"]  # the fraction of the card's total would have given a smaller pool


async def test_ktransformers_flags_agree_with_its_own_config_file(controller, tmp_path):
    ctl, model, seen, f = await load_standin(controller, tmp_path, "ktransformers", gguf_path="/models/gguf",
                                             max_batch_size=4, cpu_infer=30)
    p = model["params"]
    assert f["--cache_lens"] == str(p["cache_lens"]) and int(f["--cache_lens"]) % 256 == 0
    assert f["--max_batch_size"] == "4" and f["--chunk_size"] == str(p["chunk_size"]) and f["--cpu_infer"] == "30"
    assert f["--gguf_path"] == "/models/gguf" and f["--backend_type"] == "balance_serve"
    home = seen["env"]["HOME"]
    written = yaml.safe_load(open(os.path.join(home, ".ktransformers", "config.yaml")))
    assert written["async_server"]["max_batch_size"] == 4
    assert written["model"]["cache_lens"] == p["cache_lens"]
    assert written["attn"] == {"page_size": 256, "chunk_size": p["chunk_size"]}
    assert seen["cwd"].startswith(str(tmp_path / "state" / "engines" / "m-ktransformers"))


async def test_vllm_eager_mode_is_passed(controller, tmp_path):
    _, _, seen, f = await load_standin(controller, tmp_path, "vllm", enforce_eager=True)
    assert "--enforce-eager" in seen["argv"] and "--max-cudagraph-capture-size" not in f


async def test_llama_server_flags(controller, tmp_path):
    ctl, model, seen, f = await load_standin(controller, tmp_path, "llamacpp", cache_type_v="q8_0", parallel=2)
    p = model["params"]
    assert f["-c"] == str(p["ctx_size"]) and f["--parallel"] == "2" and f["--cache-type-v"] == "q8_0"
    assert f["-fa"] == "on" and f["-ub"] == "512" and f["-b"] == "2048"  # explicit: builds differ in 'auto'
    assert "-kvu" not in seen["argv"]


async def test_llama_server_without_flash_attention_says_so(controller, tmp_path):
    _, _, seen, f = await load_standin(controller, tmp_path, "llamacpp", flash_attn="off", kv_unified=True)
    assert f["-fa"] == "off" and "-kvu" in seen["argv"]
    assert f["-ngl"] == "0"  # simulated devices: the engine runs on the CPU
    assert f["--alias"] == "m-llamacpp"


async def test_an_engine_that_dies_at_start_rolls_the_load_back(controller, tmp_path):
    record = tmp_path / "vllm.json"
    spec = standin_model("vllm", record)
    spec["engine"]["env"]["LESSOR_STANDIN_EXIT"] = "3"
    ctl = await controller([spec])
    with pytest.raises(LoadFailed) as failed:
        await ctl.load("m-vllm")
    assert "exited with code 3" in str(failed.value) and "stand-in: exiting as asked" in str(failed.value)
    assert ctl.leases() == []
    assert ctl.model("m-vllm")["state"] == "failed"
    assert "exiting as asked" in ctl.log_tail("m-vllm", 20)


async def test_unload_stops_the_engine_and_its_whole_process_group(controller, tmp_path):
    ctl, model, seen, _ = await load_standin(controller, tmp_path, "vllm")
    pid = model["pid"]
    await ctl.unload("m-vllm")
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert ctl.leases() == []


# -- process supervision ----------------------------------------------------------------------

STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("CHILD-PID:" + str(child.pid), flush=True)
time.sleep(600)
"""


async def test_stop_kills_a_group_that_ignores_sigterm(tmp_path):
    proc = await EngineProcess.spawn([sys.executable, "-c", STUBBORN], dict(os.environ), tmp_path / "e.log")
    await proc.wait_until(lambda: "\nCHILD-PID:" in (tmp_path / "e.log").read_text(), "starting", HANG_S)
    child = int((tmp_path / "e.log").read_text().split("\nCHILD-PID:")[1].split()[0])
    returncode = await proc.stop(grace_s=0.5)
    assert returncode == -signal.SIGKILL  # SIGTERM was ignored: the grace ran out and the group got SIGKILL
    # The leader's child, in the same group, no longer runs (init may not have reaped it yet).
    assert process_identity(child) is None


async def test_an_exit_is_seen_at_once(tmp_path):
    exits = []
    seen = asyncio.Event()

    def on_exit(code):  # called when the child is reaped: nobody polls for it
        exits.append(code)
        seen.set()
    proc = await EngineProcess.spawn([sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ),
                                     tmp_path / "e.log", on_exit=on_exit)
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(seen.wait(), HANG_S)
    assert exits[0] == -signal.SIGKILL
    with pytest.raises(ProcessEnded, match="signal SIGKILL"):
        await proc.wait_until(lambda: False, "loading", 5)
    await proc.stop(1)
    assert len(exits) == 1


async def test_the_previous_log_is_kept(tmp_path):
    log = tmp_path / "m.log"
    for word in ("first", "second"):
        proc = await EngineProcess.spawn([sys.executable, "-c", f"print('{word}')"], dict(os.environ), log)
        await proc.exited.wait()
        await proc.stop(1)
    assert "second" in log.read_text() and "first" in (tmp_path / "m.log.1").read_text()


def test_the_variables_an_engine_claims_are_matched_by_name_in_any_case_or_by_prefix():
    from lessor.engines.process import owned_env

    env = {"LLAMA_ARG_CTX_SIZE": "1", "offload_kqv": "0", "LLAMA": "x", "OFFLOAD_KQV_X": "y"}
    assert owned_env(("LLAMA_ARG_*", "OFFLOAD_KQV"), env) == ["LLAMA_ARG_CTX_SIZE", "offload_kqv"]


async def test_ktransformers_sglang_path_gets_kt_and_sglang_memory_flags(controller, tmp_path):
    ctl, model, seen, f = await load_standin(controller, tmp_path, "ktransformers", server="sglang",
                                             kt_weight_path="/models/kt", kt_num_gpu_experts=2, cpu_infer=12,
                                             kt_threadpool_count=2)
    p = model["params"]
    assert f["--model-path"] == "/models/ktransformers" and f["--served-model-name"] == "m-ktransformers"
    assert f["--max-total-tokens"] == str(p["cache_lens"]) and f["--max-running-requests"] == str(p["max_batch_size"])
    assert f["--kt-weight-path"] == "/models/kt" and f["--kt-method"] == "AMXINT4" and f["--kt-num-gpu-experts"] == "2"
    assert f["--kt-cpuinfer"] == "12" and f["--kt-threadpool-count"] == "2" and f["--chunked-prefill-size"] == "4096"
    assert 0 < float(f["--mem-fraction-static"]) <= 1 and f["--cuda-graph-max-bs"] == str(p["max_batch_size"])
    assert "--cache_lens" not in f and not seen["env"].get("HOME", "").endswith("/home")  # no legacy config.yaml


async def test_ktransformers_without_server_and_with_gguf_path_stays_legacy(controller, tmp_path):
    _, _, seen, f = await load_standin(controller, tmp_path, "ktransformers", gguf_path="/models/gguf")
    assert f["--gguf_path"] == "/models/gguf" and "--kt-method" not in f
