"""The scenarios: hardware, models (sized by lessor's memory model), traffic and latency goals.

Model shapes are the published config.json fields of each family; bytes come from
the engines' memory models through `ModelSpec.profile()`, never typed in, except where the seed case
states its numbers (the operator's measured load peak). Serving speeds are rough H100-class
figures: decode is bound by reading the weights once per step, prefill by compute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from lessor.daemon.config.model_spec import ModelSpec
from lessor.daemon.config.schema import SimulatedGpu
from lessor.daemon.devices.probes import gpu_id
from lessor.memory.architecture import read_hf_config

from .strategies import StrategyOptions
from .workload import Workload
from .world import GiB, Hardware, SimModel, baseline_leases, lease_sums

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"

# config.json fields of the families used (Qwen2.5, Llama 3.x, Mistral, Phi-3, Mixtral, DeepSeek-V2-Lite).
ARCHITECTURES: dict[str, dict] = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         attention_bias=True),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                       attention_bias=True),
    "qwen2.5-7b": read_hf_config(FIXTURES / "qwen2.5-7b.json"),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=13824, vocab_size=152064, attention_bias=True),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064, attention_bias=True),
    "llama-3-8b": read_hf_config(FIXTURES / "llama-3-8b.json"),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
    "mistral-7b": read_hf_config(FIXTURES / "mistral-7b.json"),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=8192, vocab_size=32064),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, n_routed_experts=8,
                         moe_intermediate_size=14336, num_experts_per_tok=2),
    "deepseek-v2-lite": read_hf_config(FIXTURES / "deepseek-v2-lite.json"),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, vocab_size=152064, attention_bias=True),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    hardware: Hardware
    models: tuple[SimModel, ...]  # ranked by popularity: model 0 gets the most requests
    workload: Workload
    slo_ttft_s: dict[str, float]  # the time-to-first-token goal per model
    options: StrategyOptions
    wait_timeout_s: float = 120.0
    story: str = ""


def served_model(name: str, family: str, quantization: str, device: int, *, min_kv: int = 8192,
                 max_kv: int = 65536, context: int = 4096, max_batch: int = 16, priority: int = 50,
                 engine: str = "vllm") -> SimModel:
    """A model served by `engine` on one GPU, its bytes from the memory model."""
    engine_args = {"kind": engine, "model_path": f"/models/{name}"}
    spec = ModelSpec.model_validate({
        "name": name, "engine": engine_args, "placement": {"devices": [device]},
        "architecture": ARCHITECTURES[family], "quantization": quantization, "priority": priority,
        "plan": {"min_kv_tokens": min_kv, "max_kv_tokens": max_kv, "max_batch_size": max_batch},
    })
    weights = spec.profile().weights
    # Decode reads every weight once a step (~1.2 TB/s of an H100's 3.35 reach a batch step);
    # prefill is compute-bound (~1.6e14 useful FLOP/s at 2 FLOP per weight byte in bf16).
    return SimModel(spec, prefill_tps=min(20_000.0, 1.6e14 / weights), decode_tps=min(120.0, 1.2e12 / weights),
                    context_tokens=context, max_batch=max_batch, baseline_kv_tokens=max_kv)


# -- the seed case ---------------------------------------------------------------------------------

def seed() -> Scenario:
    """The 24 GiB card of DESIGN.md: a foreign 8 GiB process, 1 GiB headroom, so 15 GiB for lessor.
    A DeepSeek-R1 hybrid engine (routed experts in host RAM) that is 15 GiB at steady state and
    needs +10 GiB above its weights while loading; two small models want the same 15 GiB."""
    r1 = ModelSpec.model_validate({
        "name": "deepseek-r1", "engine": {"kind": "torch", "model_path": "/models/DeepSeek-R1"},
        "placement": {"devices": [0]}, "priority": 100,
        # The GPU part of the hybrid engine (attention, shared experts, dense layers, lm_head),
        # the routed experts in RAM (from the memory model), the operator's measured load peak.
        "memory": {"weights": int(4.5 * GiB), "host_weights": 400_222_993_121, "activation": int(0.5 * GiB),
                   "load_peak": 10 * GiB, "kv_bytes_per_token": 70_272},
        "plan": {"min_kv_tokens": 152_000, "max_kv_tokens": 152_000, "max_batch_size": 3},
    })
    models = (
        SimModel(r1, prefill_tps=250.0, decode_tps=12.0, context_tokens=32_768, max_batch=3,
                 baseline_kv_tokens=152_000),
        served_model("qwen2.5-3b", "qwen2.5-3b", "bf16", 0, max_kv=32_768),
        served_model("qwen2.5-1.5b", "qwen2.5-1.5b", "bf16", 0, max_kv=32_768),
    )
    hardware = Hardware(gpus=(SimulatedGpu(name="24 GiB card", total=24 * GiB, foreign=8 * GiB),))
    return Scenario(
        name="seed", title="seed case: 24 GiB card, foreign 8 GiB, R1 hybrid (15 GiB steady, +10 GiB load peak)",
        hardware=hardware, models=models,
        workload=Workload(rate=0.08, zipf_s=1.0, output_mean=250.0),
        slo_ttft_s={"deepseek-r1": 6.0, "qwen2.5-3b": 1.0, "qwen2.5-1.5b": 1.0},
        options=StrategyOptions(swap_groups={"deepseek-r1": "r1", "qwen2.5-3b": "small", "qwen2.5-1.5b": "small"},
                                static_set=_static_set(models, hardware)),
        wait_timeout_s=300.0,
        story="R1 serves most requests; the small models come and go. Its steady 15 GiB fits, but only a "
              "load that takes the weights first and the KV cache after the peak fits at all.",
    )


# -- a 4 x 80 GiB box with 16 models ---------------------------------------------------------------

BOX_MODELS = [  # (name, family, quantization), by popularity
    ("llama-3-8b", "llama-3-8b", "bf16"), ("qwen2.5-7b", "qwen2.5-7b", "bf16"),
    ("qwen2.5-32b-awq", "qwen2.5-32b", "awq"), ("mistral-7b", "mistral-7b", "bf16"),
    ("llama-3.1-70b-awq", "llama-3.1-70b", "awq"), ("qwen2.5-14b", "qwen2.5-14b", "bf16"),
    ("mixtral-8x7b-awq", "mixtral-8x7b", "awq"), ("phi-3-mini", "phi-3-mini", "bf16"),
    ("deepseek-v2-lite", "deepseek-v2-lite", "bf16"), ("qwen2.5-3b", "qwen2.5-3b", "bf16"),
    ("qwen2.5-32b-fp8", "qwen2.5-32b", "fp8"), ("llama-3-8b-fp8", "llama-3-8b", "fp8"),
    ("qwen2.5-14b-awq", "qwen2.5-14b", "awq"), ("qwen2.5-72b-awq", "qwen2.5-72b", "awq"),
    ("qwen2.5-7b-fp8", "qwen2.5-7b", "fp8"), ("qwen2.5-32b", "qwen2.5-32b", "bf16"),
]


def box(arrivals: str = "poisson", cv: float = 1.0, traffic: str = "") -> Scenario:
    """Four 80 GiB cards, 16 models placed four to a card, Zipf traffic: about 1.6x more steady
    demand than memory, so models must come and go. Each model wants 16 sequences of 4096 tokens
    (65 536 KV tokens); lessor may start one with half of that when memory is short."""
    unplaced = [served_model(name, family, quant, 0, min_kv=32_768, max_kv=65_536,
                             priority=100 if rank < 4 else 50)
                for rank, (name, family, quant) in enumerate(BOX_MODELS)]
    models = tuple(_placed(unplaced, cards=4, per_card=4))
    hardware = Hardware(gpus=tuple(SimulatedGpu(name=f"80 GiB card {i}", total=80 * GiB) for i in range(4)))
    bursty = arrivals == "gamma"
    name, title = f"box-{'gamma' if bursty else 'poisson'}", f"{f'Gamma CV {cv:g}' if bursty else 'Poisson'} arrivals"
    workload = Workload(rate=6.0, arrivals="gamma" if bursty else "poisson", cv=cv, zipf_s=1.0)
    story = "The four most popular models have priority 100, the rest 50."
    if traffic == "shift":
        name, title = "box-shift", "the popularity reshuffled every 10 minutes"
        workload = Workload(rate=6.0, zipf_s=1.0, shift_every_s=600.0)
        story = ("Every 10 minutes the Zipf ranks go to a new random order of the models; the priorities and the "
                 "static set are the first period's (its four most popular have priority 100).")
    elif traffic == "together":
        name, title = "box-together", "models used together, in bursts"
        workload = Workload(rate=6.0, zipf_s=1.0, groups=4, burst_s=120.0, duty=0.25)
        story = ("Four groups of four models (model k in group k mod 4), Zipf over the groups: a group is asked for "
                 "in bursts of about 2 minutes, a quarter of the time, all its members at once, as an agent "
                 "pipeline would.")
    return Scenario(
        name=name, title=f"4 x 80 GiB, 16 models, Zipf 1.0, {title}",
        hardware=hardware, models=models, workload=workload,
        slo_ttft_s={m.spec.name: 1.0 for m in models},
        options=StrategyOptions(swap_groups=_swap_groups(models, hardware), static_set=_static_set(models, hardware)),
        story=story,
    )


def _placed(models: list[SimModel], cards: int, per_card: int) -> list[SimModel]:
    """Balance the cards as an operator would: largest model first, onto the emptiest card."""
    load = [0] * cards
    count = [0] * cards
    device = {}
    for m in sorted(models, key=_estimate, reverse=True):
        card = min((c for c in range(cards) if count[c] < per_card), key=lambda c: load[c])
        device[m.spec.name] = card
        load[card] += _estimate(m)
        count[card] += 1
    return [replace(m, spec=m.spec.model_copy(update={"placement": m.spec.placement.model_copy(
        update={"devices": [device[m.spec.name]]})})) for m in models]


def _leasable(hardware: Hardware, device: str) -> int:
    gpu = hardware.gpus[int(device.removeprefix("gpu"))]
    return gpu.total - gpu.foreign - hardware.headroom


def _estimate(model: SimModel) -> int:
    return sum(b for d, b in lease_sums(baseline_leases(model)).items() if d != "host")


def _by_device(models: tuple[SimModel, ...]) -> dict[str, list[SimModel]]:
    out: dict[str, list[SimModel]] = {}
    for m in models:
        out.setdefault(gpu_id(m.spec.placement.devices[0]), []).append(m)
    return out


def _swap_groups(models: tuple[SimModel, ...], hardware: Hardware) -> dict[str, str]:
    """What a careful llama-swap operator writes: per card, as many swap groups as the largest
    member of each can sit side by side (by steady size), the models dealt round-robin."""
    groups = {}
    for device, ms in _by_device(models).items():
        ranked = sorted(ms, key=_estimate, reverse=True)
        k = max(1, max(k for k in range(1, len(ranked) + 1)
                       if sum(_estimate(m) for m in ranked[:k]) <= _leasable(hardware, device)) if
                _estimate(ranked[0]) <= _leasable(hardware, device) else 1)
        for i, m in enumerate(ranked):
            groups[m.spec.name] = f"{device}-g{i % k}"
    return groups


def _static_set(models: tuple[SimModel, ...], hardware: Hardware) -> tuple[str, ...]:
    """A fixed deployment: per card, the most popular models whose steady sizes fit together."""
    chosen = []
    for device, ms in _by_device(models).items():
        room = _leasable(hardware, device)
        for m in ms:
            if _estimate(m) <= room:
                chosen.append(m.spec.name)
                room -= _estimate(m)
    return tuple(chosen)


# -- issue 34: a two-model box, and the busiest model saturating its batch ---------------------------

def _builtin(name: str, weights_gib: float, kv_tokens: int, batch: int) -> SimModel:
    """A model on the built-in engine with its memory stated (as the newcomer's config did): a
    7B-class shape, 56 KiB of KV per token; a consumer card's speeds."""
    spec = ModelSpec.model_validate({
        "name": name, "engine": {"kind": "torch", "model_path": f"/models/{name}"}, "placement": {"devices": [0]},
        "memory": {"weights": int(weights_gib * GiB), "activation": int(0.25 * GiB), "kv_bytes_per_token": 57_344},
        "plan": {"min_kv_tokens": kv_tokens // 2, "max_kv_tokens": kv_tokens, "max_batch_size": batch},
    })
    return SimModel(spec, prefill_tps=2000.0, decode_tps=30.0, context_tokens=kv_tokens // batch, max_batch=batch,
                    baseline_kv_tokens=kv_tokens)


def two_model() -> Scenario:
    """Issue 34's first finding: a 16 GiB card, `chat` (7 GiB of weights) and `coder` (6 GiB)
    on the built-in engine, each with its KV cache: they do not fit together. One person's use:
    about two requests a minute, mostly to one model for a while, then to the other."""
    models = (_builtin("chat", 7.0, 24_576, 4), _builtin("coder", 6.0, 24_576, 4))
    # The built-in engine's start (torch import, CUDA context) before its weights are read.
    hardware = Hardware(gpus=(SimulatedGpu(name="16 GiB card", total=16 * GiB),), engine_start_s=5.0)
    return Scenario(
        name="two-model", title="issue 34's box: 16 GiB card, chat 7 GiB + coder 6 GiB (built-in engine), one user",
        hardware=hardware, models=models,
        workload=Workload(rate=0.03, zipf_s=1.0, shift_every_s=600.0),
        slo_ttft_s={"chat": 20.0, "coder": 20.0},
        options=StrategyOptions(swap_groups={"chat": "card", "coder": "card"},
                                static_set=_static_set(models, hardware)),
        story="The two models never fit together; every 10 minutes the user's preference may flip (Zipf 1.0 over "
              "the two, ranks redrawn). A goal of 20 s leaves room for one swap (the built-in engine starts in "
              "5 s, then reads its weights).",
    )


SATURATED_MODELS = [("qwen2.5-32b-awq", "qwen2.5-32b", "awq"), ("llama-3-8b", "llama-3-8b", "bf16"),
                    ("mistral-7b", "mistral-7b", "bf16"), ("qwen2.5-7b", "qwen2.5-7b", "bf16")]


def saturated() -> Scenario:
    """Issue 34: the busiest model fills every slot it has. One 80 GiB card, four models that do
    not all fit; the first takes 55 % of the requests at about 90 % of what its 16 slots serve, so
    most of its requests queue for a slot (few start at once) while it keeps up."""
    models = tuple(served_model(name, family, quant, 0, min_kv=32_768, max_kv=65_536)
                   for name, family, quant in SATURATED_MODELS)
    hardware = Hardware(gpus=(SimulatedGpu(name="80 GiB card", total=80 * GiB),))
    return Scenario(
        name="saturated", title="80 GiB card, 4 models, the busiest (55 % of requests) keeping its batch full",
        hardware=hardware, models=models,
        workload=Workload(rate=6.5, zipf_s=1.3),
        slo_ttft_s={m.spec.name: 2.0 for m in models},
        options=StrategyOptions(swap_groups=_swap_groups(models, hardware), static_set=_static_set(models, hardware)),
        story="Zipf 1.3 over four models: qwen2.5-32b-awq gets 55 % of the requests, about 3.6 a second, near what "
              "its 16 sequences of 4096 tokens serve; the three 7-8B models share what is left of the card.",
    )


def scenarios() -> dict[str, Scenario]:
    return {s.name: s for s in (seed(), box(), box("gamma", cv=4.0), box(traffic="shift"), box(traffic="together"),
                                two_model(), saturated())}
