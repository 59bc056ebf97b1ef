"""The memory model against published measurements of real engines (../shared/calibration/).

Every row: what the engine's memory model in lessor predicts, component by component, against
what the engine logged, with the error in %. The model is the engine's (engines/<kind>.py), run
with the settings of the measured run; nothing here is fitted.

    python -m bench.accuracy                 # the table
    python -m bench.accuracy --measure-torch --write bench/README.md

`--measure-torch` adds rows measured now, on this machine's CPU: the built-in torch engine run for
real with a 291 MB model at three KV sizes (bench/torch_measure.py, about a minute on two cores).

The total of a vLLM row is what the process holds on the GPU once it serves: its non-KV memory
plus the KV cache; the predicted KV cache is the model's bytes per token x the tokens vLLM
allocated (vLLM sized that run's cache from --gpu-memory-utilization, which lessor never leaves
to it)."""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `bench` from the repo root

from lessor.engines.ktransformers import KTransformersEngineArgs
from lessor.engines.llamacpp import LlamaCppEngineArgs
from lessor.engines.sglang import SGLangEngineArgs
from lessor.engines.vllm import VLLMEngineArgs
from lessor.memory.architecture import Architecture, read_hf_config
from lessor.memory.footprint import DeviceFootprint, ModelShape, Part

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "bench" / "calibration"  # a copy of ../shared/calibration's CSV (see its README)
SHARED = ROOT.parent / "shared" / "calibration"
FIXTURES = ROOT / "tests" / "fixtures"
GiB, MiB = float(1 << 30), float(1 << 20)

VLLM_MODELS = {  # calibration model -> (config.json fixture, lessor's weight format)
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b", "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
    "RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic": "qwen2.5-7b", "RedHatAI/Qwen2.5-7B-Instruct-quantized.w8a8": "qwen2.5-7b",
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16": "llama-3.1-8b",
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8": "llama-3.1-8b",
}


@dataclass
class Row:
    engine: str
    case: str
    source: str
    measured: dict[str, float]  # component -> bytes (kv_per_token in bytes per token)
    predicted: dict[str, float]
    unit: str = "GiB"  # how the table shows its bytes

    def error(self, name: str) -> float | None:
        m, p = self.measured.get(name), self.predicted.get(name)
        return None if m in (None, 0) or p is None else (p - m) / m * 100


def arch(name: str) -> Architecture:
    return Architecture(**read_hf_config(FIXTURES / f"{name}.json"))


def by_name(device: DeviceFootprint) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in device.components:
        out[c.name] = out.get(c.name, 0) + c.bytes
    return out


def vllm_format(row: dict) -> str:
    model, quant = row["model"], row["quantization"]
    if quant == "None":
        return {"torch.float32": "fp32", "torch.float16": "fp16"}.get(row["dtype"], "bf16")
    if quant == "gptq_marlin" or "w4a16" in model:
        return "gptq"
    if quant == "fp8" or "fp8" in model:
        return "fp8"
    return "int8" if "w8a8" in model else "bf16"


def vllm_rows() -> list[Row]:
    rows = []
    with open(CALIBRATION / "vllm-h100-v0.19.csv", newline="") as f:
        for r in csv.DictReader(f):
            tp, pp = int(r["tp"]), int(r["pp"])
            dtype = {"torch.float32": "float32", "torch.float16": "float16"}.get(r["dtype"], "bfloat16")
            engine = VLLMEngineArgs(kind="vllm", model_path="/m", max_num_seqs=1024, max_num_batched_tokens=8192,
                                    pipeline_parallel_size=pp, dtype=dtype,
                                    kv_cache_dtype="fp8" if r["kv_cache_dtype"] == "fp8" else "auto")
            shape = ModelShape(arch(VLLM_MODELS[r["model"]]), vllm_format(r), "bf16", False, tp * pp, 1024)
            device = engine.footprint(shape).devices[0]  # rank 0: the rank whose log lines these are
            c = by_name(device)
            kv_tokens = int(r["kv_cache_tokens"])
            g = {k: float(r[k]) * GiB for k in ("weight_memory_gib", "init_non_torch_memory_gib",
                                                 "activation_memory_gib", "non_torch_forward_gib",
                                                 "cuda_graph_actual_gib", "kv_cache_memory_gib")}
            measured = {"weights": g["weight_memory_gib"], "context": g["init_non_torch_memory_gib"],
                        "activation": g["activation_memory_gib"], "non_torch": g["non_torch_forward_gib"],
                        "cuda_graphs": g["cuda_graph_actual_gib"], "kv_per_token": g["kv_cache_memory_gib"] / kv_tokens}
            predicted: dict[str, float] = {"weights": c["weights"], "context": c["cuda_context"] + c.get("nccl", 0),
                                           "activation": c["activation"], "non_torch": c["non_torch_forward"],
                                           "cuda_graphs": c["cuda_graphs"], "kv_per_token": device.kv_bytes_per_token}
            for out, kv in ((measured, g["kv_cache_memory_gib"]), (predicted, device.kv_bytes_per_token * kv_tokens)):
                out["non_kv"] = sum(out[k] for k in ("weights", "context", "activation", "non_torch", "cuda_graphs"))
                out["total"] = out["non_kv"] + kv
            case = f"{r['model'].split('/')[1]} tp{tp} pp{pp} {vllm_format(r)}" + (" kv fp8" if r["kv_cache_dtype"] == "fp8" else "")
            rows.append(Row("vllm 0.19", case, f"vllm-h100-v0.19.csv: {r['log_file']}", measured, predicted))
    return rows


def llamacpp_rows() -> list[Row]:
    """The README's llama.cpp table (MiB, from the engine's log lines)."""
    rows = []
    for fixture, n_ctx, slots, fa, unified, m, source in (
            ("llama-3.1-8b", 8192, 4, "off", True, {"weights": 4403.5, "host": 281.8, "kv": 1024, "compute": 560},
             "MagicWand18/Securetag-AI-Agent runpod-deploy/logcompleto.md (through Ollama: one cache for 4 slots)"),
            ("qwen2.5-14b", 8192, 1, "on", False, {"weights": 8148.4, "host": 417.7, "kv": 1536}, "ollama/ollama #9091"),
            ("qwen2.5-32b", 8192, 1, "on", False, {"weights": 18508, "host": 417.7}, "ggml-org/llama.cpp #11861")):
        engine = LlamaCppEngineArgs(kind="llamacpp", model_path="/m.gguf", flash_attn=fa, parallel=slots,
                                    kv_unified=unified)
        fp = engine.footprint(ModelShape(arch(fixture), "q4_k_m", "fp16", False, 1, slots))
        d = fp.devices[0]
        compute = next(x for x in d.components if x.name == "compute_buffer")
        predicted = {"weights": by_name(d)["weights"], "host": sum(x.bytes for x in fp.host),
                     "kv": d.kv_bytes_per_token * n_ctx, "compute": compute.bytes + compute.per_kv_token * n_ctx}
        rows.append(Row("llama.cpp", f"{fixture} Q4_K_M, n_ctx {n_ctx}, {slots} slot(s), FA {fa}", source,
                        {k: v * MiB for k, v in m.items()}, predicted))
    return rows


def sglang_rows() -> list[Row]:
    """The README's SGLang table: weights (GiB), KV tokens and K + V (GiB)."""
    rows = []
    for fixture, weights, tokens, kv_gib, source, gpu in (
            ("llama-3.1-8b", 15.11, 442_750, 54.04, "sgl-project/sglang PR #4760", "H100"),
            ("qwen2.5-7b", 14.39, 105_531, 5.64, "jerryzsj/my-deepseek-r1 README (DeepSeek-R1-Distill-Qwen-7B)", "RTX 3090")):
        engine = SGLangEngineArgs(kind="sglang", model_path="/m")
        d = engine.footprint(ModelShape(arch(fixture), "bf16", "bf16", False, 1, 4)).devices[0]
        c = by_name(d)
        rows.append(Row("sglang", f"{fixture} bf16, {gpu}", source,
                        {"weights": weights * GiB, "kv_per_token": kv_gib * GiB / tokens},
                        {"weights": c["weights"], "kv_per_token": d.kv_bytes_per_token}))
    return rows


def ktransformers_rows() -> list[Row]:
    """The seed case: 15.7 GB steady at cache_lens 28000, chunk 128, batch 3 (DESIGN.md, calibration README)."""
    engine = KTransformersEngineArgs(kind="ktransformers", model_path="/m", gguf_path="/g", chunk_size=128,
                                     cache_lens=28_160, max_batch_size=3)
    fp = engine.footprint(ModelShape(arch("deepseek-r1"), "q4_k_m", "bf16", True, 1, 3))
    d = fp.devices[0]
    steady = sum(c.bytes for c in d.components if c.part != Part.LOAD_PEAK) + sum(c.per_kv_token for c in d.components) * 28_000
    steady += d.kv_bytes_per_token * 28_000
    return [Row("ktransformers", "DeepSeek-R1 Q4_K_M, balance_serve, cache_lens 28000, chunk 128, batch 3, RTX 4090",
                "the seed case (../shared/calibration/README.md)", {"total": 15.7e9}, {"total": steady})]


def torch_rows(measurements) -> list[Row]:
    """bench/torch_measure.py's runs: what the engine measured of its own process (its anonymous
    memory's growth over loading the weights, then over allocating the KV cache) against the
    profile the planner leases from."""
    source = (f"measured now (torch {version('torch')}, transformers {version('transformers')}): "
              "the engine's anonymous PSS growth per phase")
    return [Row(TORCH_ENGINE, f"random Qwen2 291 MB bf16, context_tokens {m.context_tokens} x max_batch_size "
                              f"{m.max_batch_size}", source,
                {"weights": m.measured_weights, "kv": m.measured_kv},
                {"weights": m.predicted_weights, "kv": m.predicted_kv}, unit="MiB") for m in measurements]


TORCH_ENGINE = "torch (this machine's CPU, measured now)"
COLUMNS = ("weights", "host", "context", "activation", "non_torch", "cuda_graphs", "compute", "kv", "kv_per_token",
           "non_kv", "total")


def fmt(row: Row, name: str) -> str:
    if name not in row.measured:
        return ""
    scale = 1 if name == "kv_per_token" else {"GiB": GiB, "MiB": MiB}[row.unit]
    m, p = row.measured[name] / scale, row.predicted[name] / scale
    digits = 0 if name == "kv_per_token" else 2
    return f"{p:.{digits}f} / {m:.{digits}f} ({row.error(name):+.1f} %)"


def table(rows: list[Row]) -> str:
    """One table per engine, with the columns its rows measure."""
    out = []
    for engine in dict.fromkeys(r.engine for r in rows):
        mine = [r for r in rows if r.engine == engine]
        columns = [c for c in COLUMNS if any(c in r.measured for r in mine)]
        unit = "" if mine[0].unit == "GiB" else f" ({mine[0].unit})"
        lines = [f"**{engine}**{unit}", "", "| case | " + " | ".join(columns) + " | source |", "|" + "---|" * (len(columns) + 2)]
        lines += [f"| {r.case} | " + " | ".join(fmt(r, c) for c in columns) + f" | {r.source} |" for r in mine]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def all_rows() -> list[Row]:
    return vllm_rows() + llamacpp_rows() + sglang_rows() + ktransformers_rows()


def write(readme: Path, text: str) -> None:
    start, end = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
    body = readme.read_text()
    block = f"{start}\n{text}\n{end}"
    body = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S) if start in body \
        else body.rstrip() + "\n\n" + block + "\n"
    readme.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the accuracy table in this file (bench/README.md)")
    parser.add_argument("--measure-torch", action="store_true",
                        help="also run the built-in torch engine on this CPU and add what it measured (about a minute)")
    args = parser.parse_args()
    rows = all_rows()
    if args.measure_torch:
        from bench.torch_measure import measure_now

        rows += torch_rows(measure_now())
    text = ("Predicted / measured per GPU (the torch rows: in the engine's process on the CPU), GiB unless the "
            "engine says otherwise (KV per token in bytes), error in %.\n\n" + table(rows))
    print(text)
    if args.write:
        write(args.write, text)


if __name__ == "__main__":
    main()
