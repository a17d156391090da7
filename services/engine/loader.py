"""From `--model-path` to a ready model and tokenizer.

Contract: `load_model(model_path)` accepts a Hugging Face folder (config.json, *.safetensors,
tokenizer.json), a GGUF file, a folder holding exactly one GGUF, or None for the embedded
default model. It never downloads anything. Every failure is a `ValueError` subclass whose
message names the path and what is wrong, so command lines can print it without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.serve_config import DTYPES  # noqa: F401  (re-exported for the CLIs)
from services.engine.config import ModelConfig
from services.engine.embedded import EMBEDDED_MODEL_NAME, embedded_model_path
from services.engine.gguf_loader import load_gguf
from services.engine.model import LlamaModel
from services.engine.tokenizer import Tokenizer
from services.engine.weights import check_weights, load_hf_weights


class ModelPathError(ValueError):
    """`--model-path` does not name a model this engine can load."""


@dataclass(slots=True)
class LoadedModel:
    name: str  # served model name: the folder or file stem, or the embedded model's name
    path: Path
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer


def resolve_model_path(model_path: str | None) -> tuple[str, Path]:
    """(kind, path) with kind "hf" or "gguf"; raises ModelPathError."""
    if model_path is None:
        return "gguf", embedded_model_path()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelPathError(
            f"--model-path {model_path}: no such file or folder "
            "(Tandem never downloads weights: give a local Hugging Face folder or GGUF file)"
        )
    if path.is_file():
        return "gguf", path
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ModelPathError(f"--model-path {model_path}: several .gguf files; name one of them")
    raise ModelPathError(f"--model-path {model_path}: no config.json and no .gguf file in it")


def load_model(model_path: str | None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    kind, path = resolve_model_path(model_path)
    if kind == "gguf":
        gguf = load_gguf(path, dtype=dtype)
        config, weights = gguf.config, gguf.weights
        tokenizer = Tokenizer.from_gguf_fields(gguf.fields)
        name = EMBEDDED_MODEL_NAME if model_path is None else path.stem
    else:
        config = ModelConfig.from_hf_folder(path)
        weights = load_hf_weights(path, dtype=dtype)
        tokenizer = Tokenizer.from_folder(path)
        name = path.name
    check_weights(config, weights)
    model = LlamaModel(config, weights, device=device, dtype=dtype)
    return LoadedModel(name, path, config, model, tokenizer)


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`--dtype` (one of `DTYPES`); auto: bfloat16 on CUDA, float32 on CPU (bfloat16 is
    slower on these CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[name]
