"""Writes a tiny Qwen2-architecture model (or a tiny DeepSeek-V2, `write_deepseek_v2`): config.json, model.safetensors and a tokenizer trained
here on a fixed text, so the demo and the tests need no download. Its folder has the same files a
real Qwen2.5 folder has and loads through the same code path (AutoModelForCausalLM,
AutoTokenizer). The weights are random (seeded): it talks nonsense, deterministically.

    python -m lessor.engines.tiny_qwen var/models/tiny-qwen [--gguf var/models/tiny-qwen.gguf]

`--gguf` also writes the same model as a GGUF file (f32, llama.cpp's `qwen2` architecture, the
same vocabulary and merges) for the llama.cpp engine, with the `gguf` package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def write(out: Path, seed: int = 0, architecture: dict | None = None, dtype: str = "float32") -> Path:
    """The tiny model, or one of another shape: `architecture` replaces ARCHITECTURE's keys (a
    larger hidden size, more layers, a vocab_size larger than the tokenizer's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _write(out, seed, Qwen2Config, Qwen2ForCausalLM, {**ARCHITECTURE, **(architecture or {})}, dtype)


def write_deepseek_v2(out: Path, seed: int = 0, architecture: dict | None = None, dtype: str = "float32") -> Path:
    """A tiny DeepSeek-V2 (MLA attention, a dense first layer, then routed and shared experts), or
    one of another shape (`architecture` replaces DEEPSEEK_V2's keys: DeepSeek-V2-Lite's widths
    with fewer layers)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    return _write(out, seed, DeepseekV2Config, DeepseekV2ForCausalLM, {**DEEPSEEK_V2, **(architecture or {})}, dtype)


def _write(out: Path, seed: int, config_class, model_class, shape: dict, dtype: str) -> Path:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = config_class(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, dtype=dtype, **{"vocab_size": len(tokenizer), **shape})
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))
    return out


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
    parser.add_argument("--gguf", type=Path, default=None, help="also write it as this GGUF file (needs `gguf`)")
    args = parser.parse_args(argv)
    path = write(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote a tiny Qwen2 model to {path} ({size / 1e6:.1f} MB)")
    if args.gguf:
        write_gguf(path, args.gguf)
        print(f"wrote it as GGUF to {args.gguf} ({args.gguf.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
