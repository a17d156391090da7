"""Suite-wide rules: `@pytest.mark.gpu` tests run only where CUDA is available (the lent GPU
machine); elsewhere they are reported as skipped with the reason, never counted as passing.
`model`: the folder of a tiny random Llama, built once per session (modules that need another
model define their own `model` fixture).
Where CUDA is missing, Triton kernels run in Triton's interpreter (switched on here, before any
test module imports triton), so their tests check them on the CPU too."""

from __future__ import annotations

import services  # noqa: F401  (gRPC's settings, before grpc loads: see services/__init__.py)

# isort: split
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    from tests.engine.triton_cpu import enable

    enable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("model")
    make_tiny_model("llama", folder)
    return folder
