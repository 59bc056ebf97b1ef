"""Writes a tiny Qwen2-architecture model: config.json, model.safetensors and a tokenizer trained
here on a fixed text, so the demo and the tests need no download. Its folder has the same files a
real Qwen2.5 folder has and loads through the same code path (AutoModelForCausalLM,
AutoTokenizer). The weights are random (seeded): it talks nonsense, deterministically.

    python -m lessor.engines.tiny_qwen var/models/tiny-qwen
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


def write(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         dtype="float32", **ARCHITECTURE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessor.engines.tiny_qwen", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote a tiny Qwen2 model to {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
