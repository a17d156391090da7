"""Load a llama.cpp GGUF file into a `ModelConfig` and Hugging Face-named float tensors.

Contract: `load_gguf(path, dtype)` returns a `GGUFModel` whose `weights` use the same names and
layouts as `weights.load_hf_weights` (so the model code cannot tell the sources apart) and have
passed `weights.check_weights`. Quantized tensors are dequantized one at a time with
`gguf.quants.dequantize`; nothing of the file stays referenced afterwards. `fields` holds all
GGUF metadata as Python values (the tokenizer reads `tokenizer.ggml.*` from it).

Supported `general.architecture`: llama (Mistral GGUFs use it too), qwen2 (q/k/v bias), qwen3
(q/k RMSNorm). For llama, llama.cpp's converter interleaved the rows of Q and K per head; they are
put back in Hugging Face's rotate-half order here.

Errors name the file: `WeightsError` for an unreadable/truncated file, an unsupported
architecture, an unsupported tensor type or an unknown tensor; `ModelConfigError` for metadata
that is missing or describes something the engine cannot run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from services.engine.config import ModelConfig, ModelConfigError, RopeScaling
from services.engine.weights import WeightsError, check_weights

# GGUF `general.architecture` -> ModelConfig.family
SUPPORTED_GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-frequency divisors


@dataclass
class GGUFModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face naming, see weights.py
    fields: dict[str, object]  # every GGUF metadata key -> Python value


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> GGUFModel:
    path = Path(path)
    reader = _open(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise WeightsError(
            f"{path}: unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _make_config(path, str(arch), fields, tensors)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        hf_name = _hf_name(path, name)
        weight = _dequantize(path, tensor, dtype)
        if arch == "llama" and hf_name.startswith("model.layers."):
            if ".q_proj." in hf_name:
                weight = _unpermute_rows(weight, config.num_heads)
            elif ".k_proj." in hf_name:
                weight = _unpermute_rows(weight, config.num_kv_heads)
        weights[hf_name] = weight
    del reader, tensors  # drop the file mapping
    try:
        check_weights(config, weights)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    return GGUFModel(config=config, weights=weights, fields=fields)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        # Bad magic, a truncated header or tensor data past the end of the file all land here.
        raise WeightsError(f"{path}: not a GGUF file, or truncated/corrupt ({e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from None


def _hf_name(path: Path, name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise WeightsError(f"{path}: unknown tensor {name!r} (not part of a Llama-family model)")


def _dequantize(path: Path, tensor: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """One tensor as `dtype`, in numpy (= Hugging Face) dimension order, owning its memory."""
    try:
        array = dequantize(tensor.data, tensor.tensor_type)  # float32, or a view of the file
    except NotImplementedError:
        raise WeightsError(
            f"{path}: tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}"
        ) from None
    except ValueError as e:
        raise WeightsError(f"{path}: tensor {tensor.name!r} is corrupt ({e})") from None
    if isinstance(array, np.memmap) or not array.flags.writeable:
        array = np.array(array)  # copy out of the file mapping
    weight = torch.from_numpy(array)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. Per head, llama.cpp stores rows as pairs
    (0, d/2), (1, d/2+1), ... i.e. hf.reshape(h, 2, d/2, ...).swapaxes(1, 2); we swap back."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    # [num_heads, head_dim/2, 2, ...] -> [num_heads, 2, head_dim/2, ...]
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_Get = Callable[..., Any]  # get(key, default=None, required=False) -> metadata value


def _make_config(
    path: Path, arch: str, fields: dict[str, Any], tensors: dict[str, ReaderTensor]
) -> ModelConfig:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if key in fields:
            return fields[key]
        if required:
            raise ModelConfigError(f"{path}: missing GGUF metadata {key!r}")
        return default

    a = arch + "."
    hidden = int(get(a + "embedding_length", required=True))
    num_heads = int(get(a + "attention.head_count", required=True))
    num_kv_heads = int(get(a + "attention.head_count_kv", num_heads))
    rope_dim = get(a + "rope.dimension_count")
    head_dim = int(get(a + "attention.key_length", rope_dim or hidden // num_heads))
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelConfigError(
            f"{path}: partial rotary embedding ({a}rope.dimension_count={rope_dim}, "
            f"head_dim={head_dim}) is not supported"
        )
    vocab = get(a + "vocab_size")
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else _embedding_rows(path, tensors)
    rope_theta = float(get(a + "rope.freq_base", 10000.0))
    eos_ids = [get("tokenizer.ggml.eos_token_id"), get("tokenizer.ggml.eot_token_id")]
    bos = get("tokenizer.ggml.bos_token_id")
    name = str(get("general.name", "")).lower()
    family = SUPPORTED_GGUF_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in name:
        family = "mistral"  # as transformers does; GGUF carries no sliding window
    return ModelConfig(
        family=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(a + "feed_forward_length", required=True)),
        num_layers=int(get(a + "block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(get(a + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        rope_scaling=_rope_scaling(path, a, get, tensors, head_dim, rope_theta),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
    )


def _embedding_rows(path: Path, tensors: dict[str, ReaderTensor]) -> int:
    if "token_embd.weight" not in tensors:
        raise ModelConfigError(f"{path}: no vocab size in metadata and no token_embd.weight")
    return int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes are [cols, rows]


def _rope_scaling(
    path: Path,
    a: str,
    get: _Get,
    tensors: dict[str, ReaderTensor],
    head_dim: int,
    rope_theta: float,
) -> RopeScaling:
    kind = get(a + "rope.scaling.type")
    if ROPE_FREQS in tensors:
        return _llama3_scaling(path, a, get, tensors[ROPE_FREQS], head_dim, rope_theta)
    if kind in (None, "none"):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(get(a + "rope.scaling.factor", 1.0)))
    raise ModelConfigError(f"{path}: unsupported {a}rope.scaling.type {kind!r}")


def _llama3_scaling(
    path: Path, a: str, get: _Get, tensor: ReaderTensor, head_dim: int, rope_theta: float
) -> RopeScaling:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors. Recover the parameters,
    assuming Meta's low/high freq factors (1, 4), and verify they reproduce every divisor."""
    stored = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64)
    original = int(get(a + "rope.scaling.original_context_length", 8192))
    scaling = RopeScaling(
        rope_type="llama3",
        factor=float(stored.max()),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=original,
    )
    if stored.shape != (head_dim // 2,) or not np.allclose(
        stored, _llama3_divisors(scaling, head_dim, rope_theta), rtol=1e-4
    ):
        raise ModelConfigError(
            f"{path}: {ROPE_FREQS} does not match llama3 rope scaling "
            f"(factor={scaling.factor}, low=1, high=4, original={original}); not supported"
        )
    return scaling


def _llama3_divisors(s: RopeScaling, head_dim: int, rope_theta: float) -> np.ndarray:
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        ratio = s.original_max_position_embeddings / wavelen
        if ratio > s.high_freq_factor:  # short wavelength: untouched
            out.append(1.0)
        elif ratio < s.low_freq_factor:  # long wavelength: fully scaled
            out.append(s.factor)
        else:
            smooth = (ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out)
