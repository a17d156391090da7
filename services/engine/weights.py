"""Hugging Face safetensors weights, and the check that a weight dict fits a `ModelConfig`.

Contract:
- `load_hf_weights(folder, dtype)` reads `model.safetensors`, or the shards named by
  `model.safetensors.index.json`, and returns `{hf_name: tensor}` with the names exactly as
  stored (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...,
  `lm_head.weight` when the checkpoint has one). Tensors are converted only when their dtype
  differs from `dtype`. Pickled `.bin` checkpoints are never loaded (they can run code).
- `check_weights(config, weights)` raises if any tensor the model code needs is missing or has
  the wrong shape; extra tensors are ignored. `gguf_loader` returns the same naming, so the
  model code checks one dict shape whatever the source.
- Every failure raises `WeightsError` (a `ValueError`) whose message names the file, or for
  `check_weights` every offending tensor name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.engine.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightsError(ValueError):
    """Model weights are missing, unreadable or do not fit the config; the message says which."""


def load_hf_weights(
    folder: str | Path, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model folder, by their stored names, as `dtype`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    weights: dict[str, torch.Tensor] = {}
    for shard, names in _shards(folder):
        weights.update(_read_safetensors(shard, names, dtype))
    return weights


def _shards(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """(file, tensor names to take from it or None for all) for every file to read."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({e!r})") from None
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        missing = sorted(f for f in by_file if not (folder / f).is_file())
        if missing:
            raise WeightsError(f"{index}: names shard(s) not in the folder: {', '.join(missing)}")
        return [(folder / f, names) for f, names in sorted(by_file.items())]
    single = folder / SINGLE_FILE
    if single.is_file():
        return [(single, None)]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    bins = [n for n in found if n.endswith(".bin")]
    hint = (
        f" (found {', '.join(bins)}: .bin pickles are not loaded; convert them to safetensors)"
        if bins
        else f" (found {', '.join(found)})"
        if found
        else ""
    )
    raise WeightsError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _read_safetensors(
    path: Path, names: set[str] | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if names is not None and not names <= keys:
                absent = ", ".join(sorted(names - keys)[:5])
                raise WeightsError(f"{path}: index lists tensors the file lacks: {absent}")
            for name in sorted(keys if names is None else names):
                tensor = f.get_tensor(name)
                out[name] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    except SafetensorError as e:
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from None
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model code reads, with its shape, in Hugging Face naming."""
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_dim, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_dim, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_dim, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_dim),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_dim,),
                p + "self_attn.k_proj.bias": (kv_dim,),
                p + "self_attn.v_proj.bias": (kv_dim,),
            }
            if c.family != "qwen2":  # Llama/Mistral/Qwen3 attention_bias also biases o_proj
                shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise `WeightsError` naming every needed tensor that is missing or mis-shaped."""
    expected = expected_shapes(config)
    if config.tie_word_embeddings and "lm_head.weight" in weights:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    missing = [n for n in expected if n not in weights]
    misshaped = [
        f"{n} is {tuple(weights[n].shape)}, expected {shape}"
        for n, shape in expected.items()
        if n in weights and tuple(weights[n].shape) != shape
    ]
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:20])}")
            if len(missing) > 20:
                parts[-1] += f", ... ({len(missing) - 20} more)"
        if misshaped:
            parts.append(f"wrong shape: {'; '.join(misshaped[:20])}")
        raise WeightsError(f"weights do not fit the {config.family} config: {' | '.join(parts)}")
