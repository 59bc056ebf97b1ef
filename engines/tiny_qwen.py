"""Writes a tiny Qwen2-architecture model (or a tiny DeepSeek-V2, `write_deepseek_v2`): config.json, model.safetensors and a tokenizer trained
here on a fixed text, so the demo and the tests need no download. Its folder has the same files a
real Qwen2.5 folder has and loads through the same code path (AutoModelForCausalLM,
AutoTokenizer). The weights are random (seeded): it talks nonsense, deterministically.

    python -m lessor.engines.tiny_qwen var/models/tiny-qwen [--gguf var/models/tiny-qwen.gguf]
    python -m lessor.engines.tiny_qwen OUT --shape qwen2.5-7b --dtype bfloat16 [--layers N] [--vocab N]

`--gguf` also writes the same model as a GGUF file (f32, llama.cpp's `qwen2` architecture, the
same vocabulary and merges) for the llama.cpp engine, with the `gguf` package.

`--shape` writes a real model's published shape (`SHAPES`: Qwen2.5-3B and -7B, DeepSeek-V2-Lite's
MLA and MoE) with random weights, for measuring memory: the tokenizer stays the tiny one (its ids
are valid rows of any larger embedding). `--layers` and `--vocab` cut it down to fit a card or a
CPU test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK_ELEMENTS = 1 << 24  # filled per generator call: progress stays even across the threads
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's template, reduced to what the built-in engine needs (no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
lessor grants every model a lease of GPU memory: weights first, then the KV cache from what is left.
Two models share one card when their leases fit its budget; a load that does not fit is refused
with the bytes it wanted and the bytes that were free. The quick brown fox jumps over the lazy dog.
Hello, how are you today? I am a tiny language model with random weights, made for tests.
The answer is forty-two. One, two, three, four, five, six, seven, eight, nine, ten.
"""

ARCHITECTURE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True)
# DeepSeek-V2-Lite's layout (no q_lora_rank, first_k_dense_replace 1, 2 shared experts) at a tiny width.
DEEPSEEK_V2 = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2,
                   num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)

# Published shapes (the config.json files in tests/fixtures/): (transformers family, config keys).
SHAPES: dict[str, tuple[str, dict]] = {
    "tiny": ("qwen2", ARCHITECTURE),
    # vLLM's CPU attention (0.32) takes head sizes 32, 64, 80, ..., 256 and 512: the tiny model's 16
    # passes /health, then its first request kills the engine. Two heads of 64.
    "tiny-vllm": ("qwen2", {**ARCHITECTURE, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                            "num_key_value_heads": 1}),
    "qwen2.5-3b": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                 tie_word_embeddings=True, max_position_embeddings=32768,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False, max_position_embeddings=131072,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6)),
    # Without its YaRN rope scaling: that changes positions, not memory.
    "deepseek-v2-lite": ("deepseek_v2", dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                             first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                             vocab_size=102400, tie_word_embeddings=False, topk_method="greedy",
                                             norm_topk_prob=False, routed_scaling_factor=1.0,
                                             max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6)),
}
INIT_STD = 0.02  # transformers' initializer_range for both families


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=8192)


def write(out: Path, seed: int = 0, architecture: dict | None = None, dtype: str = "float32",
          shape: str = "tiny") -> Path:
    """The tiny model, or a model of `shape` (a key of SHAPES); `architecture` replaces the shape's
    keys (fewer layers, a smaller vocabulary)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    family, preset = SHAPES[shape]
    keys = {"vocab_size": len(tokenizer), **preset, **(architecture or {})}
    if keys["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {keys['vocab_size']} is below the tokenizer's {len(tokenizer)} tokens")
    model = random_model(_config(family, tokenizer, dtype, keys), dtype, seed)
    model.save_pretrained(out)
    _as_published(out / "config.json", family)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))
    return out


# Keys transformers derives and writes into config.json that the published files do not have.
def write_deepseek_v2(out: Path, seed: int = 0, architecture: dict | None = None, dtype: str = "float32") -> Path:
    """A tiny DeepSeek-V2 (MLA attention, a dense first layer, then routed and shared experts):
    DeepSeek-V2-Lite's family at DEEPSEEK_V2's widths, or `architecture`'s."""
    return write(out, seed, {"vocab_size": 512, **DEEPSEEK_V2, **(architecture or {})}, dtype, shape="deepseek-v2-lite")


DERIVED_KEYS = {"deepseek_v2": ("qk_head_dim", "head_dim")}


def _as_published(path: Path, family: str) -> None:
    """config.json as the published model's: DeepSeek-V2-Lite's has no qk_head_dim or head_dim
    (transformers writes qk_nope + qk_rope and qk_rope there), which lessor's reader would refuse."""
    config = json.loads(path.read_text())
    for key in DERIVED_KEYS.get(family, ()):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _config(family: str, tokenizer, dtype: str, keys: dict):
    from transformers import DeepseekV2Config, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "deepseek_v2": DeepseekV2Config}[family]
    return config_class(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, dtype=dtype, **keys)


def random_model(config, dtype: str, seed: int):
    """The model built on the meta device, then given memory and filled tensor by tensor, each from
    a generator seeded by the seed and its name: transformers' per-module init of a 7B model in
    float32 takes minutes and twice the memory, and per-name seeds let threads fill in parallel
    and still write the same bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.to_empty(device="cpu")
    named = [(name, p) for name, p in model.named_parameters(remove_duplicate=True)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda item: _fill(item[0], item[1].data, seed), named))
    model.tie_weights()
    _restore_buffers(model)
    return model.eval()


def _fill(name: str, tensor, seed: int) -> None:
    import torch

    if tensor.dim() == 1:  # norms are ones, biases zeros: transformers' init, so activations stay sane
        tensor.fill_(1.0 if "norm" in name else 0.0)
        return
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    # Uniform with the normal init's standard deviation: half the cost of normal_ on the CPU.
    bound = INIT_STD * 3 ** 0.5
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        flat[start:start + CHUNK_ELEMENTS].uniform_(-bound, bound, generator=generator)


def _restore_buffers(model) -> None:
    """to_empty leaves the rotary inverse frequencies uninitialised (they are not in the
    checkpoint, but generating in this process would read garbage): build those modules again."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(module.config))


# HF Qwen2 tensor names -> llama.cpp's (per block, then the rest).
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_OTHER_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _OTHER_TENSORS:
        return _OTHER_TENSORS[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_BLOCK_TENSORS[rest]}"


def write_gguf(folder: Path, out: Path) -> Path:
    """The HF folder written by `write` as one GGUF file llama.cpp loads."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab = {**tok["model"]["vocab"], **special}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), arch="qwen2")
    writer.add_name("tiny-qwen")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_pad_token_id(special["<|endoftext|>"])
    writer.add_bos_token_id(special["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in sorted(load_file(str(folder / "model.safetensors")).items()):
        writer.add_tensor(_gguf_name(name), array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessor.engines.tiny_qwen", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="a published model's shape")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers, cut (or grown) from the shape's")
    parser.add_argument("--vocab", type=int, default=None, help="vocab_size instead of the shape's (at least 512)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weight dtype (default: float32 for tiny, bfloat16 for the published shapes)")
    parser.add_argument("--gguf", type=Path, default=None, help="also write it as this GGUF file (needs `gguf`)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.shape.startswith("tiny") else "bfloat16")
    path = write(args.out, args.seed, shape_overrides(args.layers, args.vocab), dtype, args.shape)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote a {args.shape}-shaped model ({dtype}) to {path} ({size / 1e6:.1f} MB)")
    if args.gguf:
        write_gguf(path, args.gguf)
        print(f"wrote it as GGUF to {args.gguf} ({args.gguf.stat().st_size / 1e6:.1f} MB)")
    return 0


def shape_overrides(layers: int | None, vocab: int | None) -> dict:
    return {**({"num_hidden_layers": layers} if layers else {}), **({"vocab_size": vocab} if vocab else {})}


if __name__ == "__main__":
    sys.exit(main())
