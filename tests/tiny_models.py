"""Tiny random Llama-family models, built offline with Hugging Face transformers.

`make_tiny_model(family, folder)` writes a complete Hugging Face model folder (config.json,
model.safetensors, a byte-level tokenizer.json with a ChatML template) and returns the
transformers model that wrote it, so tests can compare against the reference implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_VOCAB = 256
VOCAB_SIZE = BYTE_VOCAB + len(VOCAB_SPECIALS)
EOS_ID = BYTE_VOCAB + 2  # <|im_end|>
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _hf_classes(family: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM,
                  {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 24}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 24, "attention_bias": True}),
    }[family]


def make_tiny_model(family: str, folder: Path, seed: int = 0, num_layers: int = 2,
                    tie_word_embeddings: bool = False):
    """Write a random `family` model to `folder`; returns the transformers model (eval, fp32)."""
    config_cls, model_cls, extra = _hf_classes(family)
    config = config_cls(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=0, **extra,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init at std 0.02 makes every logit nearly equal; scale up so greedy choices are
    # decisive and the comparisons test the maths, not floating-point tie-breaking.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(6.0 if "embed" in name else 3.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)
    return model


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(VOCAB_SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML,
        "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
